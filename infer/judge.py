"""A vision-language judge: an edit (source frames, edited frames, instruction) scored 0–9 on a rubric by any OpenAI-compatible server."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .llm import RequestStats, chat_client, complete, json_reply

# The EditVerse-Bench rubric: three criteria of 0–3 points each, 0–9 in all.
CRITERIA = {
    "instruction": "how fully the edited video does what the instruction asks",
    "preservation": "how well everything the instruction does not mention (layout, identity, motion, background) is kept",
    "quality": "how free the edited frames are of artifacts, blur, flicker and distortion",
}
MAX_POINTS = 3

RUBRIC = (
    "You grade instruction-based video edits. You see frames of the SOURCE video, then the same frames of the "
    "EDITED video, and the instruction. Give each criterion an integer from 0 (fails) to 3 (perfect):\n"
    + "".join(f'- "{name}": {text}\n' for name, text in CRITERIA.items())
    + 'Reply with one JSON object only, e.g. {"instruction": 2, "preservation": 3, "quality": 1, '
    '"reason": "one short sentence"}.'
)

class MalformedJudgment(ValueError):
    """The judge's reply is not a JSON object with every criterion scored 0–3."""


@dataclass(frozen=True)
class Judgment:
    scores: dict[str, int]
    reason: str

    @property
    def total(self) -> int:
        """The rubric's score: the sum of the criteria, 0–9."""
        return sum(self.scores.values())

    def to_json(self) -> dict[str, Any]:
        return {**self.scores, "total": self.total, "reason": self.reason}


def parse_judgment(text: str) -> Judgment:
    """The judgment in a reply: one JSON object, bare or in a ```json fence, with an integer 0–3 for
    every criterion (a float equal to an integer is accepted) and an optional ``reason``."""
    try:
        data = json_reply(text)
    except json.JSONDecodeError:
        raise MalformedJudgment(f"not JSON: {text[:60]!r}") from None
    if not isinstance(data, dict):
        raise MalformedJudgment("not a JSON object")
    scores = {}
    for name in CRITERIA:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise MalformedJudgment(f"{name!r} is not an integer score: {value!r}")
        if not 0 <= value <= MAX_POINTS:
            raise MalformedJudgment(f"{name!r}={value} is outside 0–{MAX_POINTS}")
        scores[name] = int(value)
    return Judgment(scores, str(data.get("reason", ""))[:500])


def judged_frames(num_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over the clip, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, min(count, num_frames))})


def image_data_url(frame: np.ndarray, max_side: int = 512, quality: int = 90) -> str:
    """A uint8 RGB frame as a ``data:image/jpeg;base64`` URL, its long side at most ``max_side``."""
    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode a frame as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode()


class VisionJudge:
    """Scores edits through a chat-completions server that takes images (vLLM, llama.cpp, ollama,
    hosted APIs). The key is read from ``api_key_env`` and never stored. A reply that does not parse
    is counted in ``stats.malformed`` and gives ``None``."""

    def __init__(self, base_url: str | None, model: str, api_key_env: str = "OPENAI_API_KEY", frames: int = 3,
                 max_retries: int = 4, backoff: float = 1.0, timeout: float = 120.0, max_side: int = 512):
        if not model:
            raise ValueError("the judge needs a model name")
        self.model, self.frames, self.max_side = model, int(frames), int(max_side)
        self.max_retries, self.backoff = int(max_retries), float(backoff)
        self.stats = RequestStats()
        self.client = chat_client(base_url, api_key_env, timeout)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VisionJudge":
        """From ``{base_url, model, api_key_env, frames, max_retries, backoff, timeout}``."""
        keys = ("base_url", "model", "api_key_env", "frames", "max_retries", "backoff", "timeout", "max_side")
        unknown = set(config) - set(keys) - {"threshold"}
        if unknown:
            raise ValueError(f"unknown judge option(s): {', '.join(sorted(unknown))}")
        return cls(**{k: config[k] for k in keys if config.get(k) is not None})

    def messages(self, source: np.ndarray, edited: np.ndarray, instruction: str) -> list[dict[str, Any]]:
        picked = judged_frames(len(source), self.frames)
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Instruction: {instruction}\nSOURCE frames:"}]
        content += [{"type": "image_url", "image_url": {"url": image_data_url(source[i], self.max_side)}} for i in picked]
        content.append({"type": "text", "text": "EDITED frames (same positions):"})
        content += [{"type": "image_url", "image_url": {"url": image_data_url(edited[i], self.max_side)}} for i in picked]
        return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": content}]

    def __call__(self, source: np.ndarray, edited: np.ndarray, instruction: str) -> Judgment | None:
        """The judgment of one edit, ``None`` when the reply is malformed (counted)."""
        if len(source) != len(edited):
            raise ValueError(f"source has {len(source)} frames, the edit {len(edited)}")
        text = complete(self.client, self.stats, self.max_retries, self.backoff, what="judge server",
                        model=self.model, messages=self.messages(source, edited, instruction), temperature=0.0)
        try:
            return parse_judgment(text)
        except MalformedJudgment as err:
            self.stats.malformed += 1
            self.stats.failures.append(str(err))
            return None
