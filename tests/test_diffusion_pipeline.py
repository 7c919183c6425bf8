"""InsV2VPipeline as a diffusers pipeline: loading through DiffusionPipeline, folders and checkpoints
written before that still loading to the same edit, CPU offload, progress configuration and the step
callback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from infer import InsV2VPipeline
from model import Editor

# An editor folder and a training checkpoint written by the code before editors were diffusers
# pipelines (x0 prediction with the source prior, preconditioned, the authors' norm layout, sampling
# defaults), the clip they edited, and their edits then.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "editor-v1"
pytestmark = pytest.mark.reference
SETTINGS = dict(clip_frames=6, reference_frames=2, lvsc=0.5, resolution=32)


# Float results differ across CPUs, SIMD paths and thread counts (ATEN_CPU_CAPABILITY=default against
# AVX2 moved these latents by 1e-6): an edit is compared with the stored one within these bounds, and
# exactly only with another edit computed in the same process.
FRAME_LEVELS = 2  # uint8 levels: a latent at a rounding boundary flips a pixel by one
LATENT_RTOL = 1e-4  # of the latents' largest magnitude, 100x the spread measured across kernels


def edit(pipe, **options):
    source = np.load(FIXTURE / "source.npy")
    return pipe(source, "make it snowy", generator=torch.Generator().manual_seed(3), **{"progress": False, **SETTINGS, **options}).frames


def edit_with_latents(pipe) -> tuple[np.ndarray, np.ndarray]:
    """The edit and each clip's final latents, concatenated over frames."""
    final = []

    def keep(p, step, timestep, tensors):
        if step == p.editor.sampling["num_inference_steps"] - 1:
            final.append(tensors["latents"].clone())
        return tensors

    return edit(pipe, callback_on_step_end=keep), torch.cat(final, dim=2).numpy()


def assert_matches_stored(frames: np.ndarray, name: str, latents: np.ndarray | None = None) -> None:
    """``frames`` (and ``latents``) against the fixture's stored edit, within the bounds above."""
    expected = np.load(FIXTURE / f"edited-{name}.npy")
    assert frames.shape == expected.shape, name
    diff = np.abs(frames.astype(int) - expected)
    assert diff.max() <= FRAME_LEVELS and (diff > 0).mean() < 0.01, (
        f"{name}: frames differ from the stored edit by up to {diff.max()}/255 at {(diff > 0).mean():.2%} of pixels; "
        f"allowed: {FRAME_LEVELS}/255 (float rounding across CPUs) at under 1%")
    if latents is not None:
        stored = np.load(FIXTURE / f"latents-{name}.npy")
        error = np.abs(latents - stored).max() / np.abs(stored).max()
        assert latents.shape == stored.shape and error < LATENT_RTOL, (
            f"{name}: latents differ from the stored ones by {error:.2e} of their range; allowed {LATENT_RTOL:g} "
            f"(float arithmetic across CPUs)")


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    # diffusers copies a folder's pipeline module into its modules cache: keep it in the test's folder
    import diffusers.utils.constants as constants
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(constants, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_folders_and_checkpoints_written_before_still_load_to_the_same_edit():
    index = json.loads((FIXTURE / "editor" / "model_index.json").read_text())
    assert index["_class_name"] == "InsV2VEditor"  # the old layout
    for name, pipe in (("editor", InsV2VPipeline.from_pretrained(FIXTURE / "editor")),
                       ("checkpoint", InsV2VPipeline.from_checkpoint(FIXTURE / "last.ckpt"))):
        frames, latents = edit_with_latents(pipe)
        assert_matches_stored(frames, name, latents)
    assert pipe.config.norm_layout == "insv2v" and pipe.config.sampling["num_inference_steps"] == 3


def test_diffusion_pipeline_from_pretrained_returns_the_pipeline_and_the_same_edit(tmp_path):
    pipe = InsV2VPipeline.from_pretrained(FIXTURE / "editor")
    expected = edit(pipe)  # this process's edit: every reload below must give it exactly
    assert_matches_stored(expected, "editor")
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "InsV2VPipeline"] and index["unet"] == ["diffusers", "UNetMotionModel"]
    assert (index["source_prior_std"], index["preconditioned"], index["norm_layout"]) == (0.5, True, "insv2v")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert isinstance(loaded, InsV2VPipeline) and type(loaded) is InsV2VPipeline
    assert np.array_equal(edit(loaded), expected)
    assert np.array_equal(edit(InsV2VPipeline.from_pretrained(tmp_path / "saved")), expected)
    # an exported editor (training writes it with Editor.save_pretrained) is the same kind of folder
    Editor.from_pretrained(tmp_path / "saved").save_pretrained(tmp_path / "exported")
    assert np.array_equal(edit(DiffusionPipeline.from_pretrained(tmp_path / "exported", trust_remote_code=True)), expected)
    pixel = InsV2VPipeline.from_pretrained("tiny-pixel")  # no VAE: an optional component
    pixel.save_pretrained(tmp_path / "pixel")
    assert DiffusionPipeline.from_pretrained(tmp_path / "pixel", trust_remote_code=True).vae is None


def test_model_cpu_offload_places_and_moves_components_as_diffusers_does():
    expected = edit(InsV2VPipeline.from_pretrained(FIXTURE / "editor"))
    pipe = InsV2VPipeline.from_pretrained(FIXTURE / "editor")
    pipe.enable_model_cpu_offload(device="cpu")  # the same hooks a GPU gets, executing on the CPU here
    hooks = {name: type(getattr(getattr(pipe, name), "_hf_hook", None)).__name__ for name in ("text_encoder", "unet", "vae")}
    assert hooks == {"text_encoder": "CpuOffload", "unet": "CpuOffload", "vae": "CpuOffload"}
    assert pipe._execution_device.type == "cpu"
    assert np.array_equal(edit(pipe), expected)


def test_progress_configuration_and_the_step_callback(capsys):
    pipe = InsV2VPipeline.from_pretrained(FIXTURE / "editor")
    seen = []

    def watch(p, step, timestep, tensors):
        assert p is pipe
        seen.append((step, int(timestep), tuple(tensors["latents"].shape)))
        return tensors

    expected = edit(pipe)
    pipe.set_progress_bar_config(disable=True)
    capsys.readouterr()
    watched = edit(pipe, progress=True, callback_on_step_end=watch)
    assert "editing" not in capsys.readouterr().err  # the configured bar is off
    assert np.array_equal(watched, expected)  # watching changes nothing
    # 10 frames in clips of 6 with 2 references: 2 clips, 3 steps each (the editor's sampling default)
    assert [s for s, _, _ in seen] == [0, 1, 2, 0, 1, 2] and seen[0][2] == (1, 4, 6, 16, 28)

    def shift(p, step, timestep, tensors):  # what the callback returns is what sampling goes on with
        return {"latents": tensors["latents"] - 0.5} if step == 2 else tensors

    assert np.abs(edit(pipe, callback_on_step_end=shift).astype(int) - watched).mean() > 5
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        edit(pipe, callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["noise_pred"])
