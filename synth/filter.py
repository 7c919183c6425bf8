"""Pair filters: CLIP scores against the captions and the source, and an optional vision-language judge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from infer.clip_scorer import ClipScorer, pair_scores
from infer.judge import VisionJudge


@dataclass(frozen=True)
class Thresholds:
    """Minimum scores (the InsV2V defaults: 0.2, 0.2, 0.2, 0.5)."""

    sim_src_text: float = 0.2
    sim_tgt_text: float = 0.2
    sim_direction: float = 0.2
    sim_frames: float = 0.5


def rejection_reason(scores: dict[str, float | None], thresholds: Thresholds) -> str | None:
    """``None`` when every score passes its threshold, else the failing scores. A score that could
    not be computed (``None``: no caption) is not checked."""
    failed = [f"{name}={scores[name]:.3f}<{limit:g}" for name, limit in vars(thresholds).items()
              if scores.get(name) is not None and not scores[name] > limit]
    return ", ".join(failed) or None


class ClipFilter:
    def __init__(self, scorer: ClipScorer, thresholds: Thresholds):
        self.scorer, self.thresholds = scorer, thresholds

    def scores(self, source: np.ndarray, edited: np.ndarray, input_caption: str | None,
               output_caption: str | None) -> dict[str, float | None]:
        """The four scores of a pair; without both captions only ``sim_frames`` is defined."""
        text = self.scorer.text_embeds([input_caption, output_caption]) if input_caption and output_caption else (None, None)
        return pair_scores(self.scorer.image_embeds(source), self.scorer.image_embeds(edited), text[0], text[1])

    def __call__(self, source: np.ndarray, edited: np.ndarray, input_caption: str | None,
                 output_caption: str | None) -> tuple[dict[str, float | None], str | None]:
        """The scores of a pair and the rejection reason (``None``: keep)."""
        scores = self.scores(source, edited, input_caption, output_caption)
        return scores, rejection_reason(scores, self.thresholds)


@dataclass
class Verdict:
    """What the filters said of one pair."""

    clip: dict[str, float | None] | None
    judge: dict[str, Any] | None
    reason: str | None

    @property
    def kept(self) -> bool:
        return self.reason is None

    def record(self) -> dict[str, Any]:
        """The verdict's fields of an attempt line."""
        return {"kept": self.kept, "reason": self.reason, "scores": self.clip,
                **({"judge": self.judge} if self.judge is not None else {})}


class JudgeFilter:
    """Keep a pair when the judge's total (0–9) reaches ``threshold``; a malformed reply rejects it."""

    def __init__(self, judge: VisionJudge, threshold: float):
        self.judge, self.threshold = judge, float(threshold)

    def __call__(self, source: np.ndarray, edited: np.ndarray, instruction: str) -> tuple[dict[str, Any] | None, str | None]:
        judgment = self.judge(source, edited, instruction)
        if judgment is None:
            return None, "judge: malformed reply"
        reason = None if judgment.total >= self.threshold else f"judge={judgment.total}<{self.threshold:g}"
        return judgment.to_json(), reason


def check_pair(source: np.ndarray, edited: np.ndarray, instruction: str, captions: tuple[str | None, str | None],
               clip_filter: ClipFilter | None, judge: JudgeFilter | None) -> Verdict:
    """Run the configured filters in order of cost: CLIP first, the judge only on what CLIP keeps."""
    scores, reason = clip_filter(source, edited, *captions) if clip_filter is not None else (None, None)
    judged = None
    if reason is None and judge is not None:
        judged, reason = judge(source, edited, instruction)
    return Verdict(scores, judged, reason)
