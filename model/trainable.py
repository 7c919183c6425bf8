"""Which video U-Net parameters train: the freezing policy."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Trainable = Union[str, Sequence[str]]

MOTION_PATTERN = "*motion_modules.*"


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int


POLICIES = {
    "motion": [MOTION_PATTERN],
    "all": ["*"],
    # every weight but the temporal layers: with their zero-initialised output projections the
    # video U-Net stays exactly its 2D U-Net applied per frame (the temporal ablation)
    "spatial": ["*", "!" + MOTION_PATTERN],
}


def trainable_patterns(trainable: Trainable) -> list[str]:
    """Name patterns (fnmatch) for a policy: ``"motion"``, ``"all"``, ``"spatial"`` or a list of
    patterns, where a pattern starting with ``!`` excludes what it matches."""
    if isinstance(trainable, str):
        if trainable in POLICIES:
            return list(POLICIES[trainable])
        raise ValueError(f"trainable must be one of {', '.join(POLICIES)} or a list of name patterns, got {trainable!r}")
    patterns = list(trainable)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"trainable patterns must be non-empty strings, got {trainable!r}")
    return patterns


def set_trainable(module: torch.nn.Module, trainable: Trainable = "motion") -> ParameterCount:
    """Set ``requires_grad`` on every parameter of ``module`` from the policy; return the counts.

    A parameter trains iff its name matches one of the policy's patterns and none of its ``!``
    patterns; all others are frozen, so no gradient is computed or stored for them. A pattern that
    matches nothing is an error (it is almost always a typo that would silently train nothing).
    """
    patterns = trainable_patterns(trainable)
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    used = set()
    for name, param in module.named_parameters():
        hits = [p for p in include if fnmatch.fnmatchcase(name, p)]
        misses = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        used.update("!" + p for p in misses)
        param.requires_grad_(bool(hits) and not misses)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ValueError(f"trainable pattern(s) matched no parameter: {unused}")
    return count_parameters(module)


def count_parameters(module: torch.nn.Module) -> ParameterCount:
    params = list(module.parameters())
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
    )
