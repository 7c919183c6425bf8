"""A callback for the CLI tests: records each finished step's samples, and stops the run at a step
by a signal (as a scheduler would) or by an exception inside the step."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class StopAt(L.Callback):
    def __init__(self, log: str, step: int = -1, how: str = "signal"):
        self.path, self.step, self.how = log, step, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.how == "raise" and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure inside step {self.step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(batch["key"])}) + "\n")
        if self.how in ("signal", "SIGTERM", "SIGUSR1") and trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, "SIGTERM" if self.how == "signal" else self.how))
