"""The DiT editor: Lucy Edit folders edit as diffusers' own pipeline does, Wan bases start as themselves,
causal clips stitch on whole latent frames, and it trains (flow matching, LoRA, cache) and edits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LucyEditPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image
from shard_fixtures import write_shards

from infer import InsV2VPipeline
from infer.sampling import latent_count, stream_clips
from model import WanEditor, load_editor, shipped_config
from model.wan_editor import build_wan_editor
from train import EditorModule, ShardDataModule
from guards import HANG_GUARD

PROMPT = "make the sky red"


@pytest.fixture(scope="module")
def tiny() -> WanEditor:
    return load_editor("wan-tiny")


@pytest.fixture(scope="module")
def lucy_folder(tiny, tmp_path_factory) -> Path:
    """A diffusers LucyEditPipeline folder with the tiny editor's random weights and tokenizer."""
    folder = tmp_path_factory.mktemp("lucy") / "lucy-edit"
    transformer = build_wan_editor(shipped_config("model/wan-tiny.yaml")).transformer
    with torch.no_grad():  # a prompt that matters: at random initialisation cross-attention barely moves the output
        for block in transformer.blocks:
            block.attn2.to_out[0].weight.mul_(30.0)
    LucyEditPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae, scheduler=tiny.scheduler,
                     transformer=transformer).save_pretrained(folder)
    return folder


# Lucy-Edit-Dev's own scheduler_config.json: UniPC in flow mode at Wan's 480p shift
LUCY_EDIT_DEV_SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0,
                           "num_train_timesteps": 1000, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                           "lower_order_final": True, "final_sigmas_type": "zero", "timestep_spacing": "linspace"}


@pytest.fixture(scope="module")
def lucy_dev_folder(lucy_folder, tmp_path_factory) -> Path:
    """The tiny Lucy folder with Lucy-Edit-Dev's scheduler as published (UniPC, flow_shift 5)."""
    import shutil

    from diffusers import UniPCMultistepScheduler

    folder = tmp_path_factory.mktemp("lucy-dev") / "lucy-edit-dev"
    shutil.copytree(lucy_folder, folder)
    shutil.rmtree(folder / "scheduler")
    UniPCMultistepScheduler(**LUCY_EDIT_DEV_SCHEDULER).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return folder


def video(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern (VAE-friendly), uint8 ``(F, H, W, 3)``."""
    y, x = np.mgrid[0:height, 0:width]
    out = [np.stack([np.sin((x + 2 * t + seed) / 5), np.cos((y - t) / 7), np.sin((x + y + 3 * t) / 9)], -1)
           for t in range(frames)]
    return ((np.stack(out) + 1) * 127.5).astype(np.uint8)


def lucy_edit(folder: Path, frames: np.ndarray, latents: torch.Tensor, guidance: float, steps: int = 4,
              output_type: str = "np", lora: Path | None = None):
    pipe = LucyEditPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(video=[Image.fromarray(f) for f in frames], prompt=PROMPT, height=frames.shape[1], width=frames.shape[2],
               num_frames=len(frames), num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
               output_type=output_type).frames
    return out if output_type == "latent" else out[0] * 255.0


def edit_keeping_latents(pipe: InsV2VPipeline, frames: np.ndarray, latents: torch.Tensor, guidance: float,
                         steps: int = 4) -> tuple[np.ndarray, torch.Tensor]:
    """An edit at video guidance 1 (Lucy Edit's one-scale CFG) and its final latents."""
    final = {}

    def keep(pipe, step, t, tensors):
        final["latents"] = tensors["latents"].clone()

    out = pipe(frames, PROMPT, num_inference_steps=steps, text_guidance=guidance, video_guidance=1.0, clip_frames=9,
               reference_frames=5, latents=latents, callback_on_step_end=keep, progress=False).frames
    return out, final["latents"]


@pytest.mark.reference
@pytest.mark.parametrize("expand_timesteps,scheduler", [(False, "euler"), (True, "euler"), (False, "lucy-edit-dev")])
def test_a_lucy_edit_folder_edits_as_diffusers_own_pipeline(lucy_folder, lucy_dev_folder, tmp_path, expand_timesteps,
                                                            scheduler):
    """A Lucy Edit folder with a flow Euler scheduler, one with Wan2.2-TI2V's per-token timesteps
    (expand_timesteps), and one with Lucy-Edit-Dev's own scheduler (UniPC, flow_shift 5)."""
    if scheduler == "lucy-edit-dev":
        lucy_folder = lucy_dev_folder
    if expand_timesteps:
        import shutil

        shutil.copytree(lucy_folder, tmp_path / "lucy")
        index = json.loads((tmp_path / "lucy" / "model_index.json").read_text())
        (tmp_path / "lucy" / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
        lucy_folder = tmp_path / "lucy"
    frames = video(9)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    pipe = InsV2VPipeline.from_pretrained(lucy_folder)
    assert isinstance(pipe.editor, WanEditor) and pipe.editor.max_sequence_length == 512
    assert dict(pipe.scheduler.config) == dict(LucyEditPipeline.from_pretrained(lucy_folder).scheduler.config)
    assert pipe.editor.expand_timesteps == expand_timesteps and LucyEditPipeline.from_pretrained(
        lucy_folder).config.expand_timesteps == expand_timesteps
    ours = {}
    for guidance in (5.0, 1.5):
        edited, ours[guidance] = edit_keeping_latents(pipe, frames, latents, guidance)
        reference = lucy_edit(lucy_folder, frames, latents, guidance)
        assert edited.shape == reference.shape
        # frames within 1/255: ours are rounded to uint8, diffusers' are floats
        assert np.abs(edited - reference).max() <= 1.0, (guidance, np.abs(edited - reference).max())
        theirs = lucy_edit(lucy_folder, frames, latents, guidance, output_type="latent")
        error = (ours[guidance] - theirs).abs().max() / theirs.abs().max()
        assert error < 1e-4, f"latents {error:.2e} of their range from diffusers' (allowed 1e-4: batched passes sum in another order)"
    # the guidance scale moves the latents 50x more than the match's tolerance: the comparison can tell them apart
    assert (ours[5.0] - ours[1.5]).abs().max() > 50 * 1e-4 * ours[5.0].abs().max()
    if scheduler == "lucy-edit-dev":  # saved, and loaded through diffusers, with the folder's own sampler
        pipe.save_pretrained(tmp_path / "saved")
        for loaded in (InsV2VPipeline.from_pretrained(tmp_path / "saved"),
                       DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)):
            assert type(loaded.scheduler).__name__ == "UniPCMultistepScheduler"
            assert dict(loaded.scheduler.config) == dict(pipe.scheduler.config)


def test_video_guidance_adds_the_pass_without_the_source(tiny):
    """Three batched passes at video guidance != 1, combined by the two-scale equation; two at 1."""
    calls = []
    predict = tiny.predict

    def counting(noisy, condition, text, t):
        calls.append((noisy.shape[0], bool((condition == 0).flatten(1).all(1).any())))
        return predict(noisy, condition, text, t)

    editor = replace(tiny)
    editor.predict = counting
    pipe = InsV2VPipeline.from_editor(editor)
    for video_guidance, passes in ((1.0, 2), (1.5, 3)):
        calls.clear()
        pipe(video(5), PROMPT, num_inference_steps=2, text_guidance=4.0, video_guidance=video_guidance, clip_frames=5,
             reference_frames=1, generator=torch.Generator().manual_seed(0), progress=False)
        assert calls == [(passes, passes == 3)] * 2


@pytest.mark.reference
def test_a_wan_text_to_video_folder_starts_as_its_base_model(tmp_path):
    config = shipped_config("model/wan-tiny.yaml")
    base = WanTransformer3DModel(**{**config["transformer"], "in_channels": 4})
    tiny = build_wan_editor(config)
    folder = tmp_path / "wan-t2v"
    WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae, scheduler=tiny.scheduler,
                transformer=base).save_pretrained(folder)
    editor = load_editor(folder)
    assert editor.transformer.config.in_channels == 8 and editor.source_channels == 4
    generator = torch.Generator().manual_seed(0)
    noisy, source = torch.randn(2, 4, 3, 4, 6, generator=generator), torch.randn(2, 4, 3, 4, 6, generator=generator)
    text = torch.randn(2, 64, 32, generator=generator)
    with torch.no_grad():
        ours = editor.predict(noisy, source, text, torch.tensor([700.0, 80.0]))
        theirs = base(noisy, torch.tensor([700.0, 80.0]), text).sample
    error = (ours - theirs).abs().max()
    assert error < 1e-6, f"{error:.2e} from the base model (allowed 1e-6: a wider patch embedding sums in another order)"
    # and the source channels are there to learn: a nonzero weight on them changes the prediction
    with torch.no_grad():
        weight = editor.transformer.patch_embedding.weight
        weight[:, 4:] = torch.randn(weight[:, 4:].shape, generator=generator) * 0.1
        assert (editor.predict(noisy, source, text, torch.tensor([700.0, 80.0])) - theirs).abs().max() > 1e-3


def test_a_dit_editor_folder_round_trips_through_diffusers(tiny, tmp_path):
    folder = tmp_path / "dit"
    InsV2VPipeline.from_editor(tiny).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"] and index["unet"] == [None, None]
    frames = video(9)
    settings = dict(num_inference_steps=2, clip_frames=9, reference_frames=5, progress=False)
    expected = InsV2VPipeline.from_editor(tiny)(frames, PROMPT, generator=torch.Generator().manual_seed(3), **settings)
    for loaded in (InsV2VPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        assert type(loaded) is InsV2VPipeline and isinstance(loaded.editor, WanEditor)
        edited = loaded(frames, PROMPT, generator=torch.Generator().manual_seed(3), **settings)
        assert np.array_equal(edited.frames, expected.frames)
    assert loaded.editor.sampling_defaults()["clip_frames"] == 9  # the editor's own clip length travels with it


def test_a_chosen_clip_length_takes_a_legal_reference_count_unless_both_are_given(tiny, tmp_path, capsys):
    from infer.cli import main
    from infer import write_video

    pipe = InsV2VPipeline.from_editor(replace(tiny, sampling=None))
    assert pipe.settings("x").reference_frames == 9  # the DiT default: 81-frame clips, 9 references
    assert [pipe.settings("x", clip_frames=n).reference_frames for n in (5, 9, 13, 17, 41)] == [1, 5, 9, 9, 9]
    assert pipe.settings("x", clip_frames=13, reference_frames=5).reference_frames == 5  # given: kept
    unet = InsV2VPipeline.from_pretrained("tiny")
    assert [unet.settings("x", clip_frames=n).reference_frames for n in (2, 4, 5, 16)] == [1, 3, 4, 4]
    write_video(tmp_path / "in.mp4", video(9), fps=8)
    tiny.save_pretrained(tmp_path / "dit")
    common = ["edit", str(tmp_path / "in.mp4"), "--prompt", PROMPT, "--model", str(tmp_path / "dit"), "--steps", "1",
              "--quiet"]
    assert main(common + ["--clip-frames", "5", "-o", str(tmp_path / "out.mp4")]) == 0
    capsys.readouterr()
    assert main(common + ["--clip-frames", "9", "--reference-frames", "4", "-o", str(tmp_path / "bad.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 + 4k" in err[0] and not (tmp_path / "bad.mp4").exists()


def test_lvsc_reads_sigma_from_the_schedulers_own_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from infer.sampling import step_sigma

    unipc = UniPCMultistepScheduler(**LUCY_EDIT_DEV_SCHEDULER)
    unipc.set_timesteps(4)
    sigma = step_sigma(unipc, unipc.timesteps[1])
    assert sigma == pytest.approx(float(unipc.sigmas[1])) and unipc.timesteps.dtype == torch.int64
    assert abs(sigma - float(unipc.timesteps[1]) / 1000) > 1e-5  # integer timesteps: t / T is not the sigma
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(4)
    euler.step(torch.zeros(1), euler.timesteps[0], torch.zeros(1))
    assert step_sigma(euler, euler.timesteps[1]) == pytest.approx(float(euler.timesteps[1]) / 1000)


@pytest.mark.parametrize("clip_frames,reference_frames", [(9, 5), (13, 5), (17, 9)])
def test_causal_clips_share_whole_latent_frames(clip_frames, reference_frames):
    t = 4
    for total in range(1, 60):
        clips = list(stream_clips(range(total), clip_frames, reference_frames, temporal=t))
        new = [f for clip, window in clips for f in window[clip.num_reference: len(window) - clip.padding]]
        assert new == list(range(total)), total  # every frame is new once, in order
        for i, (clip, window) in enumerate(clips):
            assert (len(window) - 1) % t == 0 and len(window) <= clip_frames and clip.start % t == 0
            assert window[: len(window) - clip.padding] == list(range(clip.start, clip.stop))
            assert clip.padding == 0 or i == len(clips) - 1
            if i:  # latent frame j >= 1 covers frames start + t(j-1)+1 .. start + tj: the previous clip's last ones
                prev = clips[i - 1][0]
                refs = latent_count(clip.num_reference, t)
                assert clip.start + t * (refs - 1) == prev.stop - 1 + prev.padding
                assert (prev.stop + prev.padding - 1 - clip.start) % t == 0


def test_the_causal_vae_encodes_a_prefix_as_the_prefix_of_its_latents(tiny):
    """Why a cached clip's first 1 + k latent frames are the latents of its first 1 + 4k frames."""
    clip = torch.from_numpy(video(13)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        whole, prefix = tiny.encode_video(clip), tiny.encode_video(clip[:, :, :5])
    assert whole.shape[2] == 4 and prefix.shape[2] == 2
    assert (whole[:, :, :2] - prefix).abs().max() < 1e-5


def test_long_videos_stitch_on_reference_latents_and_keep_every_frame(tiny):
    """At LVSC 1 with the flow Euler sampler each clip's reference latents end exactly at their
    references: the previous clip's latents and its edited first frame encoded alone."""
    frames = video(45)
    finals = []

    def keep_last(pipe, step, t, tensors):
        if step == 1:
            finals.append(tensors["latents"].clone())
        return {}

    pipe = InsV2VPipeline.from_editor(tiny)
    out = pipe(frames, PROMPT, num_inference_steps=2, clip_frames=13, reference_frames=5, lvsc=1.0,
               generator=torch.Generator().manual_seed(0), callback_on_step_end=keep_last, progress=False).frames
    assert out.shape == frames.shape
    clips = [clip for clip, _ in stream_clips(range(45), 13, 5, temporal=4)]
    assert len(finals) == len(clips) == 5
    for i in range(1, len(clips)):
        refs = latent_count(clips[i].num_reference, 4)
        assert torch.allclose(finals[i][:, :, 1:refs], finals[i - 1][:, :, finals[i - 1].shape[2] - refs + 1:], atol=1e-5)
    # the first latent frame's reference: the previous clip's edit of that frame, encoded alone
    with torch.no_grad():
        offset = clips[1].start - clips[0].start
        anchor = tiny.encode_video(tiny.decode_latents(finals[0])[:, :, offset: offset + 1])
    assert torch.allclose(finals[1][:, :, :1], anchor.float(), atol=1e-5)


def fit(tmp_path: Path, shards: Path, steps: int, ckpt_path: str | None = None, **model) -> EditorModule:
    L.seed_everything(0)
    module = EditorModule(**{"editor": "wan-tiny", "trainable": "all", "objective": "flow", "flow_shift": 3.0,
                             "lr": 1e-3, "export_dir": str(tmp_path / "export"), **model})
    data = ShardDataModule(shards=str(shards / "*.tar"), num_frames=9, resolution=32, batch_size=2, augment=False)
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                                    every_n_train_steps=1)]).fit(module, data,
                                                                                                 ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def dit_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dit-shards")
    write_shards(folder, 4, per_shard=2, frames=9)
    return folder


def test_a_dit_editor_trains_with_flow_matching_and_its_checkpoint_edits(tmp_path, dit_shards):
    module = fit(tmp_path, dit_shards, 3)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    trained = {k for k, p in module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trained and all(k.startswith("transformer.") for k in trained)
    assert checkpoint["insv2v"]["objective"] == {"kind": "flow", "flow_shift": 3.0}
    pipe = InsV2VPipeline.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    weights = module.transformer.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.editor.transformer.state_dict().items())
    initial = load_editor("wan-tiny").transformer.state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in weights.items())
    edited = pipe(video(21), PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert edited.frames.shape == (21, 32, 48, 3)
    exported = InsV2VPipeline.from_pretrained(tmp_path / "export")
    assert all(torch.equal(v, weights[k]) for k, v in exported.editor.transformer.state_dict().items())


def test_a_noise_objective_or_a_motion_policy_is_refused_for_a_dit():
    with pytest.raises(ValueError, match="objective: flow"):
        EditorModule(editor="wan-tiny", trainable="all")
    with pytest.raises(ValueError, match="no motion modules"):
        EditorModule(editor="wan-tiny", trainable="motion", objective="flow")


def test_a_full_fine_tune_of_a_lucy_edit_folder_moves_every_transformer_weight(tmp_path, dit_shards, lucy_folder):
    module = fit(tmp_path, dit_shards, 1, editor=str(lucy_folder), lr=1e-3)
    initial = LucyEditPipeline.from_pretrained(lucy_folder).transformer.state_dict()
    trained = module.transformer.state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(moved) > 0.9 * len(initial)
    exported = InsV2VPipeline.from_pretrained(tmp_path / "export")
    assert all(torch.equal(v, trained[k]) for k, v in exported.editor.transformer.state_dict().items())


@pytest.mark.reference
def test_a_lora_fine_tune_of_lucy_edit_loads_in_diffusers_pipeline(tmp_path, dit_shards, lucy_dev_folder):
    """Fine-tuned from Lucy-Edit-Dev's folder as published, the checkpoint samples with the folder's
    UniPC at its shift, as the adapter does inside diffusers' pipeline."""
    lucy_folder = lucy_dev_folder
    module = fit(tmp_path, dit_shards, 2, editor=str(lucy_folder), trainable="lora", lora_rank=4, export_lora_only=True)
    assert all("lora_" in k for k, p in module.named_parameters() if p.requires_grad)
    assert module.counts.trainable > 0 and module.counts.trainable < module.counts.total / 5
    lora_file = tmp_path / "export" / "pytorch_lora_weights.safetensors"
    frames = video(9)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    theirs = lucy_edit(lucy_folder, frames, latents, 4.0, steps=3, output_type="latent", lora=lora_file)
    tuned = InsV2VPipeline.from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert type(tuned.scheduler).__name__ == "UniPCMultistepScheduler" and tuned.scheduler.config.flow_shift == 5.0
    edited, ours = edit_keeping_latents(tuned, frames, latents, 4.0, steps=3)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert np.abs(edited - lucy_edit(lucy_folder, frames, latents, 4.0, steps=3, lora=lora_file)).max() <= 1.0
    base = lucy_edit(lucy_folder, frames, latents, 4.0, steps=3, output_type="latent")
    assert (base - theirs).abs().max() > 10 * 1e-4 * theirs.abs().max()  # the adapter was applied: another edit


def test_a_bf16_mixed_step_with_gradient_checkpointing(tmp_path, dit_shards):
    module = fit(tmp_path, dit_shards, 1, gradient_checkpointing=True)
    assert module.transformer.gradient_checkpointing
    L.seed_everything(0)
    half = EditorModule(editor="wan-tiny", trainable="all", objective="flow", lr=1e-3)
    data = ShardDataModule(shards=str(dit_shards / "*.tar"), num_frames=9, resolution=32, batch_size=2, augment=False)
    before = {k: v.clone() for k, v in half.transformer.state_dict().items()}
    L.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path).fit(half, data)
    after = half.transformer.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_causal_latent_cache_trains_as_the_raw_clips_do(tmp_path, dit_shards):
    from synth.cache import cache
    from shards.cache import CachedDecoder
    from shards.pairs import PairDecoder
    from train.data import collate
    import webdataset as wds

    out = tmp_path / "cache"
    result = cache(str(dit_shards / "*.tar"), "wan-tiny", out, num_frames=9, resolution=32, progress=False)
    assert result.cached == 4
    samples = {s["__key__"]: s for s in wds.tarfile_to_samples()({"url": str(u)} for u in sorted(out.glob("*.tar")))}
    raw = {s["__key__"]: s for s in wds.tarfile_to_samples()({"url": str(u)} for u in sorted(dit_shards.glob("*.tar")))}
    keys = sorted(samples)[:2]
    rng = np.random.default_rng(0)
    cached_batch = collate([CachedDecoder(out, 5)(samples[k], rng) for k in keys])
    raw_batch = collate([PairDecoder(9, 1, 32, None)(raw[k], rng) for k in keys])  # the clips the cache encoded
    raw_batch = {**raw_batch, "source": raw_batch["source"][:, :, :5], "target": raw_batch["target"][:, :, :5]}
    assert cached_batch["tgt_mean"].shape[2] == 2  # 5 frames: 2 causal latent frames, the cached clip's first two
    settings = dict(editor="wan-tiny", trainable="all", objective="flow", drop_text=0.3, drop_both=0.2, drop_video=0.2)
    losses = [EditorModule(**settings, cached_latents=cached_latents).loss(batch, torch.Generator().manual_seed(0)).item()
              for cached_latents, batch in ((False, raw_batch), (True, cached_batch))]
    assert abs(losses[0] - losses[1]) < 1e-4, losses
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        CachedDecoder(out, 6)


def test_infer_edit_with_a_lucy_folder_keeps_every_frame_fps_and_audio(tmp_path, lucy_folder, capsys):
    from fractions import Fraction

    from test_video_io import write_input

    from infer.cli import main
    from infer.video import probe_video, read_video

    source = write_input(tmp_path / "in.mp4", list(video(30, 48, 64)), rate=Fraction(30000, 1001), audio="aac")
    out = tmp_path / "out.mp4"
    code = main(["edit", str(source), "--prompt", PROMPT, "--model", str(lucy_folder), "-o", str(out), "--steps", "2",
                 "--resolution", "32", "--clip-frames", "9", "--reference-frames", "5", "--motion-compensation",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    info = probe_video(out)
    assert info.num_frames == 30 and info.fps == Fraction(30000, 1001) and info.has_audio
    assert (info.width, info.height) == (48, 32) and len(read_video(out)) == 30  # sides on the DiT's 16-pixel grid
    code = main(["edit", str(source), "--prompt", PROMPT, "--model", str(lucy_folder), "-o", str(tmp_path / "bad.mp4"),
                 "--clip-frames", "8", "--reference-frames", "4", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 + 4k" in err[0] and not (tmp_path / "bad.mp4").exists()


def test_the_page_and_eval_edit_with_a_dit_editor(tmp_path, tiny, lucy_folder):
    from infer.cli import main
    from infer.serve import Editing, Limits
    from infer import write_video
    from infer.video import probe_video

    videos = tmp_path / "videos"
    videos.mkdir()
    clip = write_video(videos / "clip.mp4", video(12, 32, 32), 8)
    page = Editing(InsV2VPipeline.load(str(lucy_folder)), limits=Limits(max_seconds=5))  # as `infer serve --model` loads it
    edited, _ = page(str(clip), PROMPT, 4.0, 1.5, 2, True, False, 0, 32)
    assert probe_video(edited).num_frames == 12
    page.close()
    folder = tmp_path / "dit"
    tiny.save_pretrained(folder)
    (tmp_path / "edits.csv").write_text(f"video,instruction\nclip,{PROMPT}\n")
    code = main(["eval", "--videos", str(videos), "--instructions", str(tmp_path / "edits.csv"), "--out",
                 str(tmp_path / "eval"), "--model", str(folder), "--steps", "1", "--resolution", "32", "--quiet"])
    assert code == 0
    rows = (tmp_path / "eval" / "per_video.csv").read_text().splitlines()
    assert len(rows) > 1 and rows[1].startswith("clip,")


def test_per_frame_attention_keeps_frames_apart_with_the_same_weights():
    """The DiT's temporal ablation: each frame's prediction ignores the other frames, and the weights
    (hence a checkpoint) are those of the full editor."""
    config = shipped_config("model/shapes-dit.yaml")
    full, per_frame = build_wan_editor(config), build_wan_editor({**config, "per_frame_attention": True})
    assert all(torch.equal(a, b) for a, b in zip(full.transformer.state_dict().values(),
                                                 per_frame.transformer.state_dict().values()))
    generator = torch.Generator().manual_seed(0)
    noisy, source = torch.randn(1, 3, 4, 16, 16, generator=generator), torch.randn(1, 3, 4, 16, 16, generator=generator)
    text = full.encode_text(["make the background pink"])
    other = noisy.clone()
    other[:, :, 1:] = torch.randn(other[:, :, 1:].shape, generator=generator)  # every frame but the first changes
    with torch.no_grad():
        for editor, kept in ((per_frame, True), (full, False)):
            a, b = (editor.predict(z, source, text, torch.tensor([500.0])) for z in (noisy, other))
            assert torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-5) == kept
    folder_editor = InsV2VPipeline.from_editor(per_frame)
    assert folder_editor.editor.per_frame_attention


def test_a_resumed_dit_run_ends_with_the_same_weights(tmp_path, dit_shards):
    straight = fit(tmp_path / "a", dit_shards, 4, ema_decay=0.9)
    fit(tmp_path / "b", dit_shards, 2, ema_decay=0.9)
    resumed = fit(tmp_path / "b", dit_shards, 4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), ema_decay=0.9)
    a, b = straight.transformer.state_dict(), resumed.transformer.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((straight.ema[k] - resumed.ema[k]).abs().max().item() for k in straight.ema) < 1e-6
    fresh = load_editor("wan-tiny").transformer.state_dict()
    assert max((a[k] - fresh[k]).abs().max().item() for k in a) > 1e-4  # it did train


@pytest.mark.slow
def test_fsdp_over_dit_blocks_matches_ddp(tmp_path, dit_shards):
    """editor_fsdp shards each WanTransformerBlock (gloo, 2 CPU processes): the same 2 steps as DDP."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "train", "fit", "--config", str(root / "configs" / "tiny.yaml"),
            "--data.shards", f"{dit_shards}/*.tar", "--data.num_frames", "5", "--model.editor", "wan-tiny",
            "--model.objective", "flow", "--model.trainable", "all", "--trainer.max_steps", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.enable_progress_bar", "false"]
    weights = {}
    for strategy in ("ddp", "editor_fsdp"):
        proc = subprocess.run(args + ["--trainer.strategy", strategy, "--trainer.default_root_dir", strategy],
                              cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD,
                              env={**__import__("os").environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[strategy] = torch.load(next((tmp_path / strategy).rglob("last.ckpt")), weights_only=True)["state_dict"]
    initial = EditorModule(editor="wan-tiny", trainable="all", objective="flow").trainable_parameters()
    ddp, fsdp = weights["ddp"], weights["editor_fsdp"]
    assert fsdp.keys() == ddp.keys() == initial.keys() and all(k.startswith("transformer.") for k in initial)
    moved = torch.cat([(ddp[k] - initial[k]).flatten() for k in initial]).abs().mean()
    apart = torch.cat([(fsdp[k] - ddp[k]).flatten() for k in initial]).abs().mean()
    assert apart < 1e-3 * moved, (apart, moved)


@pytest.mark.parametrize("how", ["camera", "single"])
def test_image_pairs_train_the_dit_in_mixed_batches(tmp_path, dit_shards, how):
    """Image pairs beside video clips: filmed into clips, or kept as one-frame clips in the same
    batch (one latent frame under the causal VAE), whose loss is the mean over all its clips."""
    from test_lift import write_image_pair_shard

    from train.data import collate

    (tmp_path / "images").mkdir()
    write_image_pair_shard(tmp_path / "images/pairs-000.tar", 4)
    sources = [{"shards": str(dit_shards), "weight": 0.5, "name": "video"},
               {"shards": str(tmp_path / "images"), "weight": 0.5, "name": "images"}]
    L.seed_everything(0)
    module = EditorModule(editor="wan-tiny", trainable="all", objective="flow", lr=1e-3)
    data = ShardDataModule(sources=sources, num_frames=5, resolution=32, batch_size=4, batches_per_epoch=2,
                           stream_seed=0, augment=False, shuffle_buffer=2, image_clips=how)
    data.setup("fit")
    batches = list(data.train_dataloader())
    if how == "single":  # some batch holds both lengths, grouped; every clip is 1 or 5 frames
        assert any("groups" in b for b in batches)
        assert {g["source"].shape[2] for b in batches for g in b.get("groups", [b])} == {1, 5}
        # the grouped loss is the mean over every clip: each clip's own loss, averaged
        items = [{"source": torch.rand(3, n, 32, 32) * 2 - 1, "target": torch.rand(3, n, 32, 32) * 2 - 1,
                  "instruction": f"edit {i}", "key": str(i)} for i, n in enumerate((1, 5, 5))]
        grouped = collate(items)
        assert [g["source"].shape[2] for g in grouped["groups"]] == [1, 5] and len(grouped["instruction"]) == 3
        module.hparams.drop_text = module.hparams.drop_both = module.hparams.drop_video = 0.0
        with torch.no_grad():
            whole = module.loss(grouped, torch.Generator().manual_seed(0)).item()
            gen = torch.Generator().manual_seed(0)
            parts = [module.loss(g, gen).item() * len(g["instruction"]) for g in grouped["groups"]]
        assert whole == pytest.approx(sum(parts) / 3, rel=1e-6)
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    assert set(data.source_counts) == {"video", "images"} and all(n > 0 for n in data.source_counts.values())
    after = module.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_one_timestep_per_clip_gives_what_one_per_token_gives():
    """A TI2V-style transformer (Wan2.2, Lucy Edit) takes a timestep per token; when every token of a
    clip shares it, the per-clip path the editor takes computes the same velocity."""
    editor = build_wan_editor(shipped_config("model/wan-tiny.yaml"))
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 8, 3, 4, 6, generator=g), torch.randn(2, 64, 32, generator=g)
    t = torch.tensor([700.0, 80.0])
    tokens = 3 * (4 // 2) * (6 // 2)
    with torch.no_grad():
        per_clip = editor.transformer(hidden, t, text).sample
        per_token = editor.transformer(hidden, t[:, None].expand(2, tokens), text).sample
    assert torch.allclose(per_clip, per_token, atol=1e-6) and per_clip.abs().mean() > 1e-3
