"""`python -m train.memory`: weights by dtype, trainable state and activations measured by running the
step on the meta device, checked against the same step run for real at tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from model import load_editor, shipped_config
from train.memory import GIB, main, measure_activations, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_meta_measurement_is_what_a_real_step_saves(checkpointing):
    config = shipped_config("model/wan-tiny.yaml")
    sizes = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        editor = load_editor({**config, "meta": device == "meta"})
        if checkpointing:
            editor.transformer.enable_gradient_checkpointing()
        editor.transformer.requires_grad_(True)
        sizes[device] = measure_activations(editor, 2, 9, 32, 32, torch.float32,
                                            device=next(editor.transformer.parameters()).device)
    assert sizes["cpu"] == sizes["meta"] and sizes["cpu"].total > 0
    if checkpointing:  # a block recomputed in backward holds its own saved tensors meanwhile
        assert sizes["cpu"].one_block > 0


def test_checkpointing_and_half_precision_shrink_the_measured_activations():
    model = {"editor": "wan-tiny", "trainable": "lora", "lora_rank": 4}
    data = {"num_frames": 9, "resolution": 32, "batch_size": 2}
    plain = plan(model, data, "32-true")
    checkpointed = plan({**model, "gradient_checkpointing": True}, data, "32-true")
    half = plan({**model, "gradient_checkpointing": True}, data, "bf16-mixed")
    assert checkpointed.activations.total < plain.activations.total
    assert half.activations.outside_blocks < checkpointed.activations.outside_blocks  # bf16 block inputs
    assert {k.split()[1] for k in half.weights if k.startswith("transformer")} <= {"bfloat16", "float32"}
    assert half.trainable == plain.trainable and half.trainable_state == 16 * half.trainable
    cached = plan({**model, "gradient_checkpointing": True}, {**data, "cached": "somewhere"}, "bf16-mixed")
    assert not any(k.startswith(("text_encoder", "vae")) for k in cached.weights)
    fp8 = plan({**model, "gradient_checkpointing": True, "base_dtype": "float8_e4m3fn"}, data, "bf16-mixed")
    assert "transformer float8_e4m3fn" in fp8.weights
    unet = plan({"editor": "tiny", "trainable": "motion", "gradient_checkpointing": True}, {**data, "num_frames": 8},
                "bf16-mixed")  # the U-Net editor too: its motion modules train, its 2D layers are held in bf16
    assert unet.trainable > 0 and unet.activations.total > 0 and "unet bfloat16" in unet.weights


def test_the_command_prints_the_plan_and_ends_with_the_total(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"precision": "bf16-mixed"},
                                      "model": {"editor": "wan-tiny", "trainable": "lora", "lora_rank": 4,
                                                "gradient_checkpointing": True},
                                      "data": {"num_frames": 9, "resolution": 32, "batch_size": 2}}))
    assert main(["--config", str(config), "--gpu-gib", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("total ") and out[-1].endswith(" GiB") and any("activations (measured)" in l for l in out)
    assert sum(l.strip().startswith("fits") for l in out) == 8  # a tiny model fits 1 GiB in every combination
    assert main(["--config", str(ROOT / "configs/lucy-lora.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FILL_ME" in err[0] and "--editor" in err[0]


def test_the_lucy_recipe_at_its_own_size_fits_24_gib_with_a_stated_setting():
    """Lucy Edit's 5B layout (meta device) at 81 x 480 x 832: the recipe as given, and with a cache."""
    config = yaml.safe_load((ROOT / "configs/lucy-lora.yaml").read_text())
    layout = ROOT / "configs/model/wan2.2-ti2v-5b-random.yaml"
    size = dict(frames=81, height=480, width=832)
    given = plan(config["model"], config["data"], config["trainer"]["precision"], str(layout), **size)
    cached = plan(config["model"], config["data"], "bf16-mixed", str(layout), cached=True, **size)
    assert 40e6 < given.trainable < 60e6  # rank-32 adapters on attention
    assert given.weights["transformer bfloat16"] > 9 * GIB and cached.total < 24 * GIB < given.total
    # or the raw clips with blocks swapped to CPU: each swapped block leaves the device but two in flight
    swapped = given.with_settings(blocks_to_swap=12)
    assert swapped.total < 24 * GIB and len(given.block_weights) == 30
    moved = 10 * given.block_weights[0] + 16 * sum(given.block_trainable[:12])  # adapters step on the CPU
    assert given.total - swapped.total == pytest.approx(moved, rel=0.01)


def test_an_fp8_base_counts_the_bf16_copies_its_layers_keep_for_backward():
    """Layerwise casting hands each layer a bf16 copy of its fp8 weight; the copies a block's
    backward needs are activations, and the meta count equals the real step's."""
    from model.lora import add_lora, lora_targets
    from train.precision import hold_frozen, store_in_fp8

    config = shipped_config("model/wan-tiny.yaml")
    sizes = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        editor = load_editor({**config, "meta": device == "meta"})
        add_lora(editor.transformer, 4, 4, lora_targets(None, "transformer"))
        editor.transformer.enable_gradient_checkpointing()
        hold_frozen(editor.transformer, torch.bfloat16)
        store_in_fp8(editor.transformer)
        for name, param in editor.transformer.named_parameters():  # as autocast computes them (a CPU needs one dtype)
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
        sizes[device] = measure_activations(editor, 2, 9, 32, 32, torch.bfloat16,
                                            device=next(editor.transformer.parameters()).device)
        copies = sum(m.weight.numel() * 2 for n, m in editor.transformer.blocks[0].named_modules()
                     if n.endswith("base_layer") and n.startswith("attn1"))
    assert sizes["cpu"] == sizes["meta"] and sizes["meta"].one_block > copies > 0


def test_swapped_blocks_leave_the_device_and_the_plan_names_the_fewest_that_fit(tmp_path, capsys):
    model = {"editor": "wan-tiny", "trainable": "lora", "lora_rank": 4, "gradient_checkpointing": True}
    data = {"num_frames": 9, "resolution": 32, "batch_size": 2}
    whole = plan(model, data, "bf16-mixed", blocks_to_swap=0)
    both = plan({**model, "blocks_to_swap": 2}, data, "bf16-mixed")
    assert both.blocks_to_swap == 2 and both.settings["blocks_to_swap"] == 2
    assert both.swapped == 0 and both.total < whole.total  # two blocks are both in flight: only the adapters' state moves
    assert whole.trainable_state - both.trainable_state == 16 * sum(whole.block_trainable)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"precision": "bf16-mixed"}, "model": {**model, "blocks_to_swap": 3},
                                      "data": data}))
    assert main(["--config", str(config)]) == 2
    assert "blocks_to_swap must be between 0 and the 2 blocks, got 3" in capsys.readouterr().err
