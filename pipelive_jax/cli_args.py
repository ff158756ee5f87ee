"""Argument types of the command line: a bad value is refused by argparse with a message that
names the option (`argument --port: must be in 0-65535, got 99999`), before anything runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def float_at_least(low: float, *, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text}"
            )
        return v

    parse.__name__ = f"number {'>' if strict else '>='} {low:g}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
positive_float = float_at_least(0.0, strict=True)
nonnegative_float = float_at_least(0.0)


def port(text: str) -> int:
    v = nonnegative_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be in 0-65535, got {v}")
    return v
