"""What a merge reports: per-matrix selection counts, the method, its options and costs. Plain
data, read by the result (`svdfuse.result`), the model card (`svdfuse.card`) and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

__all__ = ["LayerReport", "MergeReport"]


@dataclass(frozen=True)
class LayerReport:
    """One merged matrix: its name, shape, the rank k of its components and, for methods that
    select components (AXIS, TSV-M), how many came from each source."""

    key: str
    shape: tuple[int, ...]
    k: int
    counts: list[int] | None


@dataclass(frozen=True)
class MergeReport:
    """Which method merged what, per-matrix selection counts, and how long it took; `base`,
    `parameters` (k, the method's parameters with their defaults, include/exclude, dtype, SVD
    options) and `config` (the configuration file's text, if any) make the model card."""

    method: str
    sources: list[str]
    layers: list[LayerReport]
    seconds: float
    output: str | None = None
    budget: int | None = None
    peak_rss: int | None = None
    processes: int = 1
    bytes_read: int = 0
    base: str | None = None
    parameters: dict = field(default_factory=dict)
    config: str | None = None

    def totals(self) -> list[int]:
        """Components selected from each source over all matrices (methods that select)."""
        return [sum(layer.counts[i] for layer in self.layers if layer.counts) for i in range(len(self.sources))]

    def table(self, max_rows: int = 12) -> str:
        """A plain-text table: one row per source with its share of all selected components."""
        done = f"{len(self.layers)} matrices merged by {self.method} in {self.seconds:.2f} s"
        if self.bytes_read:
            done += f", {self.bytes_read / 2**30:.2f} GiB read ({self.bytes_read / 2**30 / max(self.seconds, 1e-9):.2f} GiB/s)"
        if self.budget is not None:
            done += f"; memory budget {self.budget / 2**30:.2f} GiB"
        if self.peak_rss is not None:
            done += f", peak RSS {self.peak_rss / 2**30:.2f} GiB"
        if self.processes > 1:
            done += f" (rank 0 of {self.processes} processes)"
        if self.output is not None:
            done += f"\nwrote {self.output}"
        if not any(layer.counts for layer in self.layers):
            return "\n".join([f"sources: {', '.join(self.sources)}", done])
        totals = self.totals()
        grand = max(1, sum(totals))
        order = sorted(range(len(totals)), key=lambda i: -totals[i])
        rows = [(self.sources[i], totals[i], f"{100 * totals[i] / grand:4.1f}%") for i in order[:max_rows]]
        lines = [tabulate(rows, headers=("source", "components", "share"), colalign=("left", "right", "right"))]
        if len(order) > max_rows:
            lines.append(f"... {len(order) - max_rows} more sources")
        lines.append(done)
        return "\n".join(lines)
