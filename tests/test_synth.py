"""Synthesis: LLM triplets over real HTTP, video P2P properties, CLIP filter, resumable shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clip_reference import clip_pixels
from fake_openai import FakeOpenAI, completion
from infer.clip_scorer import ClipScorer
from synth import PairParams, TemplateSource, Triplet, VideoRenderer, align_tokens, parse_reply
from synth.cli import main
from synth.filter import ClipFilter, Thresholds
from synth.writer import read_attempts, read_manifest
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs/synth/tiny.yaml").read_text())
SECRET = "sk-test-DO-NOT-LEAK-1234567890"


# ------------------------------------------------------------------ a fake OpenAI-compatible server
GOOD = {"input": "a dog running on the beach", "edit": "make it snowy", "output": "a dog running on the snowy beach"}
REPLIES = [
    (500, {"error": {"message": "boom"}}),
    (200, completion("```json\n" + json.dumps(GOOD) + "\n```")),
    (200, completion(json.dumps([
        {"input": "a car driving down the road", "edit": "make it night", "output": "a car driving down the road at night"},
        {"input": "a cat walking on a wall", "edit": "turn the cat into a fox", "output": "a fox walking on a wall"},
    ]))),
    (200, completion("Sure! Here are some ideas: dogs, cats.")),
    (200, completion(json.dumps([{"input": "a man walking", "edit": "do nothing", "output": "a man walking"},
                                 {"input": "", "edit": "x y", "output": "a b"}, GOOD]))),
]


class FakeLLM(FakeOpenAI):
    def __init__(self, replies):
        self.replies = list(replies)
        super().__init__(self._respond)

    def _respond(self, body, n):
        extra = {"input": f"a bird flying over lake {n}", "edit": "make it golden", "output": f"a golden bird flying over lake {n}"}
        return self.replies.pop(0) if self.replies else (200, completion(json.dumps([GOOD, extra])))


@pytest.fixture
def llm():
    server = FakeLLM(REPLIES)
    yield server
    server.close()


def test_parse_reply_forms():
    assert parse_reply(json.dumps(GOOD)) == ([Triplet(**GOOD)], 0)
    assert parse_reply("```json\n[" + json.dumps(GOOD) + "]\n```") == ([Triplet(**GOOD)], 0)
    assert parse_reply("no json here") == ([], 1)
    assert parse_reply(json.dumps([GOOD, {"input": "a b", "edit": "c d", "output": "a b"}])) == ([Triplet(**GOOD)], 1)


def test_openai_source_against_a_real_http_server(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    config = {**TINY, "prompts": {**TINY["prompts"], "backoff": 0.01}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "triplets.jsonl"
    code = main(["prompts", "--config", str(cfg_path), "--out", str(out), "--num", "5",
                 "--llm-base-url", llm.url, "--llm-model", "fake-model"])
    assert code == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0] == GOOD
    assert {g["output"] for g in got} >= {"a car driving down the road at night", "a fox walking on a wall"}
    assert len(got) == 5 and len({(g["input"], g["edit"]) for g in got}) == 5  # dedup: GOOD only once
    err = capsys.readouterr().err
    assert "retries 1" in err and "malformed 3" in err  # 1 non-JSON reply + 2 invalid items
    assert "duplicates 3" in err  # GOOD came back three more times
    assert all(r["auth"] == f"Bearer {SECRET}" for r in llm.requests)
    assert llm.requests[0]["body"]["model"] == "fake-model"
    assert "video" in json.dumps(llm.requests[0]["body"]["messages"]).lower()
    assert SECRET not in out.read_text()


def test_build_with_llm_never_writes_the_key(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    config = {**TINY, "prompts": {**TINY["prompts"], "backoff": 0.01}}
    config["generator"] = {**TINY["generator"], "num_frames": 4, "steps": 2, "seeds_per_triplet": 1}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["build", "--config", str(cfg_path), "--out", str(out), "--num-samples", "3", "--quiet",
                 "--llm-base-url", llm.url]) == 0
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    meta = [json.loads(m) for m in _members(out, ".json")]
    assert {m["source"] for m in meta} == {f"openai:{TINY['prompts']['model']}"}


def test_unreachable_server_and_bad_config_exit_2(tmp_path, capsys):
    config = {**TINY, "prompts": {**TINY["prompts"], "max_retries": 1, "backoff": 0.01}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    code = main(["prompts", "--config", str(cfg_path), "--out", str(tmp_path / "t.jsonl"), "--llm-base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "LLM server failed" in err[0]
    assert not (tmp_path / "t.jsonl").exists()
    (tmp_path / "bad.yaml").write_text("prompts: [1, 2\n")
    assert main(["build", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("seed: 1\n")
    assert main(["build", "--config", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "lacks the section(s): prompts" in capsys.readouterr().err


# ------------------------------------------------------------------ video Prompt-to-Prompt
@pytest.fixture(scope="module", params=["modelscope", "animatediff"])
def renderer(request):
    return VideoRenderer.tiny(request.param, TINY["generator"]["tiny"])


def _noise(renderer, seed=0):
    return torch.randn(renderer.latent_shape(4, 32, 32), generator=torch.Generator().manual_seed(seed))


def test_identical_prompts_give_identical_videos(renderer):
    params = PairParams(guidance=7.0, self_attn_end=0.4, cross_attn_end=0.8, edit_weight=3.0, steps=3)
    source, target = renderer.render_pair("a cat walking on the road", "a cat walking on the road", _noise(renderer), params)
    assert np.array_equal(source, target)
    # with the control on: self-attention maps were replaced in the first steps, cross-attention mapped
    control = renderer.last_control
    assert control.self_controlled > 0 and control.cross_controlled > 0


def test_no_control_equals_a_plain_render_of_the_target(renderer):
    params = PairParams(guidance=7.0, self_attn_end=0.0, cross_attn_end=0.0, edit_weight=3.0, steps=3)
    noise = _noise(renderer)
    source, target = renderer.render_pair("a cat walking on the road", "a zebra walking on the road", noise, params)
    plain = renderer.render(["a zebra walking on the road"], noise, params)[0]
    plain_source = renderer.render(["a cat walking on the road"], noise, params)[0]
    assert np.abs(target.astype(int) - plain).max() <= 1
    assert np.abs(source.astype(int) - plain_source).max() <= 1
    controlled = renderer.render_pair("a cat walking on the road", "a zebra walking on the road", noise,
                                      PairParams(7.0, 0.4, 0.8, 3.0, 3))[1]
    assert np.abs(controlled.astype(int) - target).max() > 2  # control changes the edited clip


def test_a_p2p_pair_renders_in_bfloat16_close_to_float32(renderer):
    """The half-precision path: float32 latents and P2P scores around a bfloat16 U-Net; identical
    prompts still give identical videos, and the pair stays near the float32 one."""
    import copy

    half = copy.deepcopy(renderer).to("cpu", torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    params = PairParams(guidance=7.0, self_attn_end=0.4, cross_attn_end=0.8, edit_weight=3.0, steps=3)
    same = half.render_pair("a cat walking on the road", "a cat walking on the road", _noise(renderer), params)
    assert np.array_equal(*same)
    pair = half.render_pair("a cat walking on the road", "a zebra walking on the road", _noise(renderer), params)
    full = renderer.render_pair("a cat walking on the road", "a zebra walking on the road", _noise(renderer), params)
    for a, b in zip(pair, full):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert np.abs(a.astype(float) - b).mean() < 6  # of 255: bfloat16 keeps ~3 significant digits


def test_build_in_bfloat16_records_the_precision_and_scores_in_it(tmp_path, monkeypatch):
    scored = []
    real = ClipScorer.image_embeds

    def spy(self, frames, batch=32):
        scored.append(self.dtype)
        return real(self, frames, batch)

    monkeypatch.setattr(ClipScorer, "image_embeds", spy)
    out = tmp_path / "out"
    assert main(["build", "--config", str(fast_config(tmp_path, seeds_per_triplet=1)), "--out", str(out),
                 "--num-samples", "2", "--dtype", "bfloat16", "--quiet"]) == 0
    metas = [json.loads(m) for m in _members(out, ".json")]
    assert len(metas) == 2 and {m["generator"]["dtype"] for m in metas} == {"bfloat16"}
    assert scored and set(scored) == {torch.bfloat16}


def test_render_device_follows_the_local_rank(monkeypatch):
    from synth.ranks import local_rank, render_device, render_dtype

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert local_rank() == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert render_device(None) == torch.device("cpu") and render_device("cpu") == torch.device("cpu")
    assert render_dtype(None, torch.device("cpu")) == torch.float32
    assert render_dtype(None, torch.device("cuda", 0)) == torch.float16
    with pytest.raises(ValueError, match="generator.dtype must be one of"):
        render_dtype("half", torch.device("cpu"))
    current = []  # on a node of 8 GPUs, rank 3 renders on (and makes current) its own GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert render_device(None) == torch.device("cuda", 3) and current == [torch.device("cuda", 3)]


def test_token_alignment_is_on_tokens_not_words():
    renderer = VideoRenderer.tiny("modelscope", TINY["generator"]["tiny"])
    src, tgt = renderer.token_ids("a cat riding a bike"), renderer.token_ids("a zebra riding a bike")
    assert len(tgt) - len(src) >= 3  # "zebra" is several tokens
    mapping, edited = align_tokens(src, tgt, 77)
    riding_src, riding_tgt = src.index(tgt[-4]), len(tgt) - 4
    assert mapping[riding_tgt] == riding_src  # words after the split word stay aligned
    assert mapping[len(tgt) - 1] == len(src) - 1  # EOS to EOS
    assert edited[2 : len(tgt) - 4].all() and not edited[len(tgt) - 4 : len(tgt)].any()
    assert mapping[len(tgt)] == len(src)  # padding aligned from the prompts' ends
    same_len = align_tokens([1, 5, 6, 2], [1, 7, 6, 2], 6)
    assert same_len[0][:4].tolist() == [0, 1, 2, 3] and same_len[1][:4].tolist() == [False, True, False, False]


# ------------------------------------------------------------------ CLIP filter
def test_filter_scores_equal_a_direct_clip_computation():
    scorer = ClipScorer.tiny()
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    edited = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    triplet = Triplet("a cat on the road", "make it red", "a red cat on the road")
    scores, reason = ClipFilter(scorer, Thresholds(-1, -1, -1, -1))(source, edited, triplet.input, triplet.output)
    assert reason is None

    def image(frames):
        f = scorer.model.get_image_features(pixel_values=clip_pixels(frames, 32))
        f = f if torch.is_tensor(f) else f.pooler_output
        return f / f.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        s, e = image(source), image(edited)
        ids = scorer.tokenizer([triplet.input, triplet.output], padding=True, return_tensors="pt")
        t = scorer.model.get_text_features(**ids)
        t = t if torch.is_tensor(t) else t.pooler_output
        t = t / t.norm(dim=-1, keepdim=True)
    want = {
        "sim_src_text": (s @ t[0]).mean().item(),
        "sim_tgt_text": (e @ t[1]).mean().item(),
        "sim_direction": torch.nn.functional.cosine_similarity(e - s, (t[1] - t[0]).expand_as(e)).mean().item(),
        "sim_frames": (s * e).sum(-1).mean().item(),
    }
    assert scores == pytest.approx(want, abs=1e-5)
    strict = ClipFilter(scorer, Thresholds(sim_frames=0.99))(source, edited, triplet.input, triplet.output)[1]
    assert "sim_frames" in strict


# ------------------------------------------------------------------ shards, resume, ranks
def _members(folder: Path, suffix: str) -> list[bytes]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(suffix)]
    return out


def _keys(folder: Path) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def fast_config(tmp_path, **gen):
    config = {**TINY, "generator": {**TINY["generator"], "num_frames": 4, "steps": 2, **gen}}
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def synth_cmd(*args):
    return [sys.executable, "-m", "synth", *map(str, args)]


@pytest.mark.slow
def test_kill_9_then_resume_gives_exactly_n_unique_readable_pairs(tmp_path):
    cfg = fast_config(tmp_path)
    out = tmp_path / "out"
    args = ["build", "--config", cfg, "--out", out, "--num-samples", 10, "--samples-per-shard", 2, "--quiet"]
    proc = subprocess.Popen(synth_cmd(*args), stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("*.tar")))
    assert 2 <= written < 5, "the kill should land mid-build"
    assert subprocess.run(synth_cmd(*args[:-1])).returncode == 2  # no --resume: refuses to mix runs
    assert subprocess.run(synth_cmd(*args, "--resume"), capture_output=True).returncode == 0
    keys = _keys(out)
    assert len(keys) == 10 and len(set(keys)) == 10
    manifest = read_manifest(out)
    assert manifest["total_samples"] == 10 and sum(s["samples"] for s in manifest["shards"]) == 10
    attempts = read_attempts(out)
    assert len({a["key"] for a in attempts}) == len(attempts) and sum(a["kept"] for a in attempts) == 10
    assert not list(out.glob(".*.tmp"))
    # the same as an uninterrupted build
    again = tmp_path / "again"
    assert main(["build", "--config", str(cfg), "--out", str(again), "--num-samples", "10", "--samples-per-shard", "2", "--quiet"]) == 0
    assert _keys(again) == keys
    assert _members(again, ".json") == _members(out, ".json")


def test_ranks_write_disjoint_keys_and_train_loads_them(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, seeds_per_triplet=1)
    out = tmp_path / "out"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["build", "--config", str(cfg), "--out", str(out), "--num-samples", "2", "--quiet"]) == 0
    keys = _keys(out)
    assert len(keys) == 4 and {k[:4] for k in keys} == {"r000", "r001"}
    triplets = [int(k.split("-")[1]) for k in keys]
    assert sorted(triplets) == [0, 1, 2, 3]  # each rank its own slice of the triplets
    manifest = read_manifest(out)
    assert set(manifest["ranks"]) == {"0", "1"} and manifest["total_samples"] == 4 and manifest["world"] == 2
    assert not list(out.glob(".lock")) and not (out / "manifest.json").exists()  # nothing shared between ranks
    text = subprocess.run(synth_cmd("report", out), capture_output=True, text=True).stdout
    assert "kept pairs        4" in text and (out / "report.png").is_file()

    from train import ShardDataModule

    dm = ShardDataModule(shards=str(out), num_frames=4, resolution=16, batch_size=2, batches_per_epoch=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (2, 3, 4, 16, 16)
    assert all(i in {t.edit for t in map(TemplateSource(0).triplet, range(4))} for i in batch["instruction"])


def _rank_env(rank: int, world: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world)}


@pytest.mark.slow
def test_two_ranks_at_once_kill_9_one_resume_equals_an_uninterrupted_build(tmp_path):
    """Two ranks build into one folder at the same time; rank 1 is killed with SIGKILL mid-build
    and resumed: exactly the keys and samples of an uninterrupted build, none twice."""
    cfg = fast_config(tmp_path, seeds_per_triplet=1)
    out = tmp_path / "out"
    args = ["build", "--config", cfg, "--out", out, "--num-samples", 6, "--samples-per-shard", 2, "--quiet"]
    procs = [subprocess.Popen(synth_cmd(*args), env=_rank_env(r, 2), stderr=subprocess.DEVNULL, start_new_session=True)
             for r in (0, 1)]
    deadline = time.time() + HANG_GUARD
    while time.time() < deadline and not list(out.glob("pairs-001-*.tar")) and procs[1].poll() is None:
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].wait()
    assert procs[0].wait(timeout=HANG_GUARD) == 0
    assert 1 <= len(list(out.glob("pairs-001-*.tar"))) < 3, "the kill should land mid-build"
    # a torn last line, as a kill during an append leaves it
    with open(out / "attempts-r001.jsonl", "a") as f:
        f.write('{"key": "r001-0000')
    assert subprocess.run(synth_cmd(*args, "--resume"), env=_rank_env(1, 2), capture_output=True).returncode == 0
    keys = _keys(out)
    assert len(keys) == 12 and len(set(keys)) == 12
    attempts = read_attempts(out)
    assert len({a["key"] for a in attempts}) == len(attempts) == 12
    again = tmp_path / "again"
    for rank in (0, 1):
        assert subprocess.run(synth_cmd(*[str(a).replace(str(out), str(again)) for a in args]),
                              env=_rank_env(rank, 2)).returncode == 0
    assert _keys(again) == keys and _members(again, ".json") == _members(out, ".json")


def test_resume_with_another_world_size_is_refused(tmp_path, capsys, monkeypatch):
    cfg = fast_config(tmp_path, seeds_per_triplet=1)
    out = tmp_path / "out"
    args = ["build", "--config", str(cfg), "--out", str(out), "--num-samples", "1", "--quiet"]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(args) == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    capsys.readouterr()
    assert main([*args[:-2], "2", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built by 2 ranks" in err[0] and "not 4" in err[0]
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before  # nothing touched


def test_a_torn_last_line_is_tolerated_and_cut_a_torn_middle_line_is_named(tmp_path):
    from synth.writer import read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}] and path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a"\n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)
