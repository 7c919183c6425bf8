"""The CLIP filter: keep a rendered pair only if it is faithful to its captions and to its source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infer.clip import ClipScorer, pair_scores

from .triplets import Triplet


@dataclass(frozen=True)
class Thresholds:
    """Minimum scores (SPEC §7 defaults: 0.2, 0.2, 0.2, 0.5)."""

    sim_src_text: float = 0.2
    sim_tgt_text: float = 0.2
    sim_direction: float = 0.2
    sim_frames: float = 0.5


def judge(scores: dict[str, float], thresholds: Thresholds) -> str | None:
    """``None`` when every score passes its threshold, else the reason (the failing scores)."""
    failed = [f"{name}={scores[name]:.3f}<{limit:g}" for name, limit in vars(thresholds).items() if not scores[name] > limit]
    return ", ".join(failed) or None


class ClipFilter:
    def __init__(self, scorer: ClipScorer, thresholds: Thresholds):
        self.scorer, self.thresholds = scorer, thresholds

    def __call__(self, source: np.ndarray, edited: np.ndarray, triplet: Triplet) -> tuple[dict[str, float], str | None]:
        """The four scores of a pair and the rejection reason (``None``: keep)."""
        text = self.scorer.text_embeds([triplet.input, triplet.output])
        scores = pair_scores(self.scorer.image_embeds(source), self.scorer.image_embeds(edited), text[0], text[1])
        return scores, judge(scores, self.thresholds)
