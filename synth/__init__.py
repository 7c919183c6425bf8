"""Manufacturing paired editing videos: triplets, video Prompt-to-Prompt, CLIP filter, shards."""

from .filter import ClipFilter, Thresholds, judge
from .p2p import P2PAttnProcessor, P2PControl, align_tokens
from .render import PairParams, VideoRenderer
from .triplets import JsonlSource, OpenAISource, TemplateSource, Triplet, parse_reply, validate

__all__ = [
    "ClipFilter",
    "JsonlSource",
    "OpenAISource",
    "P2PAttnProcessor",
    "P2PControl",
    "PairParams",
    "TemplateSource",
    "Thresholds",
    "Triplet",
    "VideoRenderer",
    "align_tokens",
    "judge",
    "parse_reply",
    "validate",
]
