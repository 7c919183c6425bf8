"""Shapes world: procedural clips of moving shapes with an instruction and the exact edited clip."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import cv2
import numpy as np

from .triplets import Triplet

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (15, 15, 15), "white": (235, 235, 235), "blue": (60, 90, 200),
               "green": (60, 150, 80), "pink": (230, 150, 180), "brown": (130, 90, 50)}
SHAPES = ("circle", "square", "triangle")
# Per-frame speed of a moving shape, as a fraction of the frame (low, high). Faster shapes
# (0.08-0.14) were tried to make the motion plainer; they did not help the moving-shape edit.
SPEEDS = (0.03, 0.08)
# A shape's radius, as a fraction of the frame (low, high): 2-3.5 px at 16 px, where a circle and a
# square of the same size differ in a few corner pixels.
RADII = (0.12, 0.22)
# How many shapes a scene has, drawn from this list (a recolour-the-moving-shape scene always has
# two): by default one shape in two scenes of three.
SHAPE_COUNTS = (1, 1, 2)
# The order a scene's shapes are listed in, drawn in (later on top) and named in its caption.
# "listed": as drawn up, where a moving-shape scene always lists (and so draws) the still shape
# last, on top: a single frame that hides part of one shape under the other tells which one moves
# (in nine frames of ten of the big-shapes world). "shuffled": a fresh order every scene.
DRAW_ORDERS = ("listed", "shuffled")
MOTION_WORDS = {True: ["bouncing around", "moving", "gliding", "sliding"], False: ["resting", "standing still", "sitting"]}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float  # centre, in [0, 1] of the frame
    y: float
    size: float  # radius, fraction of the frame
    vx: float  # per frame, fraction of the frame
    vy: float
    visible: bool = True  # False: removed by an edit (kept in place so scenes still pair shape by shape)

    @property
    def moving(self) -> bool:
        return abs(self.vx) + abs(self.vy) > 0


@dataclass(frozen=True)
class Scene:
    background: str
    gradient: bool
    shapes: tuple[Shape, ...]
    trail: bool = False  # every moving shape's whole path painted in its colour under every frame


def positions(shape: Shape, frames: int) -> list[tuple[float, float]]:
    """Centres over time; a shape bounces off the frame's edges (reflecting its velocity)."""
    out, x, y, vx, vy = [], shape.x, shape.y, shape.vx, shape.vy
    for _ in range(frames):
        out.append((x, y))
        x, y = x + vx, y + vy
        if not shape.size <= x <= 1 - shape.size:
            vx, x = -vx, min(max(x, shape.size), 1 - shape.size)
        if not shape.size <= y <= 1 - shape.size:
            vy, y = -vy, min(max(y, shape.size), 1 - shape.size)
    return out


def _draw(canvas: np.ndarray, shape: Shape, cx: float, cy: float, r: float, value) -> None:
    """Fill ``shape`` centred at pixel ``(cx, cy)`` with radius ``r`` on ``canvas`` (in place)."""
    if shape.kind == "circle":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r)), value, -1)
    elif shape.kind == "square":
        cv2.rectangle(canvas, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), value, -1)
    else:
        pts = np.array([[cx, cy - r], [cx - r, cy + r * 0.8], [cx + r, cy + r * 0.8]], np.int32)
        cv2.fillPoly(canvas, [pts], value)


def render(scene: Scene, frames: int, size: int, supersample: int = 4) -> np.ndarray:
    """uint8 ``(F, size, size, 3)``; drawn ``supersample`` times larger and area-averaged (anti-aliased),
    each frame's shapes in the scene's order (a later one covers an earlier one)."""
    big = size * supersample
    base = np.empty((big, big, 3), np.float32)
    color = np.array(BACKGROUNDS[scene.background], np.float32)
    if scene.gradient:  # a vertical fade from the colour to a darker shade
        base[:] = color * np.linspace(1.0, 0.55, big, dtype=np.float32)[:, None, None]
    else:
        base[:] = color
    base = base.astype(np.uint8)
    shapes = [s for s in scene.shapes if s.visible]
    tracks = [positions(s, frames) for s in shapes]
    for shape, track in zip(shapes, tracks):
        if scene.trail and shape.moving:  # every place the shape visits, in every frame: only the clip's motion tells
            for x, y in track:
                _draw(base, shape, x * big, y * big, shape.size * big, COLORS[shape.color])
    video = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        canvas = base.copy()
        for shape, track in zip(shapes, tracks):
            _draw(canvas, shape, track[f][0] * big, track[f][1] * big, shape.size * big, COLORS[shape.color])
        video[f] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return video


def shape_masks(scene: Scene, frames: int, size: int) -> list[np.ndarray]:
    """Per shape of ``scene`` (in its order), bool ``(F, size, size)``: where the shape shows when
    drawn alone on the scene's background (anti-aliased rims of a few levels are not the shape)."""
    empty = render(replace(scene, shapes=()), frames, size).astype(int)
    return [np.abs(render(replace(scene, shapes=(shape,)), frames, size).astype(int) - empty).max(axis=-1) > 8
            for shape in scene.shapes]


def edited_regions(scene: Scene, edited: Scene, frames: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Where an object edit belongs and where it does not: bool ``(F, size, size)`` masks of the
    pixels the edit changes, and of the other shapes' pixels outside them. ``None`` for a background
    edit, or a scene with no other shape in sight that could be edited by mistake."""
    index = [i for i, (a, b) in enumerate(zip(scene.shapes, edited.shapes)) if a != b]
    if len(scene.shapes) < 2 or not index:
        return None
    before, after = render(scene, frames, size).astype(int), render(edited, frames, size).astype(int)
    right = np.abs(before - after).max(axis=-1) > 0
    wrong = np.zeros_like(right)
    for i, mask in enumerate(shape_masks(scene, frames, size)):
        if i != index[0]:
            wrong |= mask
    wrong &= ~right
    return (right, wrong) if wrong.any() else None  # the other shape hidden throughout


def caption(scene: Scene, rng: random.Random) -> str:
    parts = []
    for s in (s for s in scene.shapes if s.visible):
        parts.append(f"a {s.color} {s.kind} {rng.choice(MOTION_WORDS[s.moving])}"
                     + (" leaving a trail" if scene.trail and s.moving else ""))
    bg = f"a {scene.background} {'gradient ' if scene.gradient else ''}background"
    return f"{' and '.join(parts)} on {bg}"


EDITS = ("recolor", "background", "swap", "recolor_moving")
# Edits a world may ask for besides the default mix. "trail" paints the moving shape's whole path,
# in its own colour, under every frame (a long exposure): no single frame shows the path, so a
# per-frame editor cannot make it, and no colour has to be read from the instruction.
# "remove_moving" erases the moving shape of a scene with one moving and one still shape: one frame
# does not say which of the two to erase, and no colour or shape name has to be read.
ALL_EDITS = EDITS + ("trail", "remove_moving")
TRAIL_WORDS = ("leave a trail behind the moving shape", "show the path of the moving shape",
               "draw where the moving shape goes")
REMOVE_WORDS = ("remove the moving shape", "erase the moving shape", "delete the moving shape")
# edits that name "the moving shape": their scenes have one moving and one still shape
MOTION_EDITS = ("recolor_moving", "trail", "remove_moving")


def random_scene(rng: random.Random, need_static: bool = False, speeds: tuple[float, float] = SPEEDS,
                 radii: tuple[float, float] = RADII, counts: tuple[int, ...] = SHAPE_COUNTS) -> Scene:
    count = 2 if need_static else rng.choice(counts)
    kinds = rng.sample(SHAPES, count)
    background = rng.choice(list(BACKGROUNDS))
    palette = [c for c in COLORS if c != background]  # a shape never vanishes into its background
    shapes = []
    for i, kind in enumerate(kinds):
        size = rng.uniform(*radii)
        moving = not (need_static and i == 1)
        speed = rng.uniform(*speeds) if moving else 0.0
        angle = rng.uniform(0, 2 * np.pi)
        shapes.append(Shape(kind, rng.choice(palette), rng.uniform(size, 1 - size), rng.uniform(size, 1 - size),
                            size, speed * np.cos(angle), speed * np.sin(angle)))
    return Scene(background, rng.random() < 0.4, tuple(shapes))


def edit_scene(scene: Scene, kind: str, rng: random.Random, swap_into: tuple[str, ...] = SHAPES) -> tuple[Scene, str]:
    """The edited scene (identical motion) and the instruction that asks for it; a swap turns a
    shape into one of ``swap_into``, a kind the scene lacks where there is one."""
    if kind == "background":
        used = {s.color for s in scene.shapes} | {scene.background}
        new = rng.choice([b for b in BACKGROUNDS if b not in used])
        verb = rng.choice(["make the background", "change the background to", "turn the background"])
        return replace(scene, background=new), f"{verb} {new}"
    if kind == "trail":
        return replace(scene, trail=True), rng.choice(TRAIL_WORDS)
    index = rng.randrange(len(scene.shapes))
    if kind in MOTION_EDITS:  # the trail returned above
        index = next(i for i, s in enumerate(scene.shapes) if s.moving)
    target = scene.shapes[index]
    shapes = list(scene.shapes)
    if kind == "remove_moving":
        shapes[index] = replace(target, visible=False)
        text = rng.choice(REMOVE_WORDS)
    elif kind == "swap":
        others = ([k for k in swap_into if k not in {s.kind for s in scene.shapes}]
                  or [k for k in swap_into if k != target.kind])
        new_kind = rng.choice(others)
        shapes[index] = replace(target, kind=new_kind)
        text = rng.choice([f"turn the {target.kind} into a {new_kind}", f"replace the {target.kind} with a {new_kind}"])
    else:
        new_color = rng.choice([c for c in COLORS if c not in {s.color for s in scene.shapes} | {scene.background}])
        shapes[index] = replace(target, color=new_color)
        name = "moving shape" if kind == "recolor_moving" else target.kind
        text = rng.choice([f"make the {name} {new_color}", f"paint the {name} {new_color}", f"color the {name} {new_color}"])
    return replace(scene, shapes=tuple(shapes)), text


def _range(name: str, pair) -> tuple[float, float]:
    """``(low, high)`` as floats with 0 < low <= high < 0.5 (of the frame), else one clear ValueError."""
    try:  # from a config: anything but two numbers gets the same one-line error
        low, high = (float(v) for v in pair)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 < low <= high < 0.5:
        raise ValueError(f"shapes {name} must be [low, high] with 0 < low <= high < 0.5, got {pair!r}")
    return low, high


def _counts(counts) -> tuple[int, ...]:
    """Shape counts to draw from: a non-empty list of 1, 2 or 3, else one clear ValueError."""
    try:
        out = tuple(int(c) for c in counts)
        ok = bool(out) and all(c in (1, 2, 3) and c == v for c, v in zip(out, counts))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"shapes counts must be a list of 1, 2 or 3 (shapes per scene), got {counts!r}")
    return out


def _swap_into(kinds, counts: tuple[int, ...]) -> tuple[str, ...]:
    """The shape kinds a swap may make, in :data:`SHAPES` order, else one clear ValueError. A
    narrower list leaves enough other kinds for a scene of the most shapes (its scenes hold none
    of the listed kinds, so every swap changes a shape)."""
    given = [kinds] if isinstance(kinds, str) else kinds
    try:
        ok = bool(given) and all(k in SHAPES for k in given)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"shapes swap_into must be a non-empty list of {', '.join(SHAPES)}, got {kinds!r}")
    out = tuple(k for k in SHAPES if k in given)
    if len(out) < len(SHAPES) and len(SHAPES) - len(out) < max(counts):
        raise ValueError(f"shapes swap_into {list(out)} leaves {len(SHAPES) - len(out)} other kind(s) for scenes of "
                         f"up to {max(counts)} shapes; list fewer kinds or lower counts")
    return out


class ShapesWorld:
    """Triplets and exact (source, edited) clips as a pure function of (seed, index)."""

    def __init__(self, seed: int = 0, num_frames: int = 8, size: int = 16, edits: tuple[str, ...] = EDITS,
                 speeds: tuple[float, float] = SPEEDS, radii: tuple[float, float] = RADII,
                 counts: tuple[int, ...] = SHAPE_COUNTS, swap_into: tuple[str, ...] = SHAPES,
                 draw_order: str = "listed"):
        unknown = set(edits) - set(ALL_EDITS)
        if unknown:
            raise ValueError(f"unknown shapes edits {sorted(unknown)}; choose from {ALL_EDITS}")
        self.seed, self.num_frames, self.size, self.edits = seed, num_frames, size, tuple(edits)
        self.speeds = _range("speeds", speeds)
        self.radii = _range("radii", radii)
        self.counts = _counts(counts)
        self.swap_into = _swap_into(swap_into, self.counts)
        if draw_order not in DRAW_ORDERS:
            raise ValueError(f"shapes draw_order must be one of {', '.join(DRAW_ORDERS)}, got {draw_order!r}")
        self.draw_order = draw_order

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)

    def kind(self, index: int) -> str:
        """The edit kind of clip ``index`` (one of ``self.edits``)."""
        return self._rng(index).choice(self.edits)

    def scenes(self, index: int) -> tuple[Triplet, Scene, Scene]:
        """The triplet and the (source, edited) scenes behind clip ``index``."""
        rng = self._rng(index)
        kind = rng.choice(self.edits)  # the draw kind() repeats
        scene = random_scene(rng, need_static=kind in MOTION_EDITS, speeds=self.speeds, radii=self.radii,
                             counts=self.counts)
        while kind == "swap" and self.swap_into != SHAPES and any(s.kind in self.swap_into for s in scene.shapes):
            # a narrowed swap needs a shape to change: redraw until no shape is already a listed kind
            scene = random_scene(rng, speeds=self.speeds, radii=self.radii, counts=self.counts)
        if self.draw_order == "shuffled":  # drawn only here, so the listed world stays clip for clip as it was
            scene = replace(scene, shapes=tuple(rng.sample(scene.shapes, len(scene.shapes))))
        edited, instruction = edit_scene(scene, kind, rng, self.swap_into)
        words = random.Random(rng.random())  # same wording for both captions' motion words
        state = words.getstate()
        source_caption = caption(scene, words)
        words.setstate(state)
        return Triplet(source_caption, instruction, caption(edited, words)), scene, edited

    def sample(self, index: int) -> tuple[Triplet, np.ndarray, np.ndarray]:
        triplet, scene, edited = self.scenes(index)
        return triplet, render(scene, self.num_frames, self.size), render(edited, self.num_frames, self.size)

    def regions(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Clip ``index``'s :func:`edited_regions`."""
        _, scene, edited = self.scenes(index)
        return edited_regions(scene, edited, self.num_frames, self.size)


class ShapesSource:
    """The shapes world as a triplet source for ``synth build`` (``prompts.source: shapes``)."""

    def __init__(self, world: ShapesWorld):
        self.world = world

    def __iter__(self):
        index = 0
        while True:
            yield self.world.sample(index)[0]
            index += 1
