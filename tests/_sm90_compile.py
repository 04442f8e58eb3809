"""Compile svdfuse's Triton kernels for the H100/H200 (sm_90a) without a GPU, at the exact
specialisations their launchers create, and report what the machine code does.

Run as a script (`python tests/_sm90_compile.py OUT.json`) in a process without TRITON_INTERPRET:
each launcher is called on CPU tensors of the real shapes with its kernel replaced by a recorder,
the recorded arguments go through Triton's own binder (so pointer alignment, integers divisible by
16 and strides equal to 1 are specialised as a real launch would), `triton.compile` builds the PTX
for sm_90a, and ptxas (`/usr/local/cuda/bin/ptxas -v`, else Triton's own) reports registers and
spills. Per case: registers, spill stores, the widths of global loads and async copies, and the
tensor-core instructions in the PTX. `tests/test_triton_compile.py` asserts on them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

TARGET_ARCH = 90  # sm_90a: Triton adds the "a" for capability 90 (wgmma)


def _ptxas() -> str:
    system = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "ptxas"
    if system.exists():
        return str(system)
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _capture(module, kernel_name: str, launch: Callable[[], object]) -> tuple[object, tuple, dict]:
    """The kernel and the arguments `launch()` passes it, without launching."""
    kernel = getattr(module, kernel_name)
    seen: dict = {}

    class Recorder:
        def __getitem__(self, grid):
            def record(*args, **kwargs):
                seen["args"], seen["kwargs"] = args, kwargs

            return record

    setattr(module, kernel_name, Recorder())
    try:
        launch()
    finally:
        setattr(module, kernel_name, kernel)
    return kernel, seen["args"], seen["kwargs"]


def compile_launch(module, kernel_name: str, launch: Callable[[], object], workdir: Path, name: str) -> dict:
    """Compile the specialisation `launch()` would run for sm_90a; what the code does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kwargs = _capture(module, kernel_name, launch)
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    path = workdir / f"{name}.ptx"
    path.write_text(ptx)
    done = subprocess.run(
        [_ptxas(), "-v", f"--gpu-name=sm_{TARGET_ARCH}a", str(path), "-o", str(path.with_suffix(".cubin"))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = done.stderr
    constants = {fn.arg_names[key[0]]: value for key, value in constexprs.items() if isinstance(value, (int, str, bool))}
    return {
        "kernel": fn.__name__,
        "constexprs": constants,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", report).group(1)),
        # cp.async.{ca,cg}.shared.global [dst], [src], BYTES: bytes per async copy, by count
        "async_copy_bytes": _counts(re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*?\], (0x[0-9a-f]+|\d+)", ptx), base=0),
        # ld.global[.nc][.v2|.v4].bNN: elements × bits per load, by count
        "global_loads": _counts(re.findall(r"ld\.global(?:\.\w+)*?(\.v[248])?\.[bfsu](\d+)", ptx), loads=True),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ptxas": report.strip().splitlines()[-3:],
    }


def _counts(found: list, base: int = 10, loads: bool = False) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in found:
        if loads:
            vector, bits = item
            key = f"{int(vector[2:]) if vector else 1}x{bits}"
        else:
            key = str(int(item, 0))
        out[key] = out.get(key, 0) + 1
    return out


def cases() -> dict[str, tuple]:
    """name -> (module, kernel attribute, launch): the launchers at the workloads' real shapes
    (DESIGN.md §4: W1/W3 768², W2 4096², sketch widths 92/32/144; AXIS top-k; Jacobi cores)."""
    from svdfuse.kernels import elementwise, rsvd, small_svd, topk

    def project(dtype, n=768, w=92, transpose=False, precision="ieee", m=None):
        m = m or n
        A = torch.zeros(2, m, n, dtype=dtype)
        W0 = torch.zeros(m, n, dtype=dtype)
        X = torch.zeros(m if transpose else n, w)
        return lambda: rsvd.rsvd_project(A, X, W0, transpose=transpose, precision=precision)

    out = {
        "rsvd fp32 ieee": project(torch.float32),
        "rsvd fp32 ieee transposed": project(torch.float32, transpose=True),
        "rsvd fp32 tf32": project(torch.float32, precision="tf32"),
        "rsvd fp32 tf32x3": project(torch.float32, precision="tf32x3"),
        "rsvd bf16 ieee": project(torch.bfloat16),
        "rsvd bf16 ieee transposed": project(torch.bfloat16, transpose=True),
        "rsvd fp32 ieee W2": project(torch.float32, n=4096, w=144),
        "rsvd fp32 ieee unaligned": project(torch.float32, n=17, m=33, w=8),
        "rsvd fp32 ieee W2 whole": mock.patch.object(rsvd, "SKETCH_TILING", "whole")(project(torch.float32, n=4096, w=144)),
    }
    cases = {name: (rsvd, "_rsvd_project_kernel", launch) for name, launch in out.items()}
    for sources, r in ((20, 76), (400, 16)):
        S = torch.zeros(48, sources, r)
        cases[f"topk {sources}x{r}"] = (topk, "_topk_components_kernel", lambda S=S: topk.topk_components(S, 76))
    for w in (92, 144):
        M = torch.zeros(2, w, w)
        cases[f"small_svd w{w}"] = (small_svd, "_small_svd_kernel", lambda M=M: small_svd.small_svd(M))
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):  # a 12-source MiniLM row block
        W = torch.zeros(12, 1536 * 384, dtype=dtype)
        launch = lambda W=W, dtype=dtype: elementwise.merge_block(list(W), W[0], torch.ones(12), 1.0, 12.0, False, True, dtype)  # noqa: E731
        cases[f"merge_block {name}"] = (elementwise, "_merge_block_kernel", launch)
        thr, cut = torch.zeros(12), torch.zeros(12, dtype=torch.int64)
        launch = lambda W=W, dtype=dtype, thr=thr, cut=cut: elementwise.ties_block(list(W), W[0], torch.ones(12), thr, cut, 0, False, 1.0, True, False, False, True, dtype)  # noqa: E731
        cases[f"ties_block {name}"] = (elementwise, "_ties_block_kernel", launch)
    return cases


# What this harness needs of Triton's internals (as in triton 3.8): without them, exit 3
# and the test skips rather than fails.
MISSING_API = 3


def main(out_path: str, only: list[str]) -> None:
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        assert hasattr(JITFunction, "_pack_args")
    except (ImportError, AssertionError) as err:
        print(f"this triton lacks the binder API the harness uses: {err!r}", file=sys.stderr)
        sys.exit(MISSING_API)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (module, kernel, launch) in cases().items():
            if only and name not in only:
                continue
            results[name] = compile_launch(module, kernel, launch, Path(tmp), name.replace(" ", "_"))
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
