"""Metric sanity on constructed videos: CLIP scores, warp error, seam error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clip_reference import OPENAI_MEAN, OPENAI_STD, clip_pixels
from infer.clip_scorer import ClipScorer
from infer.metrics import clip_directional, clip_frame_consistency, clip_text_score, pair_warp_errors, seam_error, warp_error


def textured(size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3)).astype(np.uint8)
    import cv2

    return cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)


def translated(frames=8, shift=2, size=64):
    big = textured(size + frames * shift + 8)
    return np.stack([big[4 : 4 + size, 4 + i * shift : 4 + i * shift + size] for i in range(frames)])


def test_identical_frames_are_perfectly_consistent():
    scorer = ClipScorer.tiny()
    video = np.repeat(textured()[None], 5, axis=0)
    assert clip_frame_consistency(scorer.image_embeds(video)) == pytest.approx(1.0, abs=1e-5)
    assert warp_error(video, video) == pytest.approx(0.0, abs=1e-9)


def test_translation_is_explained_by_flow_shuffling_is_not():
    video = translated()
    still = warp_error(video, video)
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    assert still < 2e-3
    assert warp_error(video, shuffled) > 10 * max(still, 1e-4)


def test_seam_error_counts_only_boundary_pairs():
    source = translated(frames=12)
    edited = source.copy()
    edited[8:] = 255 - edited[8:]  # a jump between frames 7 and 8 only
    errors = pair_warp_errors(source, edited)
    assert errors[7] > 0.05 and np.delete(errors, 7).max() < 2e-3
    assert seam_error(source, edited, [8]) == pytest.approx(errors[7])
    assert seam_error(source, edited, [4]) < 2e-3
    assert warp_error(source, edited) == pytest.approx(errors.mean())


def test_clip_scores_equal_a_direct_computation():
    scorer = ClipScorer.tiny()
    frames = np.stack([textured(seed=s) for s in range(3)])
    emb = scorer.image_embeds(frames)
    text = scorer.text_embeds(["a red car", "a blue car"])
    with torch.no_grad():
        f = scorer.model.get_image_features(pixel_values=clip_pixels(frames, 32))
        f = f if torch.is_tensor(f) else f.pooler_output
        f = f / f.norm(dim=-1, keepdim=True)
        ids = scorer.tokenizer(["a red car", "a blue car"], padding=True, return_tensors="pt")
        t = scorer.model.get_text_features(**ids)
        t = t if torch.is_tensor(t) else t.pooler_output
        t = t / t.norm(dim=-1, keepdim=True)
    assert clip_text_score(emb, text[0]) == pytest.approx((f @ t[0]).mean().item(), abs=1e-5)
    assert clip_frame_consistency(emb) == pytest.approx((f[:-1] * f[1:]).sum(-1).mean().item(), abs=1e-5)
    direct = torch.nn.functional.cosine_similarity(f - f.flip(0), (t[1] - t[0]).expand_as(f)).mean().item()
    assert clip_directional(emb.flip(0), emb, text[0], text[1]) == pytest.approx(direct, abs=1e-5)


def test_clip_preprocessing_is_the_published_one(tmp_path):
    """Frames reach CLIP as CLIPImageProcessor makes them (short side, centre crop, antialiased),
    including from a released model folder's preprocessor_config.json; squashing is far off."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:480, 0:854]
    frame = np.stack([xs * 255 // 854, ys * 255 // 480, (xs // 8 + ys // 8) % 2 * 255], -1).astype(np.uint8)
    frames = np.stack([frame, rng.integers(0, 256, (480, 854, 3), dtype=np.uint8)])
    scorer = ClipScorer.tiny()
    assert torch.allclose(scorer.pixel_values(frames), clip_pixels(frames, 32), atol=1e-5)
    # a released folder's old-style config (ViT-L/14's), read through from_pretrained
    scorer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD), "resample": 3, "size": 32}))
    loaded = ClipScorer.from_pretrained(tmp_path)
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    want = Processor.from_pretrained(tmp_path)(images=list(frames), return_tensors="pt").pixel_values
    assert torch.equal(loaded.pixel_values(frames), want)
    # the margins a centre crop drops do not reach CLIP
    margins = frames.copy()
    margins[:, :, :150] = 0
    margins[:, :, -150:] = 255
    assert torch.equal(loaded.image_embeds(margins), loaded.image_embeds(frames))
    squashed = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
                                               size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    squashed = (squashed - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert (squashed - want).abs().mean() > 0.3


def test_infer_eval_writes_the_three_reports(tmp_path, capsys):
    import csv
    import json
    from pathlib import Path

    from infer.cli import main

    fixtures = Path(__file__).resolve().parent / "fixtures"
    ClipScorer.tiny(seed=1).save_pretrained(tmp_path / "pick")
    capsys.readouterr()
    instructions = tmp_path / "edits.csv"
    instructions.write_text("video,instruction\ngold-fish,make it snowy\nmiami-surf,make it sunset\nnot-here,x y\n")
    code = main(["eval", "--videos", str(fixtures / "videos"), "--instructions", str(instructions), "--out", str(tmp_path / "ev"),
                 "--setting", "plain:lvsc=0", "--setting", "mc:lvsc=0.5,motion_compensation=true",
                 "--pickscore-model", str(tmp_path / "pick"), "--max-frames", "10", "--resolution", "16",
                 "--steps", "1", "--clip-frames", "6", "--reference-frames", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "ev" / "per_video.csv")))
    assert {(r["video"], r["setting"]) for r in rows} == {(v, s) for v in ("gold-fish", "miami-surf") for s in ("plain", "mc")}
    assert all(r["pickscore"] != "nan" and float(r["seam_error"]) >= 0 for r in rows)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["settings"]) == {"plain", "mc"}
    assert any("tiny CLIP" in n for n in summary["notes"])
    table = (tmp_path / "ev" / "summary.md").read_text()
    assert "| plain | 2 |" in table and "tiny CLIP" in table
    # LOVEU-TGVE JSON form, and bad input: one line, exit 2, no reports
    assert main(["eval", "--videos", str(fixtures / "videos"), "--instructions", str(fixtures / "loveu_tgve_instructions.json"),
                 "--out", str(tmp_path / "bad"), "--setting", "x:warp=1", "--quiet"]) == 2
    assert main(["eval", "--videos", str(tmp_path), "--instructions", str(instructions), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown or malformed option" in err[0] and "none of the" in err[1]
    assert not (tmp_path / "bad").exists()
