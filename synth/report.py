"""`synth report`: counts, acceptance, rejection reasons and CLIP-score histograms of a build."""

from __future__ import annotations

import collections
from pathlib import Path

import cv2
import numpy as np

from .writer import MANIFEST_GLOB, atomic_write, read_attempts, read_manifest

SCORES = ("sim_src_text", "sim_tgt_text", "sim_direction", "sim_frames")


def histogram_panel(values: list[float], title: str, size: tuple[int, int] = (200, 320), bins: int = 20) -> np.ndarray:
    """A histogram drawn as an image (OpenCV, no plotting library)."""
    h, w = size
    panel = np.full((h, w, 3), 255, np.uint8)
    cv2.putText(panel, title, (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if values:
        lo, hi = min(min(values), 0.0), max(max(values), 1e-6)
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
        top, bottom, bar_w = 30, h - 24, (w - 16) / bins
        for i, c in enumerate(counts):
            height = int((bottom - top) * c / max(counts.max(), 1))
            x0 = int(8 + i * bar_w)
            cv2.rectangle(panel, (x0, bottom - height), (int(x0 + bar_w) - 1, bottom), (180, 120, 40), -1)
        for x, label in ((8, f"{edges[0]:.2f}"), (w - 48, f"{edges[-1]:.2f}")):
            cv2.putText(panel, label, (x, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def report(folder: Path) -> str:
    """Write ``report.txt`` and ``report.png`` into ``folder`` and return the text."""
    if not list(folder.glob(MANIFEST_GLOB)):
        raise FileNotFoundError(f"{folder} holds no rank manifest ({MANIFEST_GLOB}): not a synth build folder")
    manifest = read_manifest(folder)
    attempts = read_attempts(folder)
    kept = [a for a in attempts if a["kept"]]
    reasons = collections.Counter()
    for a in attempts:
        if not a["kept"]:
            for part in (a["reason"] or "unknown").split(", "):
                reasons[part.split("=")[0]] += 1
    lines = [
        f"build folder      {folder}",
        f"shards            {len(manifest['shards'])}",
        f"world size        {manifest['world']}",
        f"kept pairs        {manifest.get('total_samples', 0)}",
        f"attempts          {len(attempts)}",
        f"acceptance rate   {len(kept) / len(attempts):.1%}" if attempts else "acceptance rate   n/a",
        "ranks             " + ", ".join(f"{r}: {s['samples']} kept" for r, s in sorted(manifest["ranks"].items())),
        "rejections        " + (", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "none"),
    ]
    for field, title in (("set", "per set"), ("category", "per category")):  # imported sets say both
        groups = collections.defaultdict(lambda: [0, 0])
        for a in attempts:
            if a.get(field) is not None:
                groups[a[field]][0] += bool(a["kept"])
                groups[a[field]][1] += 1
        if groups:
            lines.append(f"{title:17s} " + ", ".join(f"{k}: {kept}/{seen} kept" for k, (kept, seen) in sorted(groups.items())))
    scored = [a for a in attempts if a.get("scores")]
    for name in SCORES:
        values = [a["scores"][name] for a in scored if a["scores"].get(name) is not None]
        if values:
            lines.append(f"{name:17s} mean {np.mean(values):.3f}  min {np.min(values):.3f}  max {np.max(values):.3f}")
    judged = [a["judge"]["total"] for a in attempts if a.get("judge")]
    if judged:
        lines.append(f"judge (0-9)       mean {np.mean(judged):.2f}  min {min(judged)}  max {max(judged)}  ({len(judged)} judged)")
    text = "\n".join(lines)
    atomic_write(folder / "report.txt", (text + "\n").encode())
    panels = [histogram_panel([a["scores"][n] for a in scored if a["scores"].get(n) is not None], n) for n in SCORES]
    image = np.concatenate([np.concatenate(panels[:2], 1), np.concatenate(panels[2:], 1)], 0)
    ok, png = cv2.imencode(".png", image)
    atomic_write(folder / "report.png", png.tobytes())
    return text
