"""Triplet sources: (input caption, instruction, edited caption) from an LLM, a JSONL file or templates."""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from infer.llm import RequestStats, chat_client, complete, json_reply

MIN_WORDS, MAX_CHARS = 2, 300


@dataclass(frozen=True)
class Triplet:
    input: str
    edit: str
    output: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def validate(item: Any) -> Triplet:
    """A :class:`Triplet` from a mapping, or ``ValueError`` saying what is wrong.

    Rules: the three fields are non-empty strings of ``MIN_WORDS`` words to ``MAX_CHARS``
    characters, and the edit changes the caption (output differs from input).
    """
    if not isinstance(item, dict):
        raise ValueError("not an object")
    fields = {}
    for key in ("input", "edit", "output"):
        value = item.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing or empty '{key}'")
        value = " ".join(value.split())
        if len(value) > MAX_CHARS or len(value.split()) < MIN_WORDS:
            raise ValueError(f"'{key}' length out of bounds")
        fields[key] = value
    if fields["input"].lower() == fields["output"].lower():
        raise ValueError("the edit does not change the caption")
    return Triplet(**fields)


def parse_reply(text: str) -> tuple[list[Triplet], int]:
    """Triplets from an LLM reply: one JSON object or a list of them, bare or in a ```json fence.

    Returns the valid triplets and how many items were malformed or invalid (a reply that is not
    JSON at all counts as one).
    """
    try:
        data = json_reply(text)
    except json.JSONDecodeError:
        return [], 1
    items = data if isinstance(data, list) else [data]
    good, bad = [], 0
    for item in items:
        try:
            good.append(validate(item))
        except ValueError:
            bad += 1
    return good, bad


@dataclass
class SourceStats(RequestStats):
    duplicates: int = 0
    accepted: int = 0


class TemplateSource:
    """An offline combinatorial generator of video editing triplets (the embedded default)."""

    SUBJECTS = ["a man", "a woman", "a dog", "a cat", "a horse", "a car", "a bird", "a boat", "a train", "a girl"]
    ACTIONS = {
        "a man": ["walking on the beach", "riding a bike down the street", "running through the forest"],
        "a woman": ["dancing in the city", "walking along the river", "surfing on the ocean"],
        "a dog": ["running across the sand", "jumping in the snow", "swimming in the lake"],
        "a cat": ["walking on the road", "jumping over a box", "running in the grass"],
        "a horse": ["running in the mountains", "walking along the beach", "jumping over the river"],
        "a car": ["driving down the road", "turning on the street", "driving through the city"],
        "a bird": ["flying over the sea", "flying across the sky", "flying through the trees"],
        "a boat": ["moving across the lake", "sailing on the ocean", "moving down the river"],
        "a train": ["moving through the mountains", "driving across the city", "moving along the river"],
        "a girl": ["running on the beach", "riding a horse", "dancing in the rain"],
    }
    STYLES = ["van gogh style", "watercolor painting", "pixel art", "anime style", "oil painting", "lego style"]
    WEATHER = {"snowy": "in the snow", "rainy": "in the rain", "sunset": "at sunset", "night": "at night"}
    SWAPS = {"a dog": "a cat", "a cat": "a dog", "a man": "a woman", "a woman": "a man", "a car": "a truck",
             "a horse": "a zebra", "a bird": "a plane", "a boat": "a ship", "a train": "a bus", "a girl": "a boy"}

    def __init__(self, seed: int = 0):
        self.seed = seed

    def triplet(self, index: int) -> Triplet:
        """The ``index``-th triplet: a pure function of (seed, index)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        subject = rng.choice(self.SUBJECTS)
        action = rng.choice(self.ACTIONS[subject])
        caption = f"{subject} {action}"
        kind = rng.choice(["style", "weather", "swap"])
        if kind != "swap":
            return self._restyled(rng, caption, kind)
        other = self.SWAPS[subject]
        return Triplet(caption, f"turn {subject.split()[-1]} into {other}", f"{other} {action}")

    def _restyled(self, rng: random.Random, caption: str, kind: str) -> Triplet:
        """A ``style`` or ``weather`` edit of ``caption``, drawn by ``rng``."""
        if kind == "style":
            style = rng.choice(self.STYLES)
            return Triplet(caption, f"make it {style}", f"{caption}, {style}")
        word, phrase = rng.choice(list(self.WEATHER.items()))
        return Triplet(caption, f"make it {word}", f"{caption} {phrase}")

    def __iter__(self) -> Iterator[Triplet]:
        return (self.triplet(i) for i in itertools.count())

    def edit_caption(self, caption: str, index: int) -> Triplet:
        """An edit of a given clip's ``caption`` (a pure function of seed, index and caption): a
        style or the weather, or a subject swap when the caption names a known subject."""
        rng = random.Random(f"{self.seed}:{index}:{caption}")
        caption = " ".join(caption.split()).rstrip(".")
        subjects = [s for s in self.SWAPS if f" {s.split()[-1]} " in f" {caption.lower()} "]
        kind = rng.choice(["style", "weather"] + (["swap"] if subjects else []))
        if kind != "swap":
            return self._restyled(rng, caption, kind)
        noun = subjects[0].split()[-1]
        other = self.SWAPS[subjects[0]].split()[-1]
        output = " ".join(other if w.lower() == noun else w for w in caption.split())
        return Triplet(caption, f"turn the {noun} into a {other}", output)


class JsonlSource:
    """Triplets from a file of ``{"input", "edit", "output"}`` lines; invalid lines are counted."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no triplet file at {self.path}")
        self.stats = SourceStats()

    def __iter__(self) -> Iterator[Triplet]:
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield validate(json.loads(line))
                    self.stats.accepted += 1
                except (ValueError, json.JSONDecodeError):
                    self.stats.malformed += 1


FEW_SHOT = [
    {"input": "a man riding a bike down a mountain trail", "edit": "make it snowy",
     "output": "a man riding a bike down a snowy mountain trail"},
    {"input": "a dog running across a beach at sunset", "edit": "turn the dog into a fox",
     "output": "a fox running across a beach at sunset"},
    {"input": "a car driving along a coastal road", "edit": "make it a watercolor painting",
     "output": "a watercolor painting of a car driving along a coastal road"},
]

SYSTEM_PROMPT = (
    "You write training data for an instruction-based VIDEO editor. Each item is a JSON object with "
    '"input" (a caption of a short video clip that names a subject AND its motion), "edit" (a short '
    'imperative instruction that changes appearance, style, weather, background or an object but keeps '
    'the motion) and "output" (the caption of the edited clip, same motion). Reply with a JSON list only.'
)


class OpenAISource:
    """Triplets from any OpenAI-compatible chat-completions server, through the ``openai`` client.

    The key is read from the environment variable ``api_key_env`` and is never stored. Requests
    that fail with 429, 5xx, a timeout or a broken connection are retried with exponential backoff,
    at most ``max_retries`` times each; at most ``max_requests`` requests are made in all.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 per_request: int = 8, temperature: float = 1.0, max_retries: int = 5, backoff: float = 1.0,
                 max_requests: int = 1000, timeout: float = 60.0, seed: int = 0):
        self.model, self.per_request, self.temperature = model, per_request, temperature
        self.max_retries, self.backoff, self.max_requests = max_retries, backoff, max_requests
        self.rng = random.Random(seed)
        self.stats = SourceStats()
        self.client = chat_client(base_url, api_key_env, timeout)

    def messages(self) -> list[dict[str, str]]:
        shots = self.rng.sample(FEW_SHOT, k=len(FEW_SHOT))
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Write {self.per_request} diverse items like these:\n{json.dumps(shots)}"},
        ]

    def request(self) -> str:
        """One completion's text, retrying transient failures with backoff ``b * 2^k``."""
        return complete(self.client, self.stats, self.max_retries, self.backoff, model=self.model,
                        messages=self.messages(), temperature=self.temperature)

    def edit_caption(self, caption: str, index: int) -> Triplet:
        """An edit of a given clip's ``caption``, asked of the server (one request; its ``input``
        is the caption as given)."""
        shots = self.rng.sample(FEW_SHOT, k=len(FEW_SHOT))
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Items look like these:\n{json.dumps(shots)}\nWrite 1 item whose "
                                                f"input is exactly: {json.dumps(caption)}"}]
        for _ in range(self.max_retries + 1):
            triplets, bad = parse_reply(complete(self.client, self.stats, self.max_retries, self.backoff,
                                                 model=self.model, messages=messages, temperature=self.temperature))
            self.stats.malformed += bad
            if triplets:
                self.stats.accepted += 1
                return Triplet(caption, triplets[0].edit, triplets[0].output)
        raise ValueError(f"the triplet server gave no usable edit for the caption {caption!r}")

    def __iter__(self) -> Iterator[Triplet]:
        seen: set[tuple[str, str]] = set()
        for _ in range(self.max_requests):
            triplets, bad = parse_reply(self.request())
            self.stats.malformed += bad
            for triplet in triplets:
                key = (triplet.input.lower(), triplet.edit.lower())
                if key in seen:
                    self.stats.duplicates += 1
                    continue
                seen.add(key)
                self.stats.accepted += 1
                yield triplet
