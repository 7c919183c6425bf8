"""LoRA: only adapters train, merged equals unmerged, checkpoints are small and edit, diffusers' LoRA file round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from test_train import trainer  # noqa: F401  (a Trainer that checkpoints every step)

from infer import InsV2VPipeline
from model.lora import LORA_WEIGHTS, merge_lora
from shard_fixtures import write_shards
from train import EditorModule, ShardDataModule
from guards import HANG_GUARD


def probe(editor, seed=0):
    """One U-Net prediction on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    c = editor.unet.config
    shape = (1, c.out_channels, 4, 4, 4)
    noisy, cond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    text = editor.encode_text(["make it red"])
    with torch.no_grad():
        return editor.predict(noisy, cond, text, torch.tensor([500]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_shards(root / "shards", 4, per_shard=2)
    module = EditorModule(editor="tiny", trainable="lora", lora_rank=4, lr=1e-2, seed=0)
    before = {k: v.detach().clone() for k, v in module.unet.state_dict().items()}
    data = ShardDataModule(shards=str(root / "shards"), num_frames=4, resolution=16, batch_size=2, batches_per_epoch=3,
                           stream_seed=0)
    trainer(root, 3).fit(module, data)
    return module, before, root


def test_only_the_adapters_train(trained):
    module, before, _ = trained
    after = module.unet.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)  # B starts at zero: the adapter now does something
    assert all(".lora_" in k for k in module.trainable_parameters())
    assert module.counts.trainable < 0.1 * module.counts.total


def test_merged_equals_unmerged_and_the_checkpoint_edits(trained, tmp_path):
    module, _, root = trained
    unmerged = probe(module.editor)
    merged_editor = copy.deepcopy(module.editor)
    merge_lora(merged_editor.unet)
    assert not any("lora_" in k for k in merged_editor.unet.state_dict())
    torch.testing.assert_close(probe(merged_editor), unmerged, atol=1e-5, rtol=0)
    base = probe(InsV2VPipeline.from_pretrained("tiny").editor)
    assert (base - unmerged).abs().max() > 1e-4  # the adapter changed the prediction
    # the checkpoint holds the adapters only, and from_checkpoint applies them
    checkpoint = torch.load(root / "ckpt/last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    pipe = InsV2VPipeline.from_checkpoint(root / "ckpt/last.ckpt")
    torch.testing.assert_close(probe(pipe.editor), unmerged, atol=1e-5, rtol=0)
    frames = torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8).numpy()
    assert pipe(frames, "make it red", num_inference_steps=1).frames.shape == (4, 16, 16, 3)


def test_export_merged_or_as_a_diffusers_lora_file(trained, tmp_path):
    module, _, _ = trained
    unmerged = probe(module.editor)
    module.export(tmp_path / "merged")
    torch.testing.assert_close(probe(InsV2VPipeline.from_pretrained(tmp_path / "merged").editor), unmerged,
                               atol=1e-5, rtol=0)
    assert any(".lora_" in k for k in module.unet.state_dict())  # training's copy keeps its adapter
    module.hparams.export_lora_only = True
    try:
        module.export(tmp_path / "adapter")
    finally:
        module.hparams.export_lora_only = False
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / LORA_WEIGHTS)
    assert weights and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in weights)
    pipe = InsV2VPipeline.from_pretrained("tiny").load_lora(tmp_path / "adapter", scale=1.0)
    torch.testing.assert_close(probe(pipe.editor), unmerged, atol=1e-5, rtol=0)
    off = InsV2VPipeline.from_pretrained("tiny").load_lora(tmp_path / "adapter", scale=0.0)
    torch.testing.assert_close(probe(off.editor), probe(InsV2VPipeline.from_pretrained("tiny").editor), atol=1e-6, rtol=0)


def test_lora_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="lora_targets match no layer"):
        EditorModule(editor="tiny", trainable="lora", lora_targets=[r".*no_such_layer"])


def test_lightning_fit_trains_a_lora_recipe(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    write_shards(tmp_path / "shards", 4, per_shard=2)
    overlay = tmp_path / "lora.yaml"
    overlay.write_text((root / "configs/insv2v-lora.yaml").read_text().replace("lora_rank: 64", "lora_rank: 4"))
    proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(root / "configs/tiny.yaml"),
                           "--config", str(overlay), "--data.shards", str(tmp_path / "shards"), "--trainer.max_steps", "2",
                           "--trainer.enable_progress_bar", "false", "--data.num_frames", "4",
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=HANG_GUARD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert all(".lora_" in k for k in checkpoint["state_dict"])
    exported = next((tmp_path / "run").rglob("editor/model_index.json")).parent
    pipe = InsV2VPipeline.from_pretrained(exported)  # the adapter merged: a plain editor folder
    assert not any("lora_" in k for k in pipe.editor.unet.state_dict())
