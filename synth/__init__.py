"""Manufacturing paired editing videos: triplets, video Prompt-to-Prompt, lifted image pairs, filters, shards."""

from .filter import ClipFilter, JudgeFilter, Thresholds, check_pair, rejection_reason
from .p2p import P2PAttnProcessor, P2PControl, align_tokens
from .render import PairParams, VideoRenderer
from .triplets import JsonlSource, OpenAISource, TemplateSource, Triplet, parse_reply, validate

__all__ = [
    "ClipFilter",
    "JudgeFilter",
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
    "check_pair",
    "parse_reply",
    "rejection_reason",
    "validate",
]
