"""Training the video editor: LightningModule, WebDataset DataModule, callbacks, the `lightning` command."""

from shards.augment import apply_windows, crop_windows
from .callbacks import EditSamples, Throughput
from .data import ShardDataModule, expand_shards
from .module import EditorModule
from .objective import dropout_masks, regression_target
from .strategies import EditorFSDPStrategy

__all__ = [
    "EditSamples",
    "EditorFSDPStrategy",
    "EditorModule",
    "ShardDataModule",
    "Throughput",
    "apply_windows",
    "crop_windows",
    "dropout_masks",
    "expand_shards",
    "regression_target",
]
