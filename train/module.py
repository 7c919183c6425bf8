"""EditorModule: the LightningModule that trains the video editor."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from pathlib import Path
from typing import Any, Iterator, Union

import lightning as L
import numpy as np
import torch

from infer.pipeline import CHECKPOINT_KEY, editor_from_weights
from model import EditorLoadError, load_editor, load_vae, posterior_sample, pretrained_folder, set_trainable, skipping_identity_motion_modules
from model.lora import add_lora, merge_lora, save_lora
from model.lora import lora_targets as lora_targets_for
from model.trainable import MOTION_PATTERN, count_parameters
from shards.buckets import parse_buckets
from shards.schema import EMPTY_TEXT_STATES, SOURCE_LATENT, TARGET_LOGVAR, TARGET_MEAN, TEXT_STATES, is_cached

from infer.sampling import flow_scheduler

from .flow_matching import flow_noisy, flow_timestep, flow_velocity, shifted_sigma
from .precision import base_dtype_for, hold_frozen, run_in_float32, store_in_fp8
from .guards import NonFiniteSteps, require_finite
from .objective import LOSS_WEIGHTINGS, dropout_masks, edit_balanced_weights, edit_size_weights, loss_weights, regression_target, sample_timesteps
from .strategies import is_sharded, shard_editor, swappable_blocks

EditorSpec = Union[str, dict]

SWAP_NEEDS_FSDP = ("model.blocks_to_swap needs --trainer.strategy editor_fsdp (FSDP2 holds the swapped blocks in CPU "
                   "memory; on one GPU add --trainer.devices 1)")


class EditorModule(L.LightningModule):
    """Trains an editor's video U-Net on (source, target, instruction) clips.

    Args:
        editor: what to build: ``tiny``, ``tiny-pixel``, an editor folder, a YAML file, or a
            mapping (``{base_model: DIR, motion_adapter: DIR}`` or component configs); see
            :func:`model.load_editor`.
        trainable: ``motion``, ``all``, ``spatial`` (all but the temporal layers), ``lora`` (peft
            LoRA adapters only; the U-Net stays frozen) or a list of U-Net parameter name patterns
            (``!pattern`` excludes).
        lora_rank, lora_alpha, lora_targets: the adapters of ``trainable: lora``: rank, scale
            numerator (default: the rank) and regular expressions of the linear layers they wrap
            (default: the motion modules' and spatial transformers' attention projections; a DiT's
            attention projections, or its feed-forward layers too with the preset ``attention+ffn``).
        export_lora_only: with LoRA, export the adapter alone (diffusers' LoRA safetensors) instead
            of the editor with the adapter merged.
        lr, betas, weight_decay: AdamW (weight decay 0 is Adam).
        warmup_steps: linear warm-up; lr_schedule: ``constant`` or ``cosine`` (to 0 at max_steps).
        drop_text, drop_both, drop_video: per-sample conditioning dropout fractions.
        timestep_bias: ``1`` samples timesteps uniformly; larger values favour high noise.
        objective: ``noise`` (the scheduler's DDPM objective: epsilon, v or x0 per its
            ``prediction_type``) or ``flow`` (rectified flow: the velocity ``eps - x0`` at
            ``z = (1 - sigma) x0 + sigma eps``, sigma from the shifted density of
            :func:`train.flow_matching.shifted_sigma` with ``flow_shift``; see
            :mod:`train.flow_matching`). With ``flow`` the editor samples with
            ``FlowMatchEulerDiscreteScheduler`` (same shift), which its export records; a saved
            folder (Lucy Edit, Wan) keeps its own flow scheduler as saved.
        loss_weighting: ``uniform``, ``min_snr`` (with ``min_snr_gamma``) or ``preconditioned``
            (for a preconditioned editor: each timestep's error in units of the U-Net's own output);
            see :func:`train.objective.loss_weights`.
        edit_balance: in [0, 1]; 1 weighs each clip's edited pixels (where target and source differ)
            as much as its unchanged ones; ``edit_threshold`` is the channel-mean absolute difference
            (at the U-Net's scale) above which an element counts as edited; see
            :func:`train.objective.edit_balanced_weights`.
        edit_size_balance: >= 0; weighs each clip by its edit size (mean squared target - source
            difference, plus ``edit_size_floor``) to this power's negative, normalised over the batch:
            1 gives a small edit's clip the same pull as a large one's. See
            :func:`train.objective.edit_size_weights`.
        train_text_encoder: also train the CLIP text encoder (for editors trained from scratch).
        text_encoder_lr: the text encoder's peak learning rate when it trains (default ``lr``); the
            warm-up and schedule scale it like ``lr``.
        cached_latents: train on a latent cache (``data.cached``, linked by ``lightning fit``): the
            VAE's weights are not loaded (it is read in full only to export the editor), and cached
            text states replace the text encoder's (unless it trains).
        gradient_checkpointing: recompute U-Net activations in backward.
        motion_frozen_steps: the temporal layers keep their initial weights for this many optimizer
            steps while the rest trains (a per-frame editor first, as an image model is trained
            before its motion modules are added), then train with the rest.
        ema_decay: keep an exponential moving average of the trainable weights (exported).
        max_nonfinite_steps: a step whose loss or gradient is not finite stops training with one
            line (``NonFiniteError``) before the optimizer applies it; with N > 0 up to N such steps
            are skipped instead (their gradients dropped) and the N+1-th stops. Checkpoints and the
            exported editor are never written with non-finite weights.
        seed: base of the per-step random streams (noise, timesteps, dropout): a resumed run
            draws exactly what an uninterrupted one would.
        export_dir: where the final editor folder goes (default ``<log dir>/editor``).
        base_dtype: how the frozen base is held (``train.precision``): ``null`` is the run's half
            precision under a mixed-precision trainer (bf16 under ``bf16-mixed``), else float32;
            ``bfloat16``/``float16``/``float32`` as named; ``float8_e4m3fn`` stores frozen linear
            weights in fp8 and computes in bf16 (diffusers' layerwise casting). Trainable weights
            and their optimiser state stay float32.
        activation_offload: keep what autograd saves for backward in (pinned) CPU memory
            (``torch.autograd.graph.save_on_cpu``); with gradient checkpointing that is each
            block's input.
        blocks_to_swap: hold the first N transformer (or U-Net) blocks in CPU memory and copy each to
            the device only while it runs, forward and backward (FSDP2's CPU offload policy:
            needs ``--trainer.strategy editor_fsdp``, one device or several). Meant for LoRA on
            one GPU: the swapped blocks' adapters take their optimizer step on the CPU.
    """

    def __init__(
        self,
        editor: EditorSpec = "tiny",
        trainable: Union[str, list[str]] = "motion",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: Union[list[str], str, None] = None,
        export_lora_only: bool = False,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        drop_text: float = 0.05,
        drop_both: float = 0.05,
        drop_video: float = 0.05,
        timestep_bias: float = 1.0,
        objective: str = "noise",
        flow_shift: float = 1.0,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        edit_balance: float = 0.0,
        edit_threshold: float = 0.05,
        edit_size_balance: float = 0.0,
        edit_size_floor: float = 1e-3,
        train_text_encoder: bool = False,
        text_encoder_lr: float | None = None,
        cached_latents: bool = False,
        gradient_checkpointing: bool = False,
        motion_frozen_steps: int = 0,
        ema_decay: float | None = None,
        max_nonfinite_steps: int = 0,
        seed: int = 0,
        export_dir: str | None = None,
        base_dtype: str | None = None,
        activation_offload: bool = False,
        blocks_to_swap: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if text_encoder_lr is not None and (text_encoder_lr <= 0 or not train_text_encoder):
            raise ValueError(f"text_encoder_lr must be > 0 (or null: lr) and needs train_text_encoder: true, "
                             f"got {text_encoder_lr} with train_text_encoder: {train_text_encoder}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}")
        if not 0.0 <= edit_balance <= 1.0:
            raise ValueError(f"edit_balance must be in [0, 1], got {edit_balance}")
        if edit_size_balance < 0 or edit_size_floor <= 0:
            raise ValueError(f"edit_size_balance must be >= 0 and edit_size_floor > 0, got {edit_size_balance} "
                             f"and {edit_size_floor}")
        if isinstance(editor, str) and editor.endswith((".yaml", ".yml")) and os.path.isfile(editor):
            import yaml

            # a checkpoint must rebuild the editor anywhere: record the config, not its path
            editor = yaml.safe_load(open(editor))
            self.hparams.editor = editor
        try:
            self.editor = load_editor(editor, vae_weights=not cached_latents)
        except EditorLoadError as err:
            raise EditorLoadError(f"model.editor: {err}") from None
        if objective not in ("noise", "flow"):
            raise ValueError(f"objective must be 'noise' or 'flow', got {objective!r}")
        if self.editor.temporal_compression > 1 and objective != "flow":
            raise ValueError("a DiT editor (model.editor with a transformer) trains with model.objective: flow")
        if objective == "flow":
            if self.editor.source_prior_std is not None or loss_weighting != "uniform":
                raise ValueError("objective 'flow' takes an editor without source_prior_std and loss_weighting 'uniform'")
            if not flow_shift > 0:
                raise ValueError(f"flow_shift must be positive, got {flow_shift}")
            # flow_shift draws the training's times; a saved folder keeps its own sampler (the one its users sample with)
            self.editor.scheduler = flow_scheduler(self.editor.scheduler, flow_shift,
                                                   keep_own=pretrained_folder(editor) is not None)
        if loss_weighting == "preconditioned" and not self.editor.preconditioned:
            raise ValueError("loss_weighting 'preconditioned' needs an editor built with preconditioned: true")
        # registered here so Lightning moves, casts and checkpoints them (as unet.* or transformer.*)
        setattr(self, self.editor.denoiser_name, self.editor.denoiser)
        self.text_encoder = self.editor.text_encoder.requires_grad_(train_text_encoder)
        # without weights (cached latents) the VAE stays out of the module: nothing moves or saves it
        has_vae = self.editor.vae is not None and not cached_latents
        self.vae = self.editor.vae.requires_grad_(False).eval() if has_vae else None
        if trainable == "lora":
            add_lora(self.denoiser, lora_rank, lora_alpha, lora_targets_for(lora_targets, self.editor.denoiser_name))
            self.counts = count_parameters(self.denoiser)
        else:
            if trainable == "motion" and self.editor.denoiser_name != "unet":
                raise ValueError("a DiT editor has no motion modules: model.trainable all, lora or name patterns")
            self.counts = set_trainable(self.denoiser, trainable)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        swappable_blocks(self.denoiser, blocks_to_swap)  # a count beyond the blocks fails here, not at fit
        if base_dtype_for(base_dtype, None) == torch.float8_e4m3fn and trainable != "lora":
            # layerwise casting stores every linear weight in fp8, trained ones too: only adapters stay float32
            raise ValueError("model.base_dtype float8_e4m3fn needs trainable: lora (its adapters stay float32)")
        embedder = getattr(self.denoiser, "condition_embedder", None)
        if getattr(embedder, "time_embedder", None) is not None:  # Wan's time embedding: float32 under autocast too
            run_in_float32(embedder.time_embedder)
        self.reduced_base = False  # the frozen base held below float32 (set in setup)
        if motion_frozen_steps < 0 or (motion_frozen_steps and not self._motion_trains()):
            raise ValueError(f"motion_frozen_steps must be >= 0 and needs trainable temporal layers (trainable: "
                             f"{trainable!r}), got {motion_frozen_steps}")
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.ema: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- helpers
    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that trains: the editor's video U-Net or its DiT."""
        return self.editor.denoiser

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.hparams.train_text_encoder and "text_encoder" in self._modules:
            self.text_encoder.eval()  # frozen parts always run in inference mode
        if self.vae is not None:
            self.vae.eval()
        return self

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every trained weight, named as in the module's state dict (``unet.*`` or ``transformer.*``,
        ``text_encoder.*``)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def _step_generator(self) -> torch.Generator:
        """The noise and timestep draws of one micro-batch: a function of (seed, optimizer step,
        micro-batch within it, rank), so a resumed run draws what an uninterrupted one would
        (Lightning's ``batch_idx`` does not restart where it would after a mid-epoch resume)."""
        step = self.global_step
        self._micro_batch = self._micro_batch + 1 if getattr(self, "_seeded_step", None) == step else 0
        self._seeded_step = step
        # hashed, not a linear formula: generators seeded with nearby integers draw alike
        seed = int(np.random.SeedSequence([self.hparams.seed, step, self._micro_batch, self.global_rank]).generate_state(1, np.uint64)[0])
        return torch.Generator(device=self.device).manual_seed(seed)

    def configure_model(self) -> None:
        """Shard the U-Net when the strategy gives a device mesh (``editor_fsdp``), swapping its first
        ``blocks_to_swap`` blocks to CPU memory; else nothing."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None and self.hparams.blocks_to_swap:
            raise ValueError(SWAP_NEEDS_FSDP)
        if mesh is None or is_sharded(self.denoiser):
            return
        if self.hparams.ema_decay:
            raise ValueError("model.ema_decay is not supported with sharded training (editor_fsdp): use ddp")
        shard_editor(self.denoiser, self.text_encoder if self.hparams.train_text_encoder else None, mesh["data_parallel"],
                     self.hparams.blocks_to_swap)

    def setup(self, stage: str) -> None:
        """Before the model reaches its device: check a latent cache against the editor, leave the
        text encoder off the device when the cache holds the text states it would compute, and
        hold the frozen base in the precision it is used in (``model.base_dtype``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        buckets = getattr(getattr(datamodule, "hparams", None), "buckets", None)
        if buckets is not None:  # every bucket a shape this editor takes
            parse_buckets(buckets, self.editor.temporal_compression, self.editor.size_multiple)
        info = getattr(datamodule, "cache_info", None)
        if info is not None:  # a latent cache must come from an editor with these shapes
            encoder = self.editor.text_encoder.config
            info.check_editor(self.editor.latent_channels, self.editor.scaling_factor, encoder.hidden_size,
                              self.editor.text_length)
            if info.text_states and not self.hparams.train_text_encoder and "text_encoder" in self._modules:
                del self._modules["text_encoder"]  # never called on a cache with text states: stays on the CPU
        precision = getattr(self._trainer, "precision", None) if self._trainer is not None else None
        dtype = base_dtype_for(self.hparams.base_dtype, precision)
        if dtype == torch.float32 or self.reduced_base:
            return
        compute = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
        hold_frozen(self.denoiser, compute)
        if "text_encoder" in self._modules and not self.hparams.train_text_encoder:
            hold_frozen(self.text_encoder, compute)
        if dtype == torch.float8_e4m3fn:
            store_in_fp8(self.denoiser, compute)
        # a fully trained denoiser has no frozen base to hold: its export needs no rebuild
        self.reduced_base = any(not p.requires_grad and p.dtype != torch.float32 for p in self.denoiser.parameters())

    # ---------------------------------------------------------------- objective
    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """MSE of the U-Net's prediction on one batch, read top to bottom. A batch of clips of
        several lengths (``groups``) is the mean over all its clips: each group's mean weighted by
        its share of the batch."""
        if "groups" in batch:
            total = sum(len(group["instruction"]) for group in batch["groups"])
            return sum(self.loss(group, generator) * len(group["instruction"]) / total for group in batch["groups"])
        editor, scheduler = self.editor, self.editor.scheduler
        b = len(batch["instruction"])
        if is_cached(batch):  # a latent cache (synth cache): the encoders ran once, beforehand
            clean = posterior_sample(batch[TARGET_MEAN], batch[TARGET_LOGVAR], generator).to(editor.dtype)
            clean = clean * editor.scaling_factor
            condition = batch[SOURCE_LATENT].to(editor.dtype)
        elif self.hparams.cached_latents:
            raise ValueError("this module was built for cached latents (model.cached_latents) but got raw clips")
        else:
            frames = batch["target"].shape[2]
            if (frames - 1) % editor.temporal_compression:
                raise ValueError(f"this editor's causal VAE takes clips of 1 + {editor.temporal_compression}k frames, "
                                 f"got {frames}: set data.num_frames to one")
            # the VAE encodes outside autocast, in its own float32, as inference and the cache do
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
                clean = editor.encode_video(batch["target"], sample=True, generator=generator) * editor.scaling_factor
                condition = editor.encode_video(batch["source"])  # unscaled mode: InstructPix2Pix convention
        if TEXT_STATES in batch and not self.hparams.train_text_encoder:
            text, empty = batch[TEXT_STATES].to(editor.dtype), batch[EMPTY_TEXT_STATES].to(editor.dtype)
        else:
            with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
                text = editor.encode_text(batch["instruction"])
                empty = editor.encode_text([""])
        batch_source = condition
        u = torch.rand(b, device=self.device, generator=generator)
        drop_text, drop_video = dropout_masks(u, self.hparams.drop_text, self.hparams.drop_both, self.hparams.drop_video)
        text = torch.where(drop_text[:, None, None], empty.to(text.dtype), text)  # empty: (1 or B, seq, dim)
        condition = torch.where(drop_video[:, None, None, None, None], torch.zeros_like(condition), condition)

        u_t = torch.rand(b, device=self.device, generator=generator)
        if self.hparams.objective == "flow":  # rectified flow: the straight path's velocity at a shifted sigma
            sigma = shifted_sigma(u_t, self.hparams.flow_shift)
            noise = torch.randn(clean.shape, device=self.device, generator=generator, dtype=clean.dtype)
            noisy, goal = flow_noisy(clean, noise, sigma), flow_velocity(clean, noise)
            prediction = editor.predict(noisy, condition, text, flow_timestep(sigma, scheduler.config.num_train_timesteps))
            weights = torch.ones(b, device=self.device)
        else:
            t = sample_timesteps(u_t, scheduler.config.num_train_timesteps, self.hparams.timestep_bias)
            noise = torch.randn(clean.shape, device=self.device, generator=generator, dtype=clean.dtype)
            noisy = scheduler.add_noise(clean, noise, t)
            alpha_bar = scheduler.alphas_cumprod.to(self.device)[t]
            goal = regression_target(scheduler.config.prediction_type, clean, noise, alpha_bar)
            prediction = editor.predict(noisy, condition, text, t)
            weights = loss_weights(self.hparams.loss_weighting, alpha_bar.float(), scheduler.config.prediction_type,
                                   editor.output_scale(t, clean).float(), self.hparams.min_snr_gamma)
        error = (prediction.float() - goal.float()).pow(2)
        if self.hparams.edit_balance or self.hparams.edit_size_balance:
            source = (batch_source * editor.scaling_factor).float()  # at the target's scale, before video dropout
        if self.hparams.edit_balance:
            error = error * edit_balanced_weights(clean.float(), source, self.hparams.edit_balance,
                                                  self.hparams.edit_threshold)
        per_sample = error.flatten(1).mean(dim=1)
        if self.hparams.edit_size_balance:
            per_sample = per_sample * edit_size_weights(clean.float(), source, self.hparams.edit_size_balance,
                                                        self.hparams.edit_size_floor)
        return (weights * per_sample).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # activation offload: what autograd saves for backward waits in (pinned) CPU memory
        offload = torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda") \
            if self.hparams.activation_offload else contextlib.nullcontext()
        with self._untrained_motion_skipped(), offload:
            loss = self.loss(batch, self._step_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["instruction"]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(batch["instruction"]))
        counts = getattr(getattr(self._trainer, "datamodule", None), "source_counts", None)
        if counts and len(counts) > 1:  # a mixed stream: samples trained on per source, this rank
            self.log_dict({f"data/samples_{name}": float(n) for name, n in counts.items()}, batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        loss = self.loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["instruction"]), sync_dist=True)
        return loss

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        params = self.trainable_parameters()
        groups = [{"params": list(params.values())}]
        if self.hparams.text_encoder_lr is not None:  # a group of its own only when asked: old checkpoints resume
            text = {n for n in params if n.startswith("text_encoder.")}
            groups = [{"params": [p for n, p in params.items() if n not in text]},
                      {"params": [params[n] for n in text], "lr": self.hparams.text_encoder_lr}]
            groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(
            groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay
        )
        warmup, schedule = self.hparams.warmup_steps, self.hparams.lr_schedule
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if schedule == "cosine":
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite.saw_loss(loss)

    def on_before_optimizer_step(self, optimizer) -> None:
        # a mixed-precision grad scaler skips steps with infinite gradients itself: only the loss is checked then
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        self.nonfinite.before_step(self.global_step, optimizer, check_gradients=scaler is None)
        if self.global_step < self.hparams.motion_frozen_steps:
            # no gradient, no step: AdamW skips the parameter (no update, no decay, no moments yet)
            for param in self._motion_parameters():
                param.grad = None

    def _untrained_motion_skipped(self):
        """A context leaving the temporal layers out of this step's forward pass when they take no
        step now (frozen, or before ``motion_frozen_steps``) and are still identity maps (zeroed
        outputs): the same loss and gradients, at about two thirds of the step's time."""
        if self.editor.denoiser_name != "unet" or (self.global_step >= self.hparams.motion_frozen_steps
                                                   and self._motion_trains()):
            return contextlib.nullcontext()
        return skipping_identity_motion_modules(self.unet)

    def _motion_trains(self) -> bool:
        """Whether any temporal-layer parameter trains (stops at the first: it runs every step)."""
        return next(self._motion_parameters(), None) is not None

    def _motion_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters of the temporal layers (the motion modules), lazily."""
        return (p for n, p in self.named_parameters() if p.requires_grad and fnmatch.fnmatchcase(n, MOTION_PATTERN))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.hparams.ema_decay:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema = d * ema + (1 - d) * w`` for every trainable weight ``w``."""
        decay = self.hparams.ema_decay
        params = self.trainable_parameters()
        if self.ema is None:
            self.ema = {k: p.detach().float().clone() for k, p in params.items()}
            return
        for k, p in params.items():
            self.ema[k] = self.ema[k].to(p.device)
            self.ema[k].lerp_(p.detach().float(), 1 - decay)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights; record how to rebuild the rest."""
        keep = set(self.trainable_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        require_finite(checkpoint["state_dict"], f"a checkpoint at step {self.global_step}")
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "editor": self.hparams.editor,
            "trainable": self.hparams.trainable,
            "lora": self._lora_spec(),
            "ema": {k: v.cpu() for k, v in self.ema.items()} if self.ema else None,
            "nonfinite_skipped": self.nonfinite.skipped,
            "objective": {"kind": self.hparams.objective, "flow_shift": self.hparams.flow_shift},
        }

    def _lora_spec(self) -> dict[str, Any] | None:
        """How to rebuild the adapters a LoRA checkpoint's weights belong to."""
        if self.hparams.trainable != "lora":
            return None
        hp = self.hparams
        return {"rank": hp.lora_rank, "alpha": hp.lora_alpha,
                "targets": list(lora_targets_for(hp.lora_targets, self.editor.denoiser_name))}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY) or {}
        self.ema = {k: v.clone() for k, v in meta["ema"].items()} if meta.get("ema") else None
        self.nonfinite.skipped = int(meta.get("nonfinite_skipped", 0))

    # ---------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        path = self.export_path()  # on every rank: trainer.log_dir is a collective under DDP
        if is_sharded(self.denoiser):  # gather the trained weights whole (a collective: every rank)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.trainer.is_global_zero:
                trained = self.trainable_parameters().keys()
                self.export(path, trained={k: v for k, v in full.items() if k in trained})
        elif self.trainer.is_global_zero and self.reduced_base and not self.hparams.export_lora_only:
            # the frozen base was held in half precision or fp8: the export rebuilds it whole from the spec
            trained = self.ema or {k: v.detach() for k, v in self.trainable_parameters().items()}
            self.export(path, trained=dict(trained))
        elif self.trainer.is_global_zero:
            self.export(path)

    def export_path(self) -> Path:
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "editor"

    @torch.no_grad()
    def export(self, directory: str | os.PathLike, trained: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the editor as a pipeline folder (EMA weights when EMA is on). ``trained``: the
        trained weights, gathered, when this module's are sharded; a whole editor is then rebuilt
        from the spec to hold them, as ``InsV2VPipeline.from_checkpoint`` does."""
        if trained is not None:
            require_finite(trained, "the editor")
            self._save_editor(editor_from_weights(self.hparams.editor, self._lora_spec(), trained), directory)
            return Path(directory)
        params = self.trainable_parameters()
        require_finite(dict(self.ema or params), "the editor")
        saved = None
        if self.ema:
            saved = {k: p.detach().clone() for k, p in params.items()}
            for k, p in params.items():
                p.copy_(self.ema[k].to(p.device, p.dtype))
        try:
            self._save_editor(self._complete_editor(), directory)
        finally:
            if saved:
                for k, p in params.items():
                    p.copy_(saved[k])
        return Path(directory)

    def _complete_editor(self):
        """The editor with every weight: a run on cached latents reads its VAE now, from the spec
        (not for an adapter exported alone, which needs none)."""
        if not self.hparams.cached_latents or self.editor.vae is None or (
                self.hparams.trainable == "lora" and self.hparams.export_lora_only):
            return self.editor
        from dataclasses import replace

        return replace(self.editor, vae=load_vae(self.hparams.editor))

    def _save_editor(self, editor, directory: str | os.PathLike) -> None:
        """With LoRA, the adapter alone or a copy of the editor with the adapter merged (training
        goes on with the adapter unmerged); else the editor as it is."""
        if self.hparams.trainable != "lora":
            editor.save_pretrained(directory)
            return
        if self.hparams.export_lora_only:
            save_lora(editor.denoiser, directory, prefix=editor.denoiser_name)
            return
        import copy
        from dataclasses import replace

        merged = {editor.denoiser_name: merge_lora(copy.deepcopy(editor.denoiser))}
        replace(editor, **merged).save_pretrained(directory)
