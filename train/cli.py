"""The `lightning` command: LightningCLI over EditorModule and ShardDataModule."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from model import EditorLoadError

from .data import ShardDataModule
from .module import EditorModule


# Expected here: the frozen text encoder and VAE run in eval mode; no validation shards by default.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


def main(args: list[str] | None = None) -> int:
    try:
        LightningCLI(
            EditorModule,
            ShardDataModule,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
        )
    except (EditorLoadError, ValueError, FileNotFoundError) as err:
        print(f"lightning: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
