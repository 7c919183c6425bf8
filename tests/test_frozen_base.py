"""The frozen base in half precision or fp8, the time embedding in float32, activation offload, and
no text encoder on the device when a latent cache holds the text states."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from shard_fixtures import write_shards

from train import EditorModule, ShardDataModule


@pytest.fixture(scope="module")
def dit_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dit-shards")
    write_shards(folder, 4, per_shard=2, frames=9)
    return folder


def lora_module(**model) -> EditorModule:
    L.seed_everything(0)
    return EditorModule(**{"editor": "wan-tiny", "trainable": "lora", "lora_rank": 4, "objective": "flow", "lr": 1e-3,
                           **model})


class FirstGradients(L.Callback):
    """The trainable weights' gradients of the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {k: p.grad.detach().float().clone() for k, p in pl_module.named_parameters() if p.requires_grad}


def fit(module: EditorModule, shards: Path, tmp_path: Path, precision: str = "32-true", steps: int = 1,
        callbacks: list | None = None, **data):
    data = ShardDataModule(**{"shards": str(shards / "*.tar"), "num_frames": 9, "resolution": 32, "batch_size": 2,
                              "augment": False, **data})
    L.Trainer(accelerator="cpu", max_steps=steps, precision=precision, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=callbacks or []).fit(module, data)
    return module


def test_under_bf16_mixed_the_frozen_base_is_bf16_and_the_adapters_train_in_float32(tmp_path, dit_shards):
    module = fit(lora_module(), dit_shards, tmp_path, "bf16-mixed")
    keep = set(module.transformer._keep_in_fp32_modules)
    dtypes = {}
    for name, p in module.transformer.named_parameters():
        kind = "lora" if "lora_" in name else "fp32 part" if keep.intersection(name.split(".")) else "base"
        dtypes.setdefault(kind, set()).add(p.dtype)
    assert dtypes == {"lora": {torch.float32}, "fp32 part": {torch.float32}, "base": {torch.bfloat16}}
    state = module.trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert module.reduced_base
    # the export rebuilds the base whole, in float32, with the adapter merged
    from infer import InsV2VPipeline

    exported = InsV2VPipeline.from_pretrained(module.export_path())
    assert {p.dtype for p in exported.editor.transformer.parameters()} == {torch.float32}


def test_an_fp8_base_stores_frozen_linear_weights_in_fp8_and_trains_like_bf16(tmp_path, dit_shards):
    fp8 = lora_module(base_dtype="float8_e4m3fn")
    bf16 = lora_module(base_dtype="bfloat16")
    grads = {}
    for name, module in (("fp8", fp8), ("bf16", bf16)):
        seen = FirstGradients()
        fit(module, dit_shards, tmp_path / name, "bf16-mixed", steps=1, callbacks=[seen])
        grads[name] = torch.cat([g.flatten() for _, g in sorted(seen.grads.items())])
    stored = {n: m.weight.dtype for n, m in fp8.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {d for n, d in stored.items() if n.endswith("base_layer")} == {torch.float8_e4m3fn}
    assert {d for n, d in stored.items() if "lora_" in n} == {torch.float32}
    assert fp8.transformer.patch_embedding.weight.dtype == torch.bfloat16  # embeddings and norms stay bf16
    assert all(p.dtype != torch.float8_e4m3fn for n, p in fp8.transformer.named_parameters() if "norm" in n)
    # the same step's adapter gradients: fp8 storage (3 mantissa bits) bends them, but they point the same way
    cosine = torch.nn.functional.cosine_similarity(grads["fp8"], grads["bf16"], dim=0)
    assert cosine > 0.95 and not torch.equal(grads["fp8"], grads["bf16"]), float(cosine)


def test_the_time_embedding_runs_in_float32_under_autocast():
    module = lora_module()
    embedder = module.transformer.condition_embedder.time_embedder
    seen = {}
    embedder.linear_1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedder(torch.randn(2, module.transformer.config.freq_dim))
    assert seen["dtype"] == torch.float32
    assert "condition_embedder.time_embedder.linear_1.weight" in module.transformer.state_dict()  # keys unchanged


def test_activation_offload_gives_the_plain_steps_gradients(tmp_path, dit_shards):
    weights = {}
    for offload in (False, True):
        module = fit(lora_module(activation_offload=offload, gradient_checkpointing=True), dit_shards,
                     tmp_path / str(offload), steps=2)
        weights[offload] = {k: p.detach() for k, p in module.transformer.named_parameters() if p.requires_grad}
    assert all(torch.equal(weights[True][k], v) for k, v in weights[False].items())


def test_a_cache_with_text_states_keeps_the_text_encoder_off_the_device(tmp_path, dit_shards):
    from synth.cache import cache

    cache(str(dit_shards / "*.tar"), "wan-tiny", tmp_path / "latents", num_frames=9, resolution=32, text=True,
          samples_per_shard=4, progress=False)
    module = lora_module(cached_latents=True)
    moved = []
    module.editor.text_encoder.register_forward_pre_hook(lambda *a: moved.append("called"))
    original_to = module.editor.text_encoder.to

    def to(*args, **kwargs):
        moved.append("moved")
        return original_to(*args, **kwargs)

    module.editor.text_encoder.to = to
    data = ShardDataModule(cached=str(tmp_path / "latents"), num_frames=9, resolution=32, batch_size=2)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    assert "text_encoder" not in dict(module.named_children()) and moved == []
    assert module.vae is None  # nor a VAE: the cache holds the latents


def test_lora_targets_may_include_the_feed_forward_layers():
    attention = lora_module()
    both = lora_module(lora_targets="attention+ffn")
    wrapped = {n.split(".lora_")[0] for n, p in both.transformer.named_parameters() if p.requires_grad}
    assert any(n.endswith("ffn.net.0.proj") for n in wrapped) and any(n.endswith("ffn.net.2") for n in wrapped)
    assert both.counts.trainable > attention.counts.trainable
    assert both._lora_spec()["targets"][-1].endswith(r"ffn\.(net\.0\.proj|net\.2)")
    with pytest.raises(ValueError, match="attention\\+ffn"):
        lora_module(lora_targets="everything")


def test_an_fp8_base_needs_adapters_to_train():
    with pytest.raises(ValueError, match="needs trainable: lora"):
        EditorModule(editor="wan-tiny", trainable="all", objective="flow", base_dtype="float8_e4m3fn")


@pytest.mark.parametrize("editor", ["wan-tiny", "tiny"])
def test_block_swap_gives_the_plain_steps_gradients(dit_shards, editor):
    """model.blocks_to_swap: the first blocks are FSDP2 units with its CPU offload policy (one rank,
    gloo): the same loss and trained gradients as the plain module, for the DiT's adapters and the
    U-Net's motion modules. The memory it saves is a GPU's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.tensor import DTensor

    from train.strategies import editor_blocks, shard_editor

    data = ShardDataModule(shards=str(dit_shards / "*.tar"), num_frames=9 if editor == "wan-tiny" else 8,
                           resolution=32, batch_size=2, augment=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def build():
        if editor == "wan-tiny":
            return lora_module(gradient_checkpointing=True)
        L.seed_everything(0)
        return EditorModule(editor="tiny", trainable="motion", gradient_checkpointing=True)

    plain, swapped = build(), build()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        blocks = editor_blocks(swapped.denoiser)
        shard_editor(swapped.denoiser, None, init_device_mesh("cpu", (1,)), blocks_to_swap=2)
        policies = [type(b._get_fsdp_state()._fsdp_param_group.offload_policy) for b in blocks]
        assert policies[:2] == [CPUOffloadPolicy] * 2 and CPUOffloadPolicy not in policies[2:]
        grads, losses = {}, {}
        for name, module in (("plain", plain), ("swapped", swapped)):
            loss = module.loss(batch, torch.Generator().manual_seed(0))
            loss.backward()
            losses[name] = loss.item()
            grads[name] = {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                           for k, p in module.denoiser.named_parameters() if p.requires_grad}
        with pytest.raises(ValueError, match=f"blocks_to_swap must be between 0 and the {len(blocks)} blocks"):
            shard_editor(build().denoiser, None, init_device_mesh("cpu", (1,)), blocks_to_swap=len(blocks) + 1)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="blocks_to_swap must be between 0 and the 2 blocks, got 3"):
        lora_module(blocks_to_swap=3)  # refused when the module is built, before any training
    assert losses["plain"] == losses["swapped"]
    assert grads["plain"].keys() == grads["swapped"].keys()
    # FSDP2 hands gradients through its own buffers: float32 rounding at most
    assert all(torch.allclose(grads["plain"][k], grads["swapped"][k], rtol=1e-5, atol=1e-9) for k in grads["plain"])
    swapped_names = {n for n, m in plain.denoiser.named_modules() if m in editor_blocks(plain.denoiser)[:2]}
    assert any(g.abs().sum() > 0 for k, g in grads["plain"].items() if any(k.startswith(f"{n}.") for n in swapped_names))


def test_block_swap_trains_from_the_command_line_as_the_plain_run(tmp_path, dit_shards):
    """One device, bf16-mixed, fp8 base: `--trainer.strategy editor_fsdp --model.blocks_to_swap 1`
    ends two steps with the plain run's adapter weights; without the strategy it is one line, exit 2."""
    import os
    import subprocess
    import sys

    from guards import HANG_GUARD

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "train", "fit", "--config", str(root / "configs/tiny.yaml"),
            "--data.shards", f"{dit_shards}/*.tar", "--data.num_frames", "5", "--model.editor", "wan-tiny",
            "--model.objective", "flow", "--model.trainable", "lora", "--model.lora_rank", "4", "--model.lr", "1e-2",
            "--model.gradient_checkpointing", "true", "--model.base_dtype", "float8_e4m3fn",
            "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
    runs = {"plain": [], "swapped": ["--trainer.strategy", "editor_fsdp", "--model.blocks_to_swap", "1"],
            "no strategy": ["--model.blocks_to_swap", "1"]}
    done = {}
    for name, extra in runs.items():
        done[name] = subprocess.run(args + extra + ["--trainer.default_root_dir", str(tmp_path / name)], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=HANG_GUARD,
                                    env={**os.environ, "WANDB_MODE": "offline"})
    assert done["plain"].returncode == 0 and done["swapped"].returncode == 0, done["swapped"].stderr[-3000:]
    weights = {name: torch.load(tmp_path / name / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
               for name in ("plain", "swapped")}
    assert weights["plain"].keys() == weights["swapped"].keys()
    assert all(torch.equal(weights["plain"][k], weights["swapped"][k]) for k in weights["plain"])
    assert any(v.abs().max() > 0 for k, v in weights["plain"].items() if "lora_B" in k)  # it trained
    refused = done["no strategy"]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("lightning: error: model.blocks_to_swap needs "
                                                              "--trainer.strategy editor_fsdp")
    assert not (tmp_path / "no strategy" / "checkpoints").exists()
