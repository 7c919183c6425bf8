"""The `lightning` command: LightningCLI over EditorModule and ShardDataModule."""

from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from model import EditorLoadError

from .data import ShardDataModule
from .guards import NonFiniteError, PreemptionCheckpoint
from .module import SWAP_NEEDS_FSDP, EditorModule


# Expected here: the frozen text encoder and VAE run in eval mode; no validation shards by default.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
# the epoch loader knows its exact length: each pass splits its batches among the workers itself
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
# the data module keeps the stream's place in every checkpoint (ShardDataModule.state_dict)
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


ROOT_PLACEHOLDER = "{default_root_dir}"


class EditorCLI(LightningCLI):
    """LightningCLI whose runs keep their files under their own ``trainer.default_root_dir``:
    a ModelCheckpoint without ``dirpath`` writes ``<root>/checkpoints`` (one fixed folder per run,
    so a resubmitted job finds ``--ckpt_path last``; runs with other roots never share it), and a
    logger's ``save_dir: "{default_root_dir}"`` becomes that root."""

    def add_arguments_to_parser(self, parser) -> None:
        # a latent cache (data.cached) means the module need not load the VAE's weights
        parser.link_arguments("data.cached", "model.cached_latents", compute_fn=_is_set)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        root = str(trainer.default_root_dir or ".")
        for callback in trainer.callbacks or []:
            if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and not callback.init_args.get("dirpath"):
                callback.init_args["dirpath"] = str(Path(root) / "checkpoints")
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and isinstance(init_args.get("save_dir"), str):
                init_args["save_dir"] = init_args["save_dir"].replace(ROOT_PLACEHOLDER, root)

    def before_fit(self) -> None:
        from .strategies import EditorFSDPStrategy

        if self.model.hparams.blocks_to_swap and not isinstance(self.trainer.strategy, EditorFSDPStrategy):
            raise ValueError(SWAP_NEEDS_FSDP)
        # bad data paths fail here, before the trainer's logger makes an empty version folder
        self.datamodule.setup("fit")
        if not any(isinstance(c, PreemptionCheckpoint) for c in self.trainer.callbacks):
            root = Path(self.trainer.default_root_dir or ".")
            folders = [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
            self.trainer.callbacks.append(PreemptionCheckpoint(folders[0] if folders else root / "checkpoints"))


def _saved(err: BaseException) -> str:
    path = getattr(err, "checkpoint", None)  # set by PreemptionCheckpoint
    return f"; the last finished step is saved in {path}" if path else ""


def _is_set(value) -> bool:
    return bool(value)


def main(args: list[str] | None = None) -> int:
    try:
        EditorCLI(
            EditorModule,
            ShardDataModule,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            args=args,
        )
    except NonFiniteError as err:
        print(f"lightning: error: {err}{_saved(err)}", file=sys.stderr)
        return 1
    except (EditorLoadError, ValueError, FileNotFoundError) as err:
        print(f"lightning: error: {err}", file=sys.stderr)
        return 2
    except SIGTERMException as err:
        # Lightning stops its loops at the next step boundary on SIGTERM (SIGUSR1 too, here); a
        # preempted run must not look finished to its scheduler (nothing was exported), so it exits
        # as a terminated process, with the checkpoint to resume from.
        print(f"lightning: stopped by a signal before the end of training (SIGTERM or SIGUSR1); nothing was "
              f"exported{_saved(err)}. Resume with --ckpt_path last", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
