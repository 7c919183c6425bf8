"""Shapes world: exact edits, motion kept, deterministic; the demo's learning path, briefly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from synth.build import shapes_world
from synth.shapes import (ALL_EDITS, COLORS, EDITS, RADII, REMOVE_WORDS, SHAPE_COUNTS, SPEEDS, Scene, Shape, ShapesWorld,
                          positions, random_scene, render, shape_masks)
from guards import HANG_GUARD

ROOT = Path(__file__).resolve().parents[1]


def test_edits_change_only_what_they_say_and_keep_the_motion():
    world = ShapesWorld(seed=3, num_frames=8, size=32)
    seen = set()
    for i in range(60):
        triplet, source, target = world.sample(i)
        assert source.shape == target.shape == (8, 32, 32, 3) and source.dtype == np.uint8
        assert triplet.input != triplet.output and not np.array_equal(source, target)
        changed = np.abs(source.astype(int) - target.astype(int)).max(axis=-1) > 0  # (F, H, W)
        if "background" in triplet.edit:
            seen.add("background")
            assert changed.mean() > 0.3
        else:
            seen.add("object")
            assert changed.mean() < 0.35  # only the object's pixels
            # the edited object sits where the source object is, frame by frame: motion kept
            centres = [np.argwhere(c).mean(axis=0) for c in changed if c.any()]
            assert len(centres) >= 6
    assert seen == {"background", "object"}
    a = world.sample(7)
    b = ShapesWorld(seed=3, num_frames=8, size=32).sample(7)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_all_edit_kinds_and_bouncing():
    world = ShapesWorld(seed=0)
    words = {world.sample(i)[0].edit.split()[0] for i in range(80)}
    assert {"make", "turn"} <= words or {"make", "replace"} <= words
    moving = ShapesWorld(seed=1, edits=("recolor_moving",)).sample(0)[0]
    assert "moving shape" in moving.edit
    track = positions(Shape("circle", "red", 0.85, 0.5, 0.1, 0.08, 0.0), 10)
    xs = [x for x, _ in track]
    assert max(xs) <= 0.9 + 1e-9 and xs[-1] < xs[1]  # it bounced back from the right edge
    with pytest.raises(ValueError, match="unknown shapes edits"):
        ShapesWorld(edits=("explode",))
    assert set(EDITS) == {"recolor", "background", "swap", "recolor_moving"}
    for i in range(40):  # the kind the world reports is the one its instruction asks for
        edit, kind = world.sample(i)[0].edit, world.kind(i)
        assert ("background" in edit) == (kind == "background") and ("moving shape" in edit) == (kind == "recolor_moving")
        assert (" into a " in edit or "replace the" in edit) == (kind == "swap")


def test_speeds_set_how_far_a_moving_shape_travels():
    import random

    for low, high in [(0.02, 0.04), SPEEDS]:
        for i in range(40):
            scene = random_scene(random.Random(i), need_static=True, speeds=(low, high))
            moving, still = scene.shapes
            assert low - 1e-9 <= np.hypot(moving.vx, moving.vy) <= high + 1e-9 and not still.moving
    # the synth config's prompts.speeds reaches the world, and it changes the clips it renders
    fast = shapes_world({"speeds": [0.3, 0.4], "edits": ["recolor_moving"]}, seed=5)
    slow = shapes_world({"speeds": [0.01, 0.02], "edits": ["recolor_moving"]}, seed=5)
    assert fast.speeds == (0.3, 0.4) and shapes_world({}, seed=5).speeds == SPEEDS
    motion = lambda clip: np.abs(np.diff(clip.astype(int), axis=0)).mean()  # noqa: E731
    assert motion(fast.sample(0)[1]) > 3 * motion(slow.sample(0)[1])
    for bad in [(0.1,), (0.2, 0.1), (0.0, 0.1), (0.1, 0.6), ("fast", 0.1), 0.1]:
        with pytest.raises(ValueError, match="shapes speeds must be"):
            ShapesWorld(speeds=bad)
        with pytest.raises(ValueError, match="shapes speeds must be"):
            shapes_world({"speeds": bad}, seed=0)


def test_radii_set_how_large_the_shapes_are():
    import random

    for low, high in [(0.25, 0.3), RADII]:
        for i in range(40):
            scene = random_scene(random.Random(i), radii=(low, high))
            assert all(low - 1e-9 <= s.size <= high + 1e-9 for s in scene.shapes)
    # the synth config's prompts.radii reaches the world; larger shapes cover more of the frame,
    # and a shape edit changes more pixels
    large = shapes_world({"radii": [0.28, 0.3], "edits": ["swap"]}, seed=5)
    small = shapes_world({"radii": [0.1, 0.12], "edits": ["swap"]}, seed=5)
    assert large.radii == (0.28, 0.3) and shapes_world({}, seed=5).radii == RADII
    changed = lambda world: np.mean([np.any(s != t, axis=-1).mean() for _, s, t in map(world.sample, range(8))])  # noqa: E731
    assert changed(large) > 2 * changed(small)
    for bad in [(0.1,), (0.3, 0.2), (-0.1, 0.1), (0.2, 0.5), ("big", 0.3), 0.2]:
        with pytest.raises(ValueError, match="shapes radii must be"):
            ShapesWorld(radii=bad)
        with pytest.raises(ValueError, match="shapes radii must be"):
            shapes_world({"radii": bad}, seed=0)


def test_counts_set_how_many_shapes_a_scene_has():
    two = shapes_world({"counts": [2], "edits": ["recolor", "swap"]}, seed=1)
    assert two.counts == (2,) and shapes_world({}, seed=1).counts == SHAPE_COUNTS
    assert all(len(two.scenes(i)[1].shapes) == 2 for i in range(20))
    default = [len(ShapesWorld(seed=1).scenes(i)[1].shapes) for i in range(200)]
    assert set(default) == {1, 2} and 0.3 < default.count(2) / len(default) < 0.6  # 1/3 drawn, plus the moving-shape edit's
    # a moving-shape edit needs its second, static shape whatever the counts
    assert len(ShapesWorld(counts=[1], edits=("recolor_moving",)).scenes(0)[1].shapes) == 2
    for bad in [[], [0, 1], [4], 2, ["two"], [1.5]]:
        with pytest.raises(ValueError, match="shapes counts must be"):
            shapes_world({"counts": bad}, seed=0)


def assert_same_world(a: ShapesWorld, b: ShapesWorld, clips: int) -> None:
    """The two worlds give the same triplet and the same source and edited pixels, clip for clip."""
    for i in range(clips):
        (triplet_a, source_a, edited_a), (triplet_b, source_b, edited_b) = a.sample(i), b.sample(i)
        assert triplet_a == triplet_b and np.array_equal(source_a, source_b) and np.array_equal(edited_a, edited_b)


def test_swap_into_narrows_what_a_swap_makes_and_leaves_the_default_world_alone():
    """``prompts.swap_into: [square]``: every swap turns a circle or a triangle into a square, in a
    scene without squares, and says so; the full list is the default world clip for clip; a list
    that leaves too few other kinds for the scenes, or names no shape, is one clear ValueError."""
    square = shapes_world({"edits": ["swap"], "swap_into": ["square"]}, seed=3)
    assert square.swap_into == ("square",)
    for i in range(40):
        triplet, scene, edited = square.scenes(i)
        assert all(s.kind != "square" for s in scene.shapes)
        changed = [(a.kind, b.kind) for a, b in zip(scene.shapes, edited.shapes) if a != b]
        assert len(changed) == 1 and changed[0][1] == "square" and triplet.edit.endswith("a square")
        assert f"the {changed[0][0]} " in triplet.edit
    full = shapes_world({"swap_into": ["triangle", "circle", "square"]}, seed=3)
    assert full.swap_into == ("circle", "square", "triangle")
    assert_same_world(full, ShapesWorld(seed=3), clips=30)
    with pytest.raises(ValueError, match=r"leaves 1 other kind\(s\) for scenes of up to 2 shapes"):
        shapes_world({"swap_into": ["square", "circle"]}, seed=0)
    assert shapes_world({"swap_into": ["square", "circle"], "counts": [1]}, seed=0).swap_into == ("circle", "square")
    for bad in [[], ["star"], 3, ["square", 1]]:
        with pytest.raises(ValueError, match="shapes swap_into must be a non-empty list"):
            shapes_world({"swap_into": bad}, seed=0)


def test_shuffled_draw_order_stops_the_still_shape_always_covering_the_moving_one():
    """``prompts.draw_order: shuffled``: a moving-shape scene draws (and names) its moving shape last
    in some scenes and first in others, and the shape a frame hides is then the moving one about as
    often as the still one; the edit still recolours the moving shape, and "listed" is the default
    world clip for clip. An unknown order is one clear ValueError."""
    def hidden(scene, edited):  # (moving shape hidden > 10 %, still shape hidden > 10 %) in how many frames
        first, second = shape_masks(scene, 8, 16)
        covered = sum((first[f] & second[f]).sum() > 0.1 * first[f].sum() for f in range(8))  # the first drawn
        changed = [a for a, b in zip(scene.shapes, edited.shapes) if a != b]
        assert len(changed) == 1 and changed[0].moving
        return (covered, 0) if scene.shapes[0].moving else (0, covered)

    big = {"edits": ["recolor_moving"], "radii": [0.25, 0.35]}
    listed, shuffled = shapes_world(big, seed=7), shapes_world({**big, "draw_order": "shuffled"}, seed=7)
    assert listed.draw_order == "listed" and shuffled.draw_order == "shuffled"
    listed_scenes, shuffled_scenes = ([world.scenes(i) for i in range(48)] for world in (listed, shuffled))
    listed_hidden = np.sum([hidden(scene, edited) for _, scene, edited in listed_scenes], axis=0)
    shuffled_hidden = np.sum([hidden(scene, edited) for _, scene, edited in shuffled_scenes], axis=0)
    assert listed_hidden[0] > 300 and listed_hidden[1] == 0  # the cue: only ever the moving shape is covered
    assert min(shuffled_hidden) > 0.6 * max(shuffled_hidden)
    assert 12 < sum(scene.shapes[0].moving for _, scene, _ in shuffled_scenes) < 36
    for triplet, scene, _ in shuffled_scenes:  # the caption names the shapes in the order they are drawn
        first, second = (f"a {s.color} {s.kind} " for s in scene.shapes)
        assert triplet.input.index(first) < triplet.input.index(second)
    assert_same_world(shapes_world({"draw_order": "listed"}, seed=3), ShapesWorld(seed=3), clips=30)
    with pytest.raises(ValueError, match="shapes draw_order must be one of listed, shuffled, got 'random'"):
        shapes_world({"draw_order": "random"}, seed=0)


def test_trail_paints_the_whole_path_which_no_single_frame_shows():
    """A trail edit paints, under every frame, each place the moving shape visits (in its colour) and nothing else;
    the still shape and the motion stay; two clips with the same first frame but different motion
    have different first target frames, so a per-frame editor cannot make the edit."""
    world = ShapesWorld(seed=4, edits=("trail",), size=32, speeds=(0.06, 0.12))
    for i in range(8):
        triplet, source, target = world.sample(i)
        _, scene, edited = world.scenes(i)
        moving, still = scene.shapes
        assert moving.moving and not still.moving and edited.shapes == scene.shapes
        assert world.kind(i) == "trail" and edited.trail and "leaving a trail" in triplet.output
        changed = np.any(source != target, axis=-1)  # (F, H, W)
        empty = render(replace(scene, shapes=()), 8, 32).astype(int)
        covered = np.any(render(scene, 8, 32) != empty, axis=-1)  # either shape, rims included
        alone = np.any(render(replace(scene, shapes=(moving,)), 8, 32) != empty, axis=-1)
        union = alone.any(axis=0)  # every place the moving shape visits
        painted = changed & ~covered  # the path where no shape hides it
        for f in range(8):
            assert np.array_equal(painted[f], painted.any(axis=0) & ~covered[f])  # the same path in every frame
            assert painted[f][union & ~covered[f]].mean() > 0.95  # holding the shape's other positions
            assert not (changed[f] & ~union).any()  # and nothing beyond them
        assert union.sum() > 1.5 * alone[0].sum()  # a path, not one footprint
    _, scene, edited = world.scenes(0)
    moving = scene.shapes[0]
    reverse = replace(moving, vx=-moving.vx, vy=-moving.vy)
    back, back_edited = (replace(s, shapes=(reverse, s.shapes[1])) for s in (scene, edited))
    assert np.array_equal(render(scene, 8, 32)[0], render(back, 8, 32)[0])  # the same first frame
    assert not np.array_equal(render(edited, 8, 32)[0], render(back_edited, 8, 32)[0])  # a different edit of it
    assert set(EDITS) < set(ALL_EDITS) and "trail" not in ShapesWorld(seed=0).edits  # not in the default mix
    # demo-trail trains on whole clips of its world (a window of frames would miss the path)
    from synth.experiments import layered, plan

    fit = next(s for s in plan("demo-trail") if s.module == "train")
    config = layered([ROOT / fit.args[i + 1] for i, a in enumerate(fit.args) if a == "--config"])
    prompts = yaml.safe_load((ROOT / "configs/experiments/shapes/world/trail.yaml").read_text())["prompts"]
    trail_world = shapes_world(prompts, seed=0)
    assert "trail" in trail_world.edits and config["data"]["num_frames"] == trail_world.num_frames
    assert not Scene("gray", False, ()).trail


def test_remove_moving_erases_the_moving_shape_which_one_frame_does_not_name():
    """A remove edit erases the moving shape from every frame and keeps the still one and the
    background; with the other shape moving instead, the same first frame asks for another edit."""
    world = ShapesWorld(seed=5, edits=("remove_moving",), size=32)
    for i in range(8):
        triplet, source, target = world.sample(i)
        _, scene, edited = world.scenes(i)
        moving, still = scene.shapes
        assert moving.moving and not still.moving and triplet.edit in REMOVE_WORDS
        assert edited.shapes == (replace(moving, visible=False), still)
        assert np.array_equal(target, render(replace(scene, shapes=(still,)), 8, 32))  # exactly the scene without it
        assert moving.kind not in triplet.output and still.kind in triplet.output
        right, wrong = world.regions(i)  # the which-shape score's regions: the moving shape, then the still one
        assert right.any() and wrong.any() and not (right & wrong).any()
    _, scene, _ = world.scenes(0)
    moving, still = scene.shapes
    other = Scene(scene.background, scene.gradient, (replace(moving, vx=0.0, vy=0.0), replace(still, vx=0.05, vy=0.0)))
    assert np.array_equal(render(scene, 8, 32)[0], render(other, 8, 32)[0])  # the same first frame
    erase = lambda s, i: replace(s, shapes=tuple(replace(x, visible=j != i) for j, x in enumerate(s.shapes)))
    assert not np.array_equal(render(erase(scene, 0), 8, 32)[0], render(erase(other, 1), 8, 32)[0])
    assert "remove_moving" in ALL_EDITS and "remove_moving" not in EDITS  # not in the default mix


def test_right_shape_share_tells_the_named_shape_from_a_hedge():
    """The demo's which-shape score: the exact edit scores 1, an edit that also changes the other
    shape scores less, a copy of the source has no score; the regions are the changed pixels and
    the other shape's pixels."""
    from synth.demo import region_changes, right_shape_shares

    world = ShapesWorld(seed=2, edits=("recolor_moving", "background"), size=32)
    changes, kinds, hedged, copies = [], [], [], []
    for i in range(12):
        triplet, source, target = world.sample(i)
        regions = world.regions(i)
        kind = "background" if "background" in triplet.edit else "recolor_moving"
        if kind == "background":
            assert regions is None
            continue
        right, wrong = regions
        assert np.array_equal(right, np.any(source != target, axis=-1)) and not (right & wrong).any()
        # the other region is the static shape: its colour, mostly (its rim is blended)
        still = world.scenes(i)[1].shapes[1]
        assert not still.moving and wrong.any()
        assert (np.abs(source[wrong].astype(int) - COLORS[still.color]).max(axis=-1) < 40).mean() > 0.7
        both = target.copy()
        both[wrong] = 255 - source[wrong]  # the other shape changed as well
        changes.append(region_changes(target, source, regions))
        hedged.append(region_changes(both, source, regions))
        copies.append(region_changes(source, source, regions))
        kinds.append(kind)
    assert len(kinds) >= 3
    exact = right_shape_shares(changes, kinds)["recolor_moving"]
    assert exact["two_shape_clips"] == len(kinds) and exact["right_shape_share"] == 1.0 and exact["change_wrong"] == 0
    assert 0 < right_shape_shares(hedged, kinds)["recolor_moving"]["right_shape_share"] < 0.8
    assert right_shape_shares(copies, kinds)["recolor_moving"]["right_shape_share"] is None
    one_shape = ShapesWorld(seed=0, edits=("recolor",))
    assert any(len(one_shape.scenes(i)[1].shapes) == 1 and one_shape.regions(i) is None for i in range(10))


def test_demo_world_follows_the_shards_config_and_flags_override_it(tmp_path, capsys):
    """synth.demo --world reads the synth config's prompts section (a world is written down once);
    a flag given wins; a config that is not a shapes world gets one line and exit 2 before any
    editor is loaded."""
    import argparse

    from synth.demo import held_out_prompts, main

    def settings(*flags: str) -> ShapesWorld:
        names = ("world", "num_frames", "size", "speeds", "radii", "edits")
        args = argparse.Namespace(**dict.fromkeys(names))
        for flag, value in zip(flags[::2], flags[1::2]):
            setattr(args, flag, value)
        return shapes_world(held_out_prompts(args), 0)

    large_file = ROOT / "configs/experiments/shapes/world/large.yaml"
    large = settings("world", str(large_file))  # the held-out world is the one the shards' config draws
    drawn = shapes_world(yaml.safe_load(large_file.read_text())["prompts"], 0)
    fields = ("radii", "speeds", "size", "num_frames", "edits", "counts", "draw_order")
    assert [getattr(large, f) for f in fields] == [getattr(drawn, f) for f in fields]
    assert large.radii != RADII  # and it is not the default world
    config = yaml.safe_load((ROOT / "configs/experiments/shapes/world/shapes.yaml").read_text())
    config["prompts"].update(radii=[0.15, 0.25], counts=[2], num_frames=6, edits=["swap"])
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(config))
    mine = settings("world", str(tmp_path / "world.yaml"), "edits", ["recolor_moving"])
    assert mine.radii == (0.15, 0.25) and mine.counts == (2,) and mine.num_frames == 6
    assert mine.edits == ("recolor_moving",)  # the flag wins
    plain = settings()
    assert plain.radii == RADII and plain.num_frames == 8 and plain.counts == SHAPE_COUNTS

    config["prompts"] = {"source": "template"}
    (tmp_path / "template.yaml").write_text(yaml.safe_dump(config))
    for world, message in ((tmp_path / "template.yaml", "not a shapes-world config"), (tmp_path / "none.yaml", "no config")):
        code = main(["--editor", str(tmp_path / "no-editor"), "--world", str(world), "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err
        assert not (tmp_path / "out").exists()


def test_demo_report_fields_and_an_untrained_editor_edits_both_shapes_alike(tmp_path):
    """synth.demo's report on the held-out clips of the kinds asked for; the untrained editor only
    adds noise around the source, the same on both shapes: a which-shape score near one half."""
    from model import load_editor
    from synth.demo import main

    load_editor(str(ROOT / "configs/model/shapes-pixel.yaml")).save_pretrained(tmp_path / "editor")
    code = main(["--editor", str(tmp_path / "editor"), "--out", str(tmp_path / "demo"), "--num-clips", "8",
                 "--steps", "2", "--edits", "recolor_moving", "swap", "--no-one-step", "--long-clips", "0",
                 "--picture", "", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert report["steps"] == 2 and report["num_clips"] == 8 and report["edits"] == ["recolor_moving", "swap"]
    assert set(report["by_edit"]) == {"recolor_moving", "swap"}
    assert sum(v["clips"] for v in report["by_edit"].values()) == 8
    moving = report["by_edit"]["recolor_moving"]
    assert moving["two_shape_clips"] == moving["clips"] and moving["ratio"] > 1  # noise: worse than the source
    assert 0.35 < moving["right_shape_share"] < 0.65
    assert all(np.isfinite(v["word_effect"]) and v["word_effect"] >= 0 for v in report["by_edit"].values())


def test_word_effect_is_zero_for_an_editor_blind_to_the_word():
    """word_effects: the key word is the instruction's last (the new colour or shape; none for a
    trail or a removal); the untrained editor (its U-Net's output starts at zero) and an editor whose
    text encoder returns the same states for every prompt do not move at all, and a random one,
    which does read its words, moves."""
    import torch

    from model import load_editor
    from infer import InsV2VPipeline
    from synth.demo import HELD_OUT, other_word, word_effects

    assert other_word("turn the circle into a square") == "turn the circle into a triangle"
    assert other_word("replace the square with a triangle") == "replace the square with a circle"
    assert other_word("make the moving shape red") == "make the moving shape green"
    assert other_word("change the background to pink") == "change the background to brown"
    assert other_word("remove the moving shape") is None and other_word("draw where the moving shape goes") is None
    world = ShapesWorld(seed=2, edits=("swap", "recolor", "remove_moving"))
    held_out = [world.sample(HELD_OUT + i) for i in range(9)]
    kinds = [world.kind(HELD_OUT + i) for i in range(9)]
    assert set(kinds) == set(world.edits)
    pipe = InsV2VPipeline.from_editor(load_editor(str(ROOT / "configs/model/shapes-pixel.yaml")))
    assert all(v == 0 for v in word_effects(pipe, held_out, kinds).values())  # conv_out starts at zero: the prior alone
    torch.manual_seed(0)
    torch.nn.init.normal_(pipe.editor.unet.conv_out.weight, std=0.1)  # a U-Net whose output reads the words
    effects = word_effects(pipe, held_out, kinds)
    assert set(effects) == set(kinds) - {"remove_moving"} and all(v > 0 for v in effects.values())
    assert word_effects(pipe, held_out, kinds) == effects  # seeded: the same noise for the same clips
    same = pipe.editor.encode_text([""])
    pipe.editor.encode_text = lambda prompts: same.expand(len(prompts), -1, -1)  # every prompt alike
    assert all(v == 0 for v in word_effects(pipe, held_out, kinds).values())


@pytest.mark.slow
def held_out_errors(pipes: dict, world, count: int = 16) -> dict[str, list[float]]:
    """Per editor (and for the source itself), the MSE to the exact target of ``count`` held-out
    clips, each edited whole through the editor's own sampler from the same seed."""
    import torch

    from synth.demo import HELD_OUT, mse

    errors = {name: [] for name in (*pipes, "source")}
    for i in range(count):
        triplet, source, target = world.sample(HELD_OUT + i)
        for name, pipe in pipes.items():
            edited = pipe(source, triplet.edit, clip_frames=len(source), reference_frames=0, progress=False,
                          generator=torch.Generator().manual_seed(i)).frames
            errors[name].append(mse(edited, target))
        errors["source"].append(mse(source, target))
    return errors


def test_demo_path_learns_briefly(tmp_path):
    """synth build (shapes) -> lightning fit -> edit held-out clips: the loss falls and the trained
    editor's predictions are closer to the exact targets than the untrained editor's."""
    import torch

    from infer import InsV2VPipeline
    from model import load_editor
    from train.objective import sample_timesteps

    shards = tmp_path / "shards"
    # run in tmp_path: the configs' relative output folders land there
    run = lambda *a: subprocess.run([sys.executable, "-m", *map(str, a)], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)  # noqa: E731
    proc = run("synth", "build", "--config", ROOT / "configs/experiments/shapes/world/shapes.yaml", "--out", shards, "--num-samples", 400, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("train", "fit", "--config", ROOT / "configs/experiments/shapes/recipe.yaml", "--data.shards", shards, "--trainer.max_steps", 550,
               "--model.editor", ROOT / "configs/model/shapes-pixel.yaml", "--model.export_dir", tmp_path / "editor",
               "--trainer.log_every_n_steps", 10, "--trainer.enable_progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = sorted((tmp_path / "outputs").rglob("metrics.csv"))[-1].read_text().splitlines()
    column = metrics[0].split(",").index("train/loss")
    losses = [float(r.split(",")[column]) for r in metrics[1:] if r.split(",")[column]]
    assert len(losses) >= 5 and np.isfinite(losses).all()

    # The one-step edit (the x0-prediction from pure noise, given source and instruction) of the
    # untrained editor is the source itself (its correction starts at zero); the trained editor's
    # must already be closer to the exact edit.
    world = ShapesWorld(seed=0)
    trained = InsV2VPipeline.from_pretrained(tmp_path / "editor").editor
    untrained = load_editor(str(ROOT / "configs/model/shapes-pixel.yaml"))  # the seeded initial weights

    # The training loss falls: the objective on a fixed batch of training clips (fixed noise and
    # timesteps, drawn as in training), since logged per-step losses are dominated by the random t.
    losses = {"trained": 0.0, "untrained": 0.0}
    bias = yaml.safe_load((ROOT / "configs/experiments/shapes/recipe.yaml").read_text())["model"]["timestep_bias"]
    with torch.no_grad():
        for i in range(16):
            triplet, source, target = world.sample(i)
            src, tgt = (torch.from_numpy(v).permute(3, 0, 1, 2)[None].float() / 127.5 - 1 for v in (source, target))
            gen = torch.Generator().manual_seed(i)
            noise = torch.randn(tgt.shape, generator=gen)
            t = sample_timesteps(torch.rand(1, generator=gen), 1000, bias=bias)
            for name, editor in (("trained", trained), ("untrained", untrained)):
                noisy = editor.scheduler.add_noise(tgt, noise, t)
                losses[name] += (editor.predict(noisy, src, editor.encode_text([triplet.edit]), t) - tgt).pow(2).mean().item()
    assert losses["trained"] < 0.8 * losses["untrained"]

    # What a user gets: the editor's own sampler, steps and guidance (infer edit's code path), from
    # the same seeds for both editors. Untrained, the correction is zero and the sampler draws from
    # the prior "edited clip ~ N(source, std^2)": noise around the source, worse than the source.
    assert trained.sampling and trained.sampling["num_inference_steps"] >= 10
    pipes = {"trained": InsV2VPipeline.from_editor(trained), "untrained": InsV2VPipeline.from_editor(untrained)}
    errors = held_out_errors(pipes, world)
    assert np.mean(errors["untrained"]) > np.mean(errors["source"])
    assert np.mean(errors["trained"]) < 0.7 * np.mean(errors["untrained"])


@pytest.mark.parametrize("name", list(__import__("synth.experiments", fromlist=["registry"]).registry()))
def test_each_experiment_builds_what_it_trains_on_and_its_ablation_is_a_per_frame_editor_of_its_own(name):
    """Whatever an experiment's configs say, running its plan works: every shard folder its training
    reads (in any epoch) is built by an earlier step of the same plan, the held-out clips come from
    the world of a shard set read in its last phase, and the ablation trains the same data as a
    per-frame editor (no temporal layer training, or a DiT attending within frames), into folders of its own, writing reports beside (not over) the
    experiment's."""
    from synth.experiments import layered, plan
    from train import EditorModule, ShardDataModule

    def sources(steps):
        fit = next(s for s in steps if s.module == "train")
        layers = [Path(fit.args[i + 1]) for i, a in enumerate(fit.args) if a == "--config"]
        config = layered([ROOT / layer for layer in layers])
        overrides = dict(zip(fit.args[1::2], fit.args[2::2]))
        return config, ShardDataModule(**config["data"])._sources(), overrides

    def built(steps):
        return {s.args[s.args.index("--out") + 1]: s.args[s.args.index("--config") + 1] for s in steps
                if s.module == "synth" and s.args[0] == "build"}

    main, ablation = plan(name), plan(name, ablation=True)
    for steps in (main, ablation):
        config, read, _ = sources(steps)
        shards = built(steps)
        assert {folder for _, folder, _, _ in read} <= set(shards)
        last = [folder for _, folder, _, (start, until) in read if until is None]
        reports = [s for s in steps if s.module == "synth.demo"]
        worlds = {s.args[s.args.index("--world") + 1] for s in reports}
        assert len(worlds) == 1 and worlds <= {shards[folder] for folder in last}
        order = [s.module for s in steps]
        assert order.index("train") > max(i for i, m in enumerate(order) if m == "synth")  # shards first
    main_config, _, _ = sources(main)
    abl_config, _, overrides = sources(ablation)
    assert ShardDataModule(**main_config["data"])._sources() == ShardDataModule(**abl_config["data"])._sources()
    main_editor = main_config["model"]["export_dir"]
    assert overrides["--model.export_dir"] != main_editor
    assert overrides["--trainer.default_root_dir"] != main_config["trainer"]["default_root_dir"]

    def report_names(steps):
        return {s.args[s.args.index("--report") + 1] for s in steps if s.module == "synth.demo"}

    assert report_names(main) and report_names(ablation) and not report_names(main) & report_names(ablation)
    per_frame = {}
    for label, config in (("main", main_config), ("ablation", abl_config)):
        model = {k: v for k, v in config["model"].items() if k != "export_dir"}
        editor = model["editor"]
        editor = {**editor, "extends": str(ROOT / editor["extends"])} if isinstance(editor, dict) else str(ROOT / editor)
        module = EditorModule(**{**model, "editor": editor})
        if module.editor.denoiser_name == "unet":  # a 2D U-Net per frame: the temporal layers never train
            per_frame[label] = not any(p.requires_grad for n, p in module.named_parameters() if "motion_modules." in n)
        else:  # a DiT whose self-attention stays within each frame
            per_frame[label] = module.editor.per_frame_attention
    assert per_frame == {"main": False, "ablation": True}


def test_experiments_command_lists_dry_runs_and_refuses_unknown_names(capsys):
    from synth.experiments import main

    assert main(["--list"]) == 0 and "demo-long" in capsys.readouterr().out
    assert main(["demo", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "python -m train fit --config configs/experiments/shapes/recipe.yaml" in err
    assert main(["nosuch"]) == 2
    assert capsys.readouterr().err.strip() == ("experiments: error: no experiment 'nosuch'; the recorded ones are "
                                               "demo, demo-long, demo-large, demo-big, demo-trail, demo-dit")


def test_the_dit_editor_learns_the_shapes_world_briefly(tmp_path):
    """The demo's DiT layer (configs/experiments/shapes/dit.yaml: a pixel-space Wan transformer, flow
    matching) trained briefly on the mix edits held-out clips closer to their targets than the
    source is, through its own sampler, where the untrained one does worse than the source."""
    from infer import InsV2VPipeline
    from model import load_editor

    shards = tmp_path / "shards"
    run = lambda *a: subprocess.run([sys.executable, "-m", *map(str, a)], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)  # noqa: E731
    proc = run("synth", "build", "--config", ROOT / "configs/experiments/shapes/world/shapes.yaml", "--out", shards,
               "--num-samples", 400, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("train", "fit", "--config", ROOT / "configs/experiments/shapes/recipe.yaml", "--config",
               ROOT / "configs/experiments/shapes/dit.yaml", "--data.shards", shards, "--trainer.max_steps", 300,
               "--model.editor", ROOT / "configs/model/shapes-dit.yaml", "--model.export_dir", tmp_path / "editor",
               "--trainer.enable_progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    world = ShapesWorld(seed=0)
    pipes = {"trained": InsV2VPipeline.from_pretrained(tmp_path / "editor"),
             "untrained": InsV2VPipeline.from_editor(load_editor(str(ROOT / "configs/model/shapes-dit.yaml")))}
    assert type(pipes["trained"].scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    errors = held_out_errors(pipes, world)
    assert np.mean(errors["untrained"]) > np.mean(errors["source"])
    assert np.mean(errors["trained"]) < 0.8 * np.mean(errors["source"])
