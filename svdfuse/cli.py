"""The `svdfuse` command line: `svdfuse merge ...` and `svdfuse demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdfuse", description="Merge fine-tuned models by AXIS and adapt them by their singular values.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge source models into one (AXIS)")
    merge.add_argument("sources", nargs="+", help=".safetensors files or Hugging Face model directories fine-tuned from BASE")
    merge.add_argument("--base", required=True, help="the pre-trained model: a .safetensors file or a Hugging Face directory")
    merge.add_argument("-k", type=_k, required=True, help="components kept per matrix: an int, or a fraction of min(m, n)")
    merge.add_argument("-o", "--output", required=True, help="new .safetensors file, or new directory (Hugging Face layout)")
    merge.add_argument("--include", action="append", metavar="PATTERN", help="merge only matrices whose name matches (glob; repeatable)")
    merge.add_argument("--exclude", action="append", metavar="PATTERN", help="never merge these as matrices (default: *embed*)")
    merge.add_argument("--svd", choices=["auto", "exact", "randomized"], default="auto", help="decomposition (default: auto)")
    merge.add_argument("--oversample", type=int, help="randomized SVD oversampling")
    merge.add_argument("--power-iters", type=int, help="randomized SVD power iterations")
    merge.add_argument("--seed", type=int, default=0, help="randomized SVD seed")
    merge.add_argument("--dtype", choices=sorted(_DTYPES), help="cast all tensors to this dtype (default: keep; mixed is an error)")
    merge.add_argument("--device", help="compute device (default: cuda if available)")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in digits task (offline, CPU or GPU)")
    demo.add_argument("-k", type=_k, default=0.25, help="components kept per matrix (default 0.25 of min(m, n))")
    demo.add_argument("-n", type=_k, default=0.25, help="singular values trained per layer in Stage 2 (default 0.25)")
    demo.add_argument("--epochs", type=int, default=10, help="Stage 2 epochs (default 10)")
    demo.add_argument("--device", help="device (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _merge(args: argparse.Namespace) -> None:
    import svdfuse
    from svdfuse.plan import DEFAULT_EXCLUDE

    defaults = svdfuse.SVDOptions()
    svd = svdfuse.SVDOptions(
        method=args.svd,
        oversample=defaults.oversample if args.oversample is None else args.oversample,
        power_iters=defaults.power_iters if args.power_iters is None else args.power_iters,
        seed=args.seed,
    )
    if Path(args.output).exists():
        raise FileExistsError(f"output path {args.output!r} already exists; svdfuse never overwrites, choose a new path")
    result = svdfuse.merge(
        args.sources,
        k=args.k,
        base=args.base,
        include=args.include,
        exclude=args.exclude or DEFAULT_EXCLUDE,
        svd=svd,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        progress=not args.quiet,
    )
    result.save(args.output)
    print(result.report.table())
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "merge":
            _merge(args)
        else:
            from svdfuse.demo import run_demo

            run_demo(k=args.k, n=args.n, epochs=args.epochs, device=args.device, seed=args.seed)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as err:
        print(f"svdfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
