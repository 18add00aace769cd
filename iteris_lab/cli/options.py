"""Argument types of the command line: each converts a string or refuses it with "expected ..." / "must be ..."."""
from __future__ import annotations

import argparse
import math


def checked(convert, expected: str, ok, requirement: str):
    """An argparse type: convert(text), refused with "expected ..." when that fails and "must be ..." when not ok."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    return parse


positive_int = checked(int, "a whole number >= 1", lambda v: v >= 1, ">= 1")
finite_float = checked(float, "a number", math.isfinite, "a finite number")
non_negative = checked(float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = checked(float, "a number", lambda v: math.isfinite(v) and 0 < v <= 1, "in (0, 1]")
