"""The sampling math: guidance, parametrisations, LVSC, motion-compensated LVSC, clip plans."""

from __future__ import annotations

import pytest
import torch

from infer import (
    clip_plan,
    from_epsilon,
    guidance_weights,
    guided_noise,
    lvsc_correct,
    lvsc_correct_warped,
    predicted_sample,
    stream_clips,
    to_epsilon,
    warp,
)


def test_guided_noise_formula():
    torch.manual_seed(0)
    e_uu, e_vu, e_vt = torch.randn(3, 2, 4, 3, 5, 5)
    got = guided_noise(e_uu, e_vu, e_vt, text_guidance=7.5, video_guidance=1.2)
    want = e_uu + 1.2 * (e_vu - e_uu) + 7.5 * (e_vt - e_vu)
    assert torch.allclose(got, want)
    assert torch.allclose(guided_noise(e_uu, e_vu, e_vt, 1.0, 1.0), e_vt, atol=1e-6)
    # s_T = 0: only video guidance; s_V = 0 too: the unconditional prediction
    assert torch.allclose(guided_noise(e_uu, e_vu, e_vt, 0.0, 0.0), e_uu)


@pytest.mark.parametrize("scales", [(7.5, 1.2), (1.5, 1.0), (1.0, 1.0), (0.0, 0.0), (3.0, 3.0)])
def test_guidance_weights_are_the_formula_as_a_weighted_sum(scales):
    torch.manual_seed(0)
    e = torch.randn(3, 2, 4, 3, 5, 5)
    weights = guidance_weights(*scales)
    assert sum(weights) == pytest.approx(1.0)
    got = sum(w * x for w, x in zip(weights, e))
    assert torch.allclose(got, guided_noise(*e, *scales), atol=1e-5)
    # at video guidance 1 the unconditional prediction has no weight: the sampler skips it
    assert (weights[0] == 0) == (scales[1] == 1.0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_parametrisations_round_trip(kind):
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 3, 6, 6)
    a = torch.tensor(0.3)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
    assert torch.allclose(to_epsilon(output, z_t, a, kind), eps, atol=1e-5)
    assert torch.allclose(from_epsilon(eps, z_t, a, kind), output, atol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        to_epsilon(output, z_t, a, "flow")


def _lvsc_inputs(frames=6, refs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(2, 4, frames, 5, 7, generator=g)
    z_t = torch.randn(2, 4, frames, 5, 7, generator=g)
    z_ref = torch.randn(2, 4, refs, 5, 7, generator=g)
    return eps, z_t, z_ref, torch.tensor(0.42)


def test_lvsc_reference_frames_predict_exactly_the_reference():
    eps, z_t, z_ref, a = _lvsc_inputs()
    out = lvsc_correct(eps, z_t, z_ref, a)
    assert out.shape == eps.shape
    x0 = predicted_sample(out[:, :, :2], z_t[:, :, :2], a)
    assert torch.allclose(x0, z_ref, atol=1e-5)


def test_lvsc_new_frames_shift_by_the_mean_delta():
    eps, z_t, z_ref, a = _lvsc_inputs()
    out = lvsc_correct(eps, z_t, z_ref, a)
    eps_ref = (z_t[:, :, :2] - a.sqrt() * z_ref) / (1 - a).sqrt()
    mean_delta = (eps_ref - eps[:, :, :2]).mean(dim=2, keepdim=True)
    assert torch.allclose(out[:, :, 2:], eps[:, :, 2:] + mean_delta, atol=1e-6)
    assert not torch.allclose(out[:, :, 2:], eps[:, :, 2:])


def test_motion_compensation_with_still_flow_is_plain_lvsc():
    eps, z_t, z_ref, a = _lvsc_inputs()
    flows = torch.zeros(2, 4, 2, 2, 5, 7)
    assert torch.allclose(lvsc_correct_warped(eps, z_t, z_ref, a, flows), lvsc_correct(eps, z_t, z_ref, a), atol=1e-5)


def test_motion_compensation_moves_the_correction_along_the_flow():
    eps = torch.zeros(1, 1, 2, 8, 8)
    z_t = torch.zeros(1, 1, 2, 8, 8)
    z_ref = torch.zeros(1, 1, 1, 8, 8)
    z_ref[0, 0, 0, 3, 2] = -1.0  # one marked cell in the reference frame...
    z_ref[0, 0, 0, 0, 0] = -1.0  # ...and one at the left edge
    a = torch.tensor(0.25)  # eps_ref = (0 - 0.5 * z_ref) / sqrt(0.75)
    flows = torch.zeros(1, 1, 1, 2, 8, 8)
    flows[:, :, :, 0] = -2.0  # new frame (x) looks at reference (x - 2): content moved right by 2
    out = lvsc_correct_warped(eps, z_t, z_ref, a, flows)
    new = out[0, 0, 1]
    assert new[3, 4] == pytest.approx(0.5 / 0.75**0.5, rel=1e-5)  # the mark moved to x = 4
    assert new[3, 2] == pytest.approx(0.0, abs=1e-6)
    assert new[0, 2] == pytest.approx(0.5 / 0.75**0.5, rel=1e-5)
    # a cell whose source lies outside the frame (x < 2) falls back to the plain (mean) delta
    # of its own position
    assert new[0, 0] == pytest.approx(0.5 / 0.75**0.5, rel=1e-5)
    assert new[3, 0] == pytest.approx(0.0, abs=1e-6)


def test_warp_is_backward_and_reports_coverage():
    values = torch.arange(16.0).reshape(1, 1, 4, 4)
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 1] = 1.0  # look one row down
    out = warp(values, flow)
    assert torch.equal(out[0, 0, :3], values[0, 0, 1:])
    assert torch.equal(out[0, 0, 3], torch.zeros(4))
    coverage = warp(torch.ones(1, 1, 4, 4), flow)
    assert coverage[0, 0, :3].min() == 1 and coverage[0, 0, 3].max() == 0


def test_flows_must_match_the_clip():
    eps, z_t, z_ref, a = _lvsc_inputs()
    with pytest.raises(ValueError, match="flows must be"):
        lvsc_correct_warped(eps, z_t, z_ref, a, torch.zeros(2, 3, 2, 2, 5, 7))


@pytest.mark.parametrize("clip_frames,refs", [(16, 4), (8, 2), (5, 4), (3, 0), (1, 0), (24, 8)])
def test_clip_plan_covers_every_frame_exactly_once(clip_frames, refs):
    for total in range(1, 101):
        plan = clip_plan(total, clip_frames, refs)
        covered = [f for clip in plan for f in range(clip.new_start, clip.stop)]
        assert covered == list(range(total))
        assert plan[0].start == 0 and plan[0].num_reference == 0
        for prev, clip in zip(plan, plan[1:]):
            assert clip.start >= prev.start and clip.new_start == prev.stop
            assert clip.num_reference >= refs
        if total >= clip_frames:
            assert all(len(clip) == clip_frames for clip in plan)
        else:
            assert len(plan) == 1 and len(plan[0]) == total
        streamed = list(stream_clips(iter(range(total)), clip_frames, refs))
        assert [c for c, _ in streamed] == plan
        assert all(window == list(range(c.start, c.stop)) for c, window in streamed)


def test_clip_plan_rejects_references_as_long_as_the_clip():
    with pytest.raises(ValueError, match="must be smaller"):
        clip_plan(40, 4, 4)
    assert clip_plan(0, 16, 4) == []
