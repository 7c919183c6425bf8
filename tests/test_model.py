"""The editor checkpoint: inflation, widening, freezing, save/load, building from SD folders."""

from __future__ import annotations


import pytest
import torch
from conftest import tiny_unet2d
from folders import write_adapter, write_sd_folder

from model import (
    Editor,
    EditorLoadError,
    build_editor,
    count_parameters,
    inflate,
    load_editor,
    motion_modules,
    pooled_text,
    set_trainable,
    shipped_config,
    source_prior_estimate,
    source_prior_posterior_std,
    tiny_config,
)


def per_frame_2d(unet2d, sample, text):
    """The 2D U-Net applied to each frame of ``sample`` (B, C, F, H, W) independently."""
    b, c, f, h, w = sample.shape
    flat = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    out = unet2d(flat, 10, encoder_hidden_states=text.repeat_interleave(f, dim=0)).sample
    return out.reshape(b, f, *out.shape[1:]).permute(0, 2, 1, 3, 4)


@pytest.mark.reference
@pytest.mark.parametrize("frames", [1, 2, 5, 16])
@torch.no_grad()
def test_inflated_unet_equals_2d_unet_per_frame(unet2d, frames):
    video = inflate(unet2d)
    torch.manual_seed(1)
    sample = torch.randn(2, 8, frames, 16, 16)
    text = torch.randn(2, 7, 32)
    expected = per_frame_2d(unet2d, sample, text)
    got = video(sample, 10, encoder_hidden_states=text.repeat_interleave(frames, dim=0)).sample
    assert expected.abs().mean() > 1e-2  # a real signal, not two zeros
    error = (got - expected).abs().max()
    assert error < 1e-5, f"{error:.2e} from diffusers' 2D U-Net (allowed 1e-5: other kernels sum in another order)"


@torch.no_grad()
def test_trained_motion_modules_mix_frames(unet2d):
    video = inflate(unet2d)
    for module in motion_modules(video):
        torch.nn.init.normal_(module.proj_out.weight, std=0.1)
    sample = torch.randn(1, 8, 4, 16, 16)
    text = torch.randn(4, 7, 32)
    out = video(sample, 10, encoder_hidden_states=text).sample
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    out2 = video(changed, 10, encoder_hidden_states=text).sample
    assert (out2[:, :, 3] - out[:, :, 3]).abs().max() > 1e-4  # frame 3 sees frame 0


@torch.no_grad()
def test_widening_keeps_the_4_channel_unet_with_zero_condition():
    unet4 = tiny_unet2d(in_channels=4)
    video = inflate(unet4)
    assert video.config.in_channels == 8 and video.conv_in.in_channels == 8
    assert torch.equal(video.conv_in.bias, unet4.conv_in.bias)
    assert unet4.conv_in.bias.abs().sum() > 0
    assert torch.equal(video.conv_in.weight[:, :4], unet4.conv_in.weight)
    assert torch.count_nonzero(video.conv_in.weight[:, 4:]) == 0
    assert unet4.conv_in.in_channels == 4  # the input U-Net is left as it was
    z = torch.randn(1, 4, 3, 16, 16)
    text = torch.randn(1, 7, 32)
    got = video(torch.cat([z, torch.zeros_like(z)], 1), 10, encoder_hidden_states=text.repeat_interleave(3, 0)).sample
    assert (got - per_frame_2d(unet4, z, text)).abs().max() < 1e-5


def test_eight_channel_conv_in_is_kept(unet2d):
    video = inflate(unet2d)
    assert torch.equal(video.conv_in.weight, unet2d.conv_in.weight)
    assert torch.equal(video.conv_in.bias, unet2d.conv_in.bias)


def test_inflate_rejects_odd_input_channels():
    with pytest.raises(ValueError, match="conv_in takes 5 channels"):
        inflate(tiny_unet2d(in_channels=5))


def test_position_table_at_least_32(unet2d):
    video = inflate(unet2d)
    assert video.config.motion_max_seq_length >= 32
    tables = [b for n, b in video.named_buffers() if n.endswith("pos_embed.pe")]
    assert tables and all(t.shape[1] >= 32 for t in tables)


def test_motion_policy_gradients_only_on_motion_modules(editor):
    unet = editor.unet
    counts = set_trainable(unet, "motion")
    motion = {n for n, _ in unet.named_parameters() if "motion_modules." in n}
    assert counts.total == sum(p.numel() for p in unet.parameters())
    assert counts.trainable == sum(p.numel() for n, p in unet.named_parameters() if n in motion)
    assert 0 < counts.trainable < counts.total
    z = torch.randn(1, 4, 3, 16, 16)
    text = editor.encode_text(["make it red"])
    editor.predict(z, torch.randn_like(z), text, torch.tensor([5])).square().mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad == motion
    assert any(unet.get_parameter(n).grad.abs().sum() > 0 for n in motion)


def test_all_and_pattern_policies(editor):
    unet = editor.unet
    assert set_trainable(unet, "all").trainable == count_parameters(unet).total
    counts = set_trainable(unet, ["conv_in.*", "*motion_modules.*"])
    expected = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("conv_in.") or "motion_modules." in n)
    assert counts.trainable == expected
    with pytest.raises(ValueError, match="matched no parameter"):
        set_trainable(unet, ["no_such_layer.*"])
    with pytest.raises(ValueError, match="one of motion, all, spatial"):
        set_trainable(unet, "temporal")


def test_gradient_checkpointing_gives_the_same_gradients(editor, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    unet = editor.unet
    set_trainable(unet, "all")
    unet.train()
    z = torch.randn(1, 4, 2, 16, 16)
    with torch.no_grad():
        text = editor.encode_text(["a dog"])

    def grads():
        unet.zero_grad()
        editor.predict(z, z, text, torch.tensor([3])).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    assert not calls
    unet.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) >= 4  # the blocks were recomputed in backward, not kept
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


@pytest.mark.parametrize("spec", ["tiny", "tiny-pixel"])
def test_tiny_builds_offline(spec, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the tiny editor tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)  # a hub download would connect first
    editor = load_editor(spec)
    assert editor.unet.config.in_channels == 2 * editor.latent_channels
    assert (editor.vae is None) == (spec == "tiny-pixel")


@torch.no_grad()
def test_pixel_space_latents_are_the_frames():
    editor = load_editor("tiny-pixel")
    video = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    assert torch.equal(editor.encode_video(video), video)
    assert torch.equal(editor.decode_latents(video), video)
    assert editor.scaling_factor == 1.0 and editor.vae_scale_factor == 1


@torch.no_grad()
def outputs(editor: Editor):
    torch.manual_seed(3)
    video = torch.rand(1, 3, 3, 32, 32) * 2 - 1
    cond = editor.encode_video(video)
    text = editor.encode_text(["turn the car red"])
    return editor.predict(torch.randn_like(cond), cond, text, torch.tensor([7]))


@pytest.mark.parametrize("spec", ["tiny", "tiny-pixel"])
def test_save_load_round_trip_is_bit_identical(tmp_path, spec):
    editor = load_editor(spec)
    for module in motion_modules(editor.unet):  # non-trivial motion weights must survive too
        torch.nn.init.normal_(module.proj_out.weight, std=0.1)
    editor.save_pretrained(tmp_path / "ed")
    assert not list((tmp_path / "ed").rglob("*.bin")) and not list((tmp_path / "ed").rglob("*.pt"))
    loaded = Editor.from_pretrained(tmp_path / "ed")
    assert torch.equal(outputs(editor), outputs(loaded))
    assert type(loaded.scheduler) is type(editor.scheduler)
    assert loaded.tokenizer("a zebra galloping").input_ids == editor.tokenizer("a zebra galloping").input_ids


def test_missing_and_corrupt_folders_name_what_is_wrong(tmp_path):
    with pytest.raises(EditorLoadError, match="editor folder not found"):
        Editor.from_pretrained(tmp_path / "nope")
    with pytest.raises(EditorLoadError, match="missing model_index.json"):
        Editor.from_pretrained(tmp_path)
    load_editor("tiny").save_pretrained(tmp_path / "ed")
    weights = tmp_path / "ed" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(EditorLoadError, match="unet folder .* is missing diffusion_pytorch_model.safetensors"):
        Editor.from_pretrained(tmp_path / "ed")
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EditorLoadError, match="cannot load unet"):
        Editor.from_pretrained(tmp_path / "ed")
    weights.write_bytes(data)
    (tmp_path / "ed" / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(EditorLoadError, match="cannot load text_encoder"):
        Editor.from_pretrained(tmp_path / "ed")
    import shutil

    shutil.rmtree(tmp_path / "ed" / "vae")
    with pytest.raises(EditorLoadError, match="missing vae folder"):
        Editor.from_pretrained(tmp_path / "ed")


@pytest.mark.parametrize("in_channels", [4, 8])
def test_from_stable_diffusion_folder_and_adapter(tmp_path, in_channels):
    unet2d = write_sd_folder(tmp_path / "sd", in_channels=in_channels)
    adapter = write_adapter(tmp_path / "adapter", max_seq_length=24)
    editor = load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(tmp_path / "adapter")})
    assert editor.unet.config.in_channels == 8
    assert torch.equal(editor.unet.conv_in.weight[:, :in_channels], unet2d.conv_in.weight)
    assert torch.equal(editor.unet.conv_in.bias, unet2d.conv_in.bias)
    assert type(editor.scheduler).__name__ == "DDPMScheduler"
    assert editor.scheduler.config.beta_schedule == "scaled_linear"
    video_state = editor.unet.state_dict()
    adapter_state = adapter.state_dict()
    learned = [k for k in adapter_state if not k.endswith("pos_embed.pe")]
    assert learned and all(torch.equal(video_state[k], adapter_state[k]) for k in learned)
    # a 24-long table grows to 32; the shared rows agree
    pe_key = next(k for k in adapter_state if k.endswith("pos_embed.pe"))
    assert video_state[pe_key].shape[1] == 32
    assert torch.allclose(video_state[pe_key][:, :24], adapter_state[pe_key])
    for name, p in unet2d.named_parameters():
        if name.startswith("down_blocks.0.attentions"):
            assert torch.equal(video_state[name], p)
    assert outputs(editor).isfinite().all()


def test_from_stable_diffusion_errors(tmp_path):
    with pytest.raises(EditorLoadError, match="base model folder not found"):
        load_editor({"base_model": str(tmp_path / "missing")})
    with pytest.raises(EditorLoadError, match="set 'base_model' to a local folder"):
        load_editor({"base_model": "FILL_ME: path to InstructPix2Pix"})
    write_sd_folder(tmp_path / "sd")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(EditorLoadError, match="motion adapter folder .* is missing config.json"):
        load_editor({"base_model": str(tmp_path / "sd"), "motion_adapter": str(tmp_path / "adapter")})


@torch.no_grad()
def test_custom_motion_layout_with_zeroed_outputs_starts_per_frame():
    """The shapes editor's one-head motion modules (a random adapter of that layout) start with
    zero output when `zero_motion_outputs` is set, so it begins as its 2D U-Net per frame and its
    spatial-only ablation stays a per-frame editor; without the key the random adapter mixes frames."""
    config = shipped_config("model/shapes-pixel.yaml")
    assert config["motion_adapter"]["motion_num_attention_heads"] == 1 and config["zero_motion_outputs"]
    torch.manual_seed(0)
    sample = torch.randn(1, 6, 4, 16, 16)
    text = torch.randn(1, 10, 64)

    def frames_mixed(unet):
        torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # the prior editor starts with a zero correction
        whole = unet(sample, 10, encoder_hidden_states=text.repeat_interleave(4, 0)).sample
        alone = torch.cat([unet(sample[:, :, i:i + 1], 10, encoder_hidden_states=text).sample for i in range(4)], 2)
        assert whole.abs().mean() > 1e-2
        return (whole - alone).abs().max().item()

    unet = build_editor(config).unet
    assert {m.transformer_blocks[0].attn1.heads for m in motion_modules(unet)} == {1}
    assert frames_mixed(unet) < 1e-5
    assert frames_mixed(build_editor({**config, "zero_motion_outputs": False}).unet) > 1e-3


@torch.no_grad()
def test_identity_motion_modules_are_skipped_with_the_same_output():
    """Inside skipping_identity_motion_modules the zeroed (identity) motion modules do not run, the
    U-Net's output is bit-identical, a module that is no longer the identity still runs, and on
    leaving the context every module runs again, with the state dict untouched throughout."""
    from model import is_identity_motion_module, skipping_identity_motion_modules

    unet = build_editor(shipped_config("model/shapes-pixel.yaml")).unet
    modules = motion_modules(unet)
    assert modules and all(is_identity_motion_module(m) for m in modules)
    calls = []
    for i, module in enumerate(modules):
        module.transformer_blocks[0].register_forward_hook(lambda *_, i=i: calls.append(i))
    torch.manual_seed(0)
    sample, text = torch.randn(1, 6, 4, 16, 16), torch.randn(4, 10, 64)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    run = lambda: unet(sample, 10, encoder_hidden_states=text).sample  # noqa: E731
    keys = list(unet.state_dict())

    full = run()
    assert sorted(calls) == list(range(len(modules)))
    calls.clear()
    with skipping_identity_motion_modules(unet) as skipped:
        assert torch.equal(run(), full) and skipped == len(modules) and calls == []
    assert list(unet.state_dict()) == keys
    torch.nn.init.normal_(modules[0].proj_out.weight, std=0.1)  # now it mixes frames: it must run
    assert not is_identity_motion_module(modules[0])
    mixed = run()
    calls.clear()
    with skipping_identity_motion_modules(unet) as skipped:
        assert torch.equal(run(), mixed) and skipped == len(modules) - 1 and calls == [0]
    calls.clear()
    run()
    assert sorted(calls) == list(range(len(modules)))


def test_build_editor_rejects_bad_configs():
    cfg = tiny_config()
    cfg["unet"]["out_channels"] = 3
    with pytest.raises(ValueError, match="out_channels must be 4"):
        build_editor(cfg)
    with pytest.raises(ValueError, match="unknown editor config keys"):
        build_editor({**tiny_config(), "vea": None})
    x0_tiny = tiny_config(pixel_space=True)
    x0_tiny["source_prior_std"] = 0.5
    with pytest.raises(ValueError, match="prediction_type: sample"):
        build_editor(x0_tiny)  # the tiny pixel editor predicts epsilon
    pooled = tiny_config(pixel_space=True)
    pooled["unet"]["time_cond_proj_dim"] = 7
    with pytest.raises(ValueError, match="time_cond_proj_dim .7. must equal the text encoder's hidden_size"):
        build_editor(pooled)


def prior_draws(alpha_bar: float, std: float, n: int):
    """Draws from the prior "clean ~ N(source, std^2)" and the forward process at ``alpha_bar``."""
    torch.manual_seed(0)
    a = torch.tensor(alpha_bar)
    source = torch.rand(n) * 2 - 1
    clean = source + std * torch.randn_like(source)
    return a, source, clean, a.sqrt() * clean + (1 - a).sqrt() * torch.randn_like(source)


def test_source_prior_estimate_is_the_posterior_mean():
    for alpha_bar, std in [(0.3, 0.5), (0.9, 0.5), (0.6, 0.2)]:
        a, source, clean, noisy = prior_draws(alpha_bar, std, 20000)
        # the least-squares regression of (x0 - source) on (x_t - sqrt(a) source) has the slope c_skip
        u, v = noisy - a.sqrt() * source, clean - source
        slope = (u * v).sum() / (u * u).sum()
        estimate = source_prior_estimate(noisy, source, a, std)
        assert torch.allclose(estimate, source + slope * u, atol=0.02)
        assert (estimate - clean).pow(2).mean() < (source - clean).pow(2).mean()
    x = torch.randn(5)
    assert torch.equal(source_prior_estimate(x, source[:5], torch.tensor(0.0), 0.5), source[:5])
    assert torch.allclose(source_prior_estimate(x, source[:5], torch.tensor(1.0), 0.5), x)
    assert torch.equal(source_prior_estimate(x, source[:5], torch.tensor(0.5), 0.0), source[:5])


def prior_config():
    cfg = tiny_config(pixel_space=True)
    cfg["scheduler"]["prediction_type"] = "sample"
    cfg["source_prior_std"] = 0.5
    return cfg


@torch.no_grad()
def test_prior_editor_starts_at_the_prior_estimate_and_round_trips(tmp_path):
    editor = build_editor(prior_config())
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    noisy = torch.randn_like(video)
    text = editor.encode_text(["make the circle red", "make the background blue"])
    t = torch.tensor([900, 100])
    a = editor.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    # the U-Net's output layer is zero at the start: the prediction is the prior's estimate
    assert torch.allclose(editor.predict(noisy, video, text, t), source_prior_estimate(noisy, video, a, 0.5))
    torch.nn.init.normal_(editor.unet.conv_out.weight, std=0.1)
    plain = Editor(**{**editor.__dict__, "source_prior_std": None})
    correction = plain.predict(noisy, video, text, t)
    assert torch.allclose(editor.predict(noisy, video, text, t), source_prior_estimate(noisy, video, a, 0.5) + correction)
    editor.save_pretrained(tmp_path / "ed")
    loaded = Editor.from_pretrained(tmp_path / "ed")
    assert loaded.source_prior_std == 0.5 and torch.equal(outputs(loaded), outputs(editor))


@torch.no_grad()
def test_pooled_prompt_enters_the_time_embedding_and_round_trips(tmp_path):
    cfg = tiny_config(pixel_space=True)
    cfg["unet"]["time_cond_proj_dim"] = cfg["text_encoder"]["hidden_size"]
    editor = build_editor(cfg)
    text = editor.encode_text(["make the circle red", "make the circle blue"])
    # causal attention, right padding: the last position has seen the colour word
    assert not torch.allclose(pooled_text(text)[0], pooled_text(text)[1], atol=1e-4)
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    noisy, t = torch.randn_like(video), torch.tensor([900, 100])
    out = editor.predict(noisy, video, text, t)
    want = editor.unet(torch.cat([noisy, video], 1), t, encoder_hidden_states=text.repeat_interleave(3, dim=0),
                       timestep_cond=text[:, -1]).sample
    assert torch.equal(out, want)
    # with cross-attention silenced, the prompt still changes the output (through the time embedding)
    for name, module in editor.unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight.zero_()
            module.bias.zero_()
    def prompt_effect():  # the same clip under the two prompts
        out = editor.predict(noisy[:1].expand(2, -1, -1, -1, -1), video[:1].expand(2, -1, -1, -1, -1), text, t[:1].expand(2))
        return (out[0] - out[1]).abs().max().item()

    through_time = prompt_effect()
    editor.unet.time_embedding.cond_proj.weight.zero_()
    assert prompt_effect() < 1e-5 < through_time / 100
    editor.save_pretrained(tmp_path / "ed")
    loaded = Editor.from_pretrained(tmp_path / "ed")
    assert loaded.unet.config.time_cond_proj_dim == cfg["text_encoder"]["hidden_size"]
    assert torch.equal(loaded.predict(noisy, video, text, t), editor.predict(noisy, video, text, t))


def test_posterior_std_is_the_residual_scale_of_the_prior_estimate():
    for alpha_bar, std in [(0.05, 0.5), (0.5, 0.5), (0.97, 0.3)]:
        a, source, clean, noisy = prior_draws(alpha_bar, std, 40000)
        residual = clean - source_prior_estimate(noisy, source, a, std)
        assert residual.std().item() == pytest.approx(source_prior_posterior_std(a, std).item(), rel=0.03)
    assert source_prior_posterior_std(torch.tensor(0.0), 0.5).item() == pytest.approx(0.5)
    assert source_prior_posterior_std(torch.tensor(1.0), 0.5).item() == 0.0


@torch.no_grad()
def test_preconditioned_editor_scales_the_correction_and_round_trips(tmp_path):
    cfg = {**prior_config(), "preconditioned": True, "sampling": {"num_inference_steps": 12, "text_guidance": 2}}
    editor = build_editor(cfg)
    torch.nn.init.normal_(editor.unet.conv_out.weight, std=0.1)
    video = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    noisy, t = torch.randn_like(video), torch.tensor([900, 5])
    text = editor.encode_text(["make the circle red", "make the background blue"])
    a = editor.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    raw = Editor(**{**editor.__dict__, "source_prior_std": None}).predict(noisy, video, text, t)
    c_out = source_prior_posterior_std(a, 0.5)
    assert torch.allclose(editor.predict(noisy, video, text, t), source_prior_estimate(noisy, video, a, 0.5) + c_out * raw,
                          atol=1e-6)
    assert torch.equal(editor.output_scale(t, video), c_out)
    # nearly clean input: the correction is bounded by the noise that is left, sqrt((1 - a) / a)
    assert c_out[1].item() < ((1 - a[1]) / a[1]).sqrt().item() and c_out[1].item() < c_out[0].item() / 4
    editor.save_pretrained(tmp_path / "ed")
    loaded = Editor.from_pretrained(tmp_path / "ed")
    assert loaded.preconditioned and loaded.sampling == {"num_inference_steps": 12, "text_guidance": 2.0}
    assert torch.equal(loaded.predict(noisy, video, text, t), editor.predict(noisy, video, text, t))
    with pytest.raises(ValueError, match="set source_prior_std"):
        build_editor({**tiny_config(pixel_space=True), "preconditioned": True})
    with pytest.raises(EditorLoadError, match="unknown sampling keys"):
        build_editor({**prior_config(), "sampling": {"steps": 3}})
    with pytest.raises(EditorLoadError, match="sampling.text_guidance must be a positive number"):
        build_editor({**prior_config(), "sampling": {"text_guidance": -1}})


def test_spatial_policy_freezes_exactly_the_temporal_layers(editor):
    counts = set_trainable(editor.unet, "spatial")
    for name, p in editor.unet.named_parameters():
        assert p.requires_grad == ("motion_modules." not in name), name
    assert counts.trainable == counts.total - sum(p.numel() for m in motion_modules(editor.unet) for p in m.parameters())
    set_trainable(editor.unet, ["*attn1*", "!*motion_modules.*"])
    assert any(p.requires_grad for p in editor.unet.parameters())
    assert not any(p.requires_grad for n, p in editor.unet.named_parameters() if "motion_modules." in n)
    with pytest.raises(ValueError, match="matched no parameter"):
        set_trainable(editor.unet, ["*", "!*nothing_here*"])
