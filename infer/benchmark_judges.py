"""The benchmarks' vision-language judges as published (criteria, scales, frames shown), over any OpenAI-compatible server."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .judge import image_data_url, judged_frames
from .llm import RequestStats, chat_client, complete, json_reply

# EditVerse-Bench: each sampled (before, after) frame pair gets three 0-3 criteria, 0-9 in all;
# an edit's score is the mean over its pairs.
EDITVERSE_CRITERIA = {
    "prompt_following": "does the edited frame carry out the whole editing prompt (3: fully; 2: mostly, small "
                        "misses; 1: partly or badly; 0: ignored or the opposite)",
    "edit_quality": "is the edited region itself realistic and clean (3: seamless, no artifacts; 2: good with "
                    "small visible artifacts; 1: clearly flawed; 0: garbled or failed)",
    "background_consistency": "are the parts the prompt does not touch unchanged between the two frames (3: "
                              "identical and stable; 2: small noticeable changes; 1: large distracting changes; "
                              "0: destroyed)",
}
EDITVERSE_PAIRS = 3

# OpenVE-Bench: three 1-5 criteria on the whole before/after videos, each category with its own
# anchors for compliance; consistency and quality may not exceed compliance.
OPENVE_CRITERIA = ("instruction_compliance", "consistency_detail_fidelity", "visual_quality_stability")
OPENVE_COMPLIANCE = {
    "global_style": "1: the style is absent or wrong; 3: its palette and texture show but unevenly across frames; "
                    "5: the whole video carries the style faithfully and consistently",
    "background_change": "1: no new background, or the subject replaced too; 3: the main background replaced with "
                         "missing or extra elements or spill on the subject; 5: the background is exactly what is "
                         "asked and the foreground untouched",
    "local_change": "1: the target is not replaced; 3: mostly replaced with remnants or a wrong count or place; "
                    "5: replaced exactly in class, number, position, scale, pose and motion",
    "local_remove": "1: nothing or the wrong thing removed; 3: the right object removed with ghosting or large "
                    "errors; 5: removed cleanly with everything else untouched",
    "local_add": "1: nothing or the wrong object added; 3: the right object with wrong attributes; 5: the right "
                 "object with every attribute right",
}
OPENVE_GENERIC = "1: the instruction is ignored; 3: followed with major deviations; 5: carried out completely"
OPENVE_FRAMES = 8  # frames of each video shown when the server takes images, not video files


@dataclass
class JudgeSettings:
    """Which judge and how it was asked: recorded with every score."""

    base_url: str | None
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_retries: int = 4
    backoff: float = 1.0
    timeout: float = 120.0
    max_side: int = 512

    def record(self) -> dict[str, Any]:
        return {"judge_model": self.model, "judge_temperature": self.temperature}


class BenchmarkJudge:
    """A judge for one benchmark: ``score(item, source, edited)`` is a dict of the benchmark's
    fields (``None`` values when a reply could not be read). Thread-safe: one client, counters
    under the GIL."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.stats = RequestStats()
        self.client = chat_client(settings.base_url, settings.api_key_env, settings.timeout)

    def ask(self, content: list[dict[str, Any]], system: str) -> str:
        s = self.settings
        return complete(self.client, self.stats, s.max_retries, s.backoff, what="judge server", model=s.model,
                        temperature=s.temperature,
                        messages=[{"role": "system", "content": system}, {"role": "user", "content": content}])

    def image(self, frame: np.ndarray) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": image_data_url(frame, self.settings.max_side)}}

    def video(self, frames: np.ndarray, fps: float = 8.0) -> dict[str, Any]:
        """Frames as one ``video_url`` part: an H.264 mp4 data URL (vLLM's OpenAI server takes it)."""
        import base64
        import tempfile
        from pathlib import Path

        from .video_writer import write_video

        with tempfile.TemporaryDirectory() as tmp:
            data = Path(write_video(Path(tmp) / "clip.mp4", frames, fps, exact=True)).read_bytes()
        return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}

    def malformed(self, why: str) -> None:
        self.stats.malformed += 1
        self.stats.failures.append(why)


def editverse_pairs(num_frames: int, pairs: int = EDITVERSE_PAIRS) -> list[int]:
    """The frames EditVerse-Bench's judge sees: ``0, F // 3, 2 F // 3`` (its script's stride of
    ``F // 3`` from the first frame, three pairs)."""
    return list(range(0, num_frames, max(1, num_frames // pairs)))[:pairs]


def integer_scores(text: str, names: tuple[str, ...], low: int, high: int) -> dict[str, int] | None:
    """The integer criteria of a JSON reply (bare or fenced), each in ``low..high``; ``None`` if any is missing."""
    try:
        data = json_reply(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    scores = {}
    for name in names:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not low <= value <= high:
            return None
        scores[name] = int(value)
    return scores


class EditVerseJudge(BenchmarkJudge):
    """EditVerse-Bench's judge: each sampled (before, after) pair scored on prompt following, edit
    quality and background consistency, 0–3 each; ``editverse_score`` is the mean pair total, 0–9."""

    system = ("You evaluate one frame of an instruction-based video edit. You see the frame BEFORE the edit, then "
              "the same frame AFTER it, and the editing prompt. Score each criterion with an integer 0-3:\n"
              + "".join(f'- "{k}": {v}\n' for k, v in EDITVERSE_CRITERIA.items())
              + 'Answer with one JSON object only: {"prompt_following": n, "edit_quality": n, '
                '"background_consistency": n, "reason": "a short sentence"}.')

    def score(self, item, source: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
        totals, criteria = [], {k: [] for k in EDITVERSE_CRITERIA}
        prompt = item.extra.get("text", item.instruction)
        for i in editverse_pairs(min(len(source), len(edited))):
            content = [{"type": "text", "text": f"Editing prompt: {prompt}\nBEFORE:"}, self.image(source[i]),
                       {"type": "text", "text": "AFTER:"}, self.image(edited[i])]
            scores = integer_scores(self.ask(content, self.system), tuple(EDITVERSE_CRITERIA), 0, 3)
            if scores is None:
                self.malformed(f"{item.key} frame {i}")
                continue
            totals.append(sum(scores.values()))
            for k, v in scores.items():
                criteria[k].append(v)
        if not totals:
            return {"editverse_score": None, **dict.fromkeys(EDITVERSE_CRITERIA)}
        return {"editverse_score": float(np.mean(totals)), **{k: float(np.mean(v)) for k, v in criteria.items()}}


class OpenVEJudge(BenchmarkJudge):
    """OpenVE-Bench's judge: the before and after videos, whole (``videos``: two ``video_url``
    parts, for a server that takes video) or as ``frames`` evenly spaced frames each, scored 1–5
    on instruction compliance (with the category's anchors), consistency and detail fidelity, and
    visual quality and stability; ``openve_score`` is their mean."""

    def __init__(self, settings: JudgeSettings, frames: int = OPENVE_FRAMES, videos: bool = False):
        super().__init__(settings)
        self.frames, self.videos = frames, videos

    def system(self, category: str) -> str:
        return ("You rate an instruction-based video edit. You see frames of the video BEFORE editing, then the same "
                "frames AFTER editing, and the instruction. Score each criterion with an integer 1-5:\n"
                f'- "instruction_compliance": {OPENVE_COMPLIANCE.get(category, OPENVE_GENERIC)}\n'
                '- "consistency_detail_fidelity": 1: broken, flickering or visibly composited; 3: acceptable with '
                "noticeable seams or instability; 5: seamless and stable over time\n"
                '- "visual_quality_stability": 1: severe artifacts, wrong light or motion; 3: believable with minor '
                "flaws; 5: physically and temporally flawless\n"
                "The second and third scores may not exceed the first. Answer with one JSON object only: "
                '{"instruction_compliance": n, "consistency_detail_fidelity": n, "visual_quality_stability": n, '
                '"reason": "at most 20 words"}.')

    def score(self, item, source: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
        if self.videos:
            before, after = [self.video(source)], [self.video(edited)]
        else:
            picked = judged_frames(min(len(source), len(edited)), self.frames)
            before, after = [self.image(source[i]) for i in picked], [self.image(edited[i]) for i in picked]
        content = [{"type": "text", "text": f"Instruction: {item.instruction}\nBEFORE editing:"}, *before,
                   {"type": "text", "text": "AFTER editing:"}, *after]
        scores = integer_scores(self.ask(content, self.system(item.category)), OPENVE_CRITERIA, 1, 5)
        if scores is None:
            self.malformed(item.key)
            return {"openve_score": None, **dict.fromkeys(OPENVE_CRITERIA)}
        return {"openve_score": float(np.mean(list(scores.values()))), **scores}


def yes_no(text: str) -> str | None:
    """``yes``/``no`` from the first word of a reply."""
    match = re.match(r"\W*(yes|no)\b", text.strip().lower())
    return match.group(1) if match else None


def choice(text: str) -> str | None:
    """The letter of a multiple-choice reply (``b``, ``B)``, ``(b)``, ``Answer: b``)."""
    match = re.search(r"(?:^|answer\W*|\()\s*([a-e])\b", text.strip().lower())
    return match.group(1) if match else None


def five_accuracies(source_answer: str | None, target_answer: str | None, choice_answer: str | None,
                    has_source_question: bool) -> dict[str, float]:
    """FiVE-Acc of one edit: yes/no is right when the edited video answers the source question
    "no" and the target question "yes" (the target alone without a source question); multiple
    choice is right when it picks "b"; their union, intersection and the mean of the four."""
    yn = float(target_answer == "yes" and (source_answer == "no" or not has_source_question))
    mc = float(choice_answer == "b")
    union, inter = float(yn or mc), float(yn and mc)
    return {"five_yn": yn, "five_mc": mc, "five_union": union, "five_inter": inter,
            "five_acc": (yn + mc + union + inter) / 4}


class FiVEJudge(BenchmarkJudge):
    """FiVE-Bench's question judge on the edited video (``frames`` evenly spaced frames)."""

    def __init__(self, settings: JudgeSettings, frames: int = 4):
        super().__init__(settings)
        self.frames = frames

    def score(self, item, source: np.ndarray, edited: np.ndarray) -> dict[str, Any]:
        questions = item.extra.get("questions") or {}
        if "target_yes_no_question" not in questions or "multiple_choice_question" not in questions:
            return dict.fromkeys(("five_yn", "five_mc", "five_union", "five_inter", "five_acc"))
        images = [self.image(edited[i]) for i in judged_frames(len(edited), self.frames)]

        def answer(question: str, kind: str) -> str:
            ask = ("Answer the question about this video with only YES or NO.\n" if kind == "yes/no" else
                   "Choose the correct answer from the choices; answer with its letter only.\n")
            return self.ask([{"type": "text", "text": ask + question}, *images], "You answer questions about a video.")

        source_q = questions.get("source_yes_no_question")
        source_answer = yes_no(answer(source_q, "yes/no")) if source_q else None
        target_answer = yes_no(answer(questions["target_yes_no_question"], "yes/no"))
        choice_answer = choice(answer(questions["multiple_choice_question"], "choice"))
        if target_answer is None or choice_answer is None or (source_q and source_answer is None):
            self.malformed(item.key)
        return five_accuracies(source_answer, target_answer, choice_answer, bool(source_q))


JUDGES = {"editverse": EditVerseJudge, "openve": OpenVEJudge, "five": FiVEJudge}
JUDGED_FIELDS = {
    "editverse": ("editverse_score", *EDITVERSE_CRITERIA),
    "openve": ("openve_score", *OPENVE_CRITERIA),
    "five": ("five_yn", "five_mc", "five_union", "five_inter", "five_acc"),
    "v2vbench": (), "tgve": (),
}
HEADLINE = {"editverse": "editverse_score", "openve": "openve_score", "five": "five_acc"}
