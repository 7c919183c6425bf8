"""What the commands share about their arguments: one-line usage errors, checked number types, quiet libraries."""

from __future__ import annotations

import argparse
from typing import Callable

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def number(kind: type = int, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` with
    ``low_open``; no upper bound when ``high`` is None), refused with one line that says the range."""
    if high is not None:
        rule = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low == 0:
        rule = ("a positive integer" if kind is int else "positive") if low_open else ">= 0"
    else:
        rule = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str):
        value = kind(text)
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high) or value != value:  # NaN is in no range
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


positive_int = number(int, 0, low_open=True)
non_negative_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
non_negative_float = number(float, 0)
unit_float = number(float, 0, 1)
crf = number(int, 0, 51)  # x264 and x265 take 0-51 (VP9 63; 51 is the bound all three share)


def quiet_libraries() -> None:
    """Library loading bars and notices would bury the command's own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
