"""The model card (`README.md`) written into every merged Hugging Face directory, as mergekit writes one.

It says what was merged and how: the base, the sources, the method and its paper, every
parameter, the svdfuse version, each source's share of the selected components (methods that
select components), and the configuration file when the merge came from one. It is plain text
built from the `MergeReport`; the writer publishes it with the weights, all-or-nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from tabulate import tabulate

from svdfuse.report import MergeReport
from svdfuse.version import __version__

__all__ = ["CARD_NAME", "model_card"]

CARD_NAME = "README.md"


def _shares(report: MergeReport) -> str:
    weights = report.parameters.get("weights")
    selects = any(layer.counts for layer in report.layers)
    totals = report.totals() if selects else None
    grand = max(1, sum(totals)) if totals else 1
    headers = ["source"] + (["weight"] if weights else []) + (["components", "share"] if selects else [])
    rows = []
    for i, source in enumerate(report.sources):
        row = [f"`{source}`"] + ([weights[i]] if weights else [])
        if totals:
            row += [totals[i], f"{100 * totals[i] / grand:.1f}%"]
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")


def model_card(report: MergeReport, title: str) -> str:
    """The card of a merge: markdown with a YAML header (base model, library, tags).

    Args:
        report: the merge's report (sources, method, parameters, per-matrix selection counts).
        title: the heading, usually the output directory's name.
    """
    from svdfuse.methods import get_method

    method = get_method(report.method)
    header = {"library_name": "transformers", "tags": ["svdfuse", "merge", report.method]}
    if report.base is not None:
        header = {"base_model": report.base, **header}
    parameters = {k: list(v) if isinstance(v, tuple) else getattr(v, "value", v) for k, v in report.parameters.items()}  # enums by their string
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge of {len(report.sources)} models fine-tuned from `{report.base}`, made with svdfuse "
        f"{__version__}.",
        "",
        "## Merge method",
        "",
        f"`{report.method}` ([reference]({method.reference_url})): {len(report.layers)} matrices merged"
        + (f" at rank {report.layers[0].k}" if report.layers and len({layer.k for layer in report.layers}) == 1 and report.layers[0].k else "")
        + "; every other floating tensor by the method's elementwise rule (the mean task vector for SVD methods); "
        "integer buffers are the base's.",
        "",
        "## Sources",
        "",
        _shares(report),
        "",
        "## Parameters",
        "",
        "```yaml",
        yaml.safe_dump(parameters, sort_keys=False).rstrip(),
        "```",
    ]
    if report.config is not None:
        lines += ["", "## Configuration", "", "The configuration file this merge ran from:", "", "```yaml", report.config.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def card_files(report: MergeReport, output: str | Path) -> dict[str, str]:
    """{README.md: the card} for a directory output, nothing for a single `.safetensors` file."""
    path = Path(output)
    return {} if path.suffix == ".safetensors" else {CARD_NAME: model_card(report, path.name)}
