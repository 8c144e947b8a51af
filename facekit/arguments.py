"""argparse types both sides' commands share (the client's, the worker's, training's)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(minimum: int, note: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (`note` follows the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{note}, got {value}")
        return value

    return parse


def positive(what: str = "a number", *, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (>= 0 with `zero`; `what` names it in the error:
    "seconds")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value >= 0 if zero else value > 0) or not value < math.inf:
            raise argparse.ArgumentTypeError(f"expected {what} {'>=' if zero else '>'} 0, got {text!r}")
        return value

    return parse


seconds = positive("seconds")
