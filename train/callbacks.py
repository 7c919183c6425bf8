"""Training callbacks: throughput and data-wait figures, and edit samples made by InsV2VPipeline."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from infer import InsV2VPipeline, write_video
from infer.pipeline import to_uint8_frames
from shards.schema import is_cached


class Throughput(L.Callback):
    """Logs ``perf/clips_per_s`` (per device) and ``perf/data_wait_s`` (time spent waiting for a batch)."""

    def __init__(self):
        self._batch_end: float | None = None
        self._batch_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._batch_end is not None:
            pl_module.log("perf/data_wait_s", now - self._batch_end, batch_size=len(batch["instruction"]))
        self._batch_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        clips = len(batch["instruction"])
        pl_module.log("perf/clips_per_s", clips / max(now - self._batch_start, 1e-9), batch_size=clips)
        self._batch_end = now


class EditSamples(L.Callback):
    """Every ``every_n_steps`` optimizer steps, edit the first clip of the batch and log
    ``source | edited | target`` side by side: a W&B video with a WandbLogger, an mp4 under
    ``<log dir>/samples`` otherwise.
    """

    def __init__(self, every_n_steps: int = 0, num_inference_steps: int = 10, text_guidance: float | None = None,
                 video_guidance: float | None = None, fps: int = 4):
        self.every_n_steps = every_n_steps
        self.settings = dict(num_inference_steps=num_inference_steps, text_guidance=text_guidance,
                             video_guidance=video_guidance)
        self.fps = fps
        self._done_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self._done_step:
            return
        if is_cached(batch):  # a latent cache holds no frames to edit
            if self._done_step == -1:
                rank_zero_info("EditSamples: the batches are cached latents, without frames to edit; no samples logged")
            self._done_step = step
            return
        self._done_step = step
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"  # a collective: all ranks
        if trainer.is_global_zero:
            self.log_panel(trainer, folder, self.sample(pl_module, batch), batch["instruction"][0], step)

    @torch.no_grad()
    def sample(self, pl_module, batch) -> np.ndarray:
        source = batch["source"][:1].float()
        target = batch["target"][:1].float()
        frames = source.shape[2]
        pipe = InsV2VPipeline.from_editor(pl_module.editor)
        # one clip: no references (a causal clip's plan takes its first frame as one)
        references = 0 if pl_module.editor.temporal_compression == 1 else 1
        settings = pipe.settings(batch["instruction"][0], clip_frames=frames, reference_frames=references, **self.settings)
        was_training = pl_module.denoiser.training
        pl_module.denoiser.eval()
        try:
            generator = torch.Generator(device="cpu").manual_seed(0)
            edited = np.stack(list(pipe.edit_stream(iter(to_uint8_frames(source)), settings, generator, progress=False)))
        finally:
            pl_module.denoiser.train(was_training)
        return np.concatenate([to_uint8_frames(source), edited, to_uint8_frames(target)], axis=2)

    def log_panel(self, trainer, folder: Path, panel: np.ndarray, caption: str, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        path = write_video(folder / f"step{step:07d}.mp4", _even(panel), self.fps)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                # a finished mp4 file: wandb then needs no video encoder of its own
                logger.experiment.log({"samples/edit": wandb.Video(str(path), caption=caption)}, step=step)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad frames to even height and width (H.264 4:2:0)."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
