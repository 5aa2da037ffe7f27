"""The one validation layer for numbers from configs and command lines.

`require` checks a config value (type, finite, range) and `number_arg` makes the argparse
``type=`` of a numeric flag with the same rule. NaN and infinity are refused everywhere: a
comparison with NaN is always False, so a plain ``value < minimum`` check lets NaN through.
Config files and ``--key value`` overrides are parsed with `refrag.fileio.loads_strict`, which
refuses the NaN/Infinity literals before any check runs.
"""
from __future__ import annotations

import argparse
import math


def number_problem(value, kind: type, minimum=None, maximum=None, *, above=None, below=None) -> str | None:
    """Why `value` is not a finite `kind` (int, or float which accepts ints) in the range, or None.
    minimum/maximum are inclusive bounds, above/below exclusive ones."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        return f"must be {kind.__name__}, got {value!r}"
    if kind is float and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if minimum is not None and value < minimum:
        return f"must be >= {minimum}, got {value!r}"
    if maximum is not None and value > maximum:
        return f"must be <= {maximum}, got {value!r}"
    if above is not None and value <= above:
        return f"must be > {above}, got {value!r}"
    if below is not None and value >= below:
        return f"must be < {below}, got {value!r}"
    return None


def require(name: str, value, kind: type, minimum=None, maximum=None, *, above=None, below=None,
            label: str = "config key") -> None:
    """ValueError naming `label name` unless `value` is a finite `kind` (bools are not numbers;
    ints pass as floats) within [minimum, maximum] and (above, below). Non-numeric kinds (bool,
    str) are only type-checked."""
    if kind not in (int, float):
        if not isinstance(value, kind):
            raise ValueError(f"{label} {name} must be {kind.__name__}, got {value!r}")
        return
    problem = number_problem(value, kind, minimum, maximum, above=above, below=below)
    if problem:
        raise ValueError(f"{label} {name} {problem}")


def number_arg(kind: type, minimum=None, maximum=None, *, above=None, below=None):
    """argparse ``type=`` for a numeric flag: parses int/float and applies `require`'s rule, so
    ``--top-k 0`` or ``--temperature nan`` is a usage error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = number_problem(value, kind, minimum, maximum, above=above, below=below)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
