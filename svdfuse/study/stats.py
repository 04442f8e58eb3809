"""Paired differences between methods with bootstrap confidence intervals.

Two methods run on the same target, seed by seed, and are tested on the same examples: their
difference is paired. Its uncertainty has two sources, which seeds were drawn (few-shot splits,
and at one setting the sources' fine-tunes) and which test examples; the bootstrap resamples
both, seeds and then test examples (the same examples for every seed: the test split is one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "paired_difference", "pooled_difference", "verdict"]


@dataclass(frozen=True)
class Interval:
    """A mean difference (points of accuracy) and its 95% bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float


def _resampled_means(diff: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of diff (seeds, examples): seeds and examples resampled with replacement."""
    seeds, examples = diff.shape
    out = []
    for start in range(0, resamples, 200):  # (chunk, seeds, examples) at a time
        chunk = min(200, resamples - start)
        rows = rng.integers(0, seeds, (chunk, seeds, 1))
        cols = rng.integers(0, examples, (chunk, 1, examples))
        out.append(diff[rows, cols].mean((1, 2)))
    return np.concatenate(out)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> Interval:
    """Accuracy of a minus that of b (points) with its 95% percentile bootstrap interval.

    a, b: per-example correctness (seeds, examples), bool or 0/1, row s of both from seed s.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_difference: a and b must both be (seeds, examples), found {a.shape} and {b.shape}")
    diff = 100.0 * (a.astype(np.float64) - b.astype(np.float64))
    means = _resampled_means(diff, resamples, np.random.default_rng(seed))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(diff.mean()), float(lo), float(hi))


def pooled_difference(pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean over targets of `paired_difference`, each target resampled on its own (the targets
    are the study's fixed set, not a sample)."""
    rng = np.random.default_rng(seed)
    diffs = [100.0 * (a.astype(np.float64) - b.astype(np.float64)) for a, b in pairs]
    means = np.mean([_resampled_means(d, resamples, rng) for d in diffs], axis=0)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(np.mean([d.mean() for d in diffs])), float(lo), float(hi))


def verdict(interval: Interval) -> str:
    """">" or "<" where the interval excludes 0, "≈" (undecided) where it holds it."""
    return ">" if interval.lo > 0 else "<" if interval.hi < 0 else "≈"
