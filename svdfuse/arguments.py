"""The public API's arguments, normalized or refused before any work: counts (`k`, `n`, `rank`),
dtypes and SVD options. Each refusal says what was expected and what was found."""

from __future__ import annotations

import numbers

import torch

from svdfuse.ops import SVDMethod, SVDOptions

__all__ = ["count", "dtype", "patterns", "svd_options"]


def count(value: object, what: str) -> int | float:
    """A rank as the API takes it: an int (numpy's too) as given, or a float fraction; never a bool
    or a string (`"0.1"` would otherwise be read as something else)."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be an int (components) or a float fraction of min(m, n), found {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def dtype(value: object, what: str = "dtype") -> torch.dtype:
    """A floating-point torch dtype, or its name ("bfloat16", "torch.float16")."""
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise ValueError(f"{what}: {value!r} names no torch dtype; expected e.g. 'float32', 'bfloat16', 'float16'")
        value = found
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{what} must be a torch.dtype or its name, found {type(value).__name__} {value!r}")
    if not value.is_floating_point:
        raise ValueError(f"{what} must be a floating-point dtype (merged weights are), found {value}")
    return value


def svd_options(value: object) -> SVDOptions:
    """`svd=`: an `SVDOptions`, or a method name ("exact", "randomized", "auto") for its defaults."""
    if isinstance(value, SVDOptions):
        return value
    if isinstance(value, str):
        return SVDOptions(method=value)
    raise TypeError(f"svd must be an SVDOptions or one of {[m.value for m in SVDMethod]}, found {type(value).__name__} {value!r}")


def patterns(value: object, what: str) -> tuple[str, ...] | None:
    """`include=`/`exclude=`: a list of glob patterns (None stays None). A lone str is refused: it
    would be read as one pattern per character."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} takes a list of glob patterns, found a str; write {what}=[{value!r}]")
    found = tuple(value)  # type: ignore[arg-type]
    bad = [p for p in found if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what}: every pattern must be a str, found {type(bad[0]).__name__} {bad[0]!r}")
    return found
