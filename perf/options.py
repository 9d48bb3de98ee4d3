"""argparse types shared by ``python -m perf`` and the pytest options of ``perf/conftest.py``.

Each raises ``argparse.ArgumentTypeError`` with a message naming the bad value, so argparse
(and pytest, whose options are argparse's) reports a usage error (exit 2 / 4), not a traceback.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} < 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} < 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (percentages: ``7.5``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def csv(item_type, allowed=None):
    """A non-empty comma-separated list, each item converted by ``item_type`` (and in ``allowed``)."""

    def parse(text: str) -> tuple:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list: {text!r}")
        out = []
        for x in items:
            try:
                value = item_type(x)
            except KeyError as exc:  # registry.resolve: the message lists the known names
                raise argparse.ArgumentTypeError(exc.args[0]) from None
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{x!r}: {exc}") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {', '.join(allowed)}")
            if value not in out:
                out.append(value)
        return tuple(out)

    return parse


def variant_name(text: str) -> str:
    """A registry name or alias, as the registered name."""
    from ring_attention import registry

    return registry.resolve(text)


DTYPES = ("float16", "bfloat16", "float32", "float64")
PASSES = ("fwd", "fwd+bwd")

seq_lens = csv(positive_int)
rank_counts = csv(positive_int)
dtypes = csv(str, DTYPES)
passes = csv(str, PASSES)
variant_names = csv(variant_name)
