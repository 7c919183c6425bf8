"""What keeps a run's weights finite and its work saved: the non-finite step guard and the preemption checkpoint."""

from __future__ import annotations

import os
import signal
from typing import Any, Iterable

import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (or would write non-finite weights)."""


def non_finite_names(tensors: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of the first ``limit`` tensors holding a NaN or an infinity."""
    bad = []
    for name, tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a shard: each rank checks its own
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient is finite: one fused norm per device and dtype (a NaN or an infinity
    anywhere makes the norm non-finite)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when a tensor in it is not finite."""
    bad = non_finite_names(tensors.items())
    if bad:
        raise NonFiniteError(f"refusing to write {what}: non-finite values in {', '.join(bad)}")


class NonFiniteSteps:
    """Per optimizer step: a non-finite loss (any micro-batch) or gradient stops training with
    :class:`NonFiniteError`, or, while fewer than ``allowed`` steps were skipped, drops the step's
    gradients so the optimizer leaves the weights (and its moments) untouched."""

    def __init__(self, allowed: int = 0):
        if allowed < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {allowed}")
        self.allowed, self.skipped = allowed, 0
        self._bad_loss: float | None = None

    def saw_loss(self, loss: torch.Tensor) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0])

    def before_step(self, step: int, optimizer: torch.optim.Optimizer, check_gradients: bool) -> None:
        """Called with the gradients complete, before clipping and the optimizer's step."""
        bad_loss, self._bad_loss = self._bad_loss, None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if bad_loss is not None:
            what = f"the loss is {bad_loss}"
        elif check_gradients and not gradients_finite(params):
            what = "a gradient is not finite"
        else:
            return
        if self.skipped >= self.allowed:
            more = (f" after {self.skipped} skipped step(s), the most model.max_nonfinite_steps allows" if self.allowed
                    else "; model.max_nonfinite_steps N skips up to N such steps instead")
            raise NonFiniteError(f"training stopped at step {step}: {what}{more}. "
                                 "No non-finite weights were written; lower model.lr or resume from an earlier checkpoint")
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW leaves the parameter and its moments as they are
        rank_zero_warn(f"step {step}: {what}; step skipped ({self.skipped} of at most {self.allowed})")


# SLURM sends SIGUSR1 before its time limit when a job asks for it (--signal=USR1@90); Lightning
# handles it itself where SLURM's auto-requeue is on, and elsewhere it means "save and stop".
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Saves ``<dirpath>/preempted.ckpt`` when training stops early: SIGTERM or SIGUSR1 (the run
    stops at the next step boundary) or an exception mid-fit (at the last finished step). ``--ckpt_path
    last`` picks it when it is newer than ``last.ckpt``. Nothing is saved before the first step, or
    when a weight is not finite."""

    FILENAME = "preempted"

    def __init__(self, dirpath: str | os.PathLike):
        super().__init__(dirpath, filename=self.FILENAME)
        self.saved: str | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # registered after Lightning's own SIGTERM handler; SIGUSR1 only where nothing else handles it
        number = getattr(signal, "SIGUSR1", None)
        if number is not None and signal.getsignal(number) in (signal.SIG_DFL, None):
            connector = trainer._signal_connector

            def stop_at_next_step(signum, frame):  # what Lightning's SIGTERM handler does
                connector.received_sigterm = True

            self._previous[number] = signal.signal(number, stop_at_next_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        if not trainer.training or trainer.global_step == 0 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 0:
            return  # nothing trained yet: a checkpoint would only hide the last real one
        try:  # a weight that is not finite is not saved (NonFiniteError from on_save_checkpoint)
            trainer.save_checkpoint(self.ckpt_path)
        except NonFiniteError:
            return
        self.saved = self.ckpt_path
        exception.checkpoint = self.ckpt_path  # for the command's closing line

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # called only when fit ends normally: its last.ckpt and export supersede the checkpoint resumed from
        if stage == "fit":
            super().teardown(trainer, pl_module, stage)

    def _restore_handlers(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
