"""Every Triton kernel compiles for the H100 (sm_90) on a machine without a GPU.

Triton ships its own ptxas, so `triton.compile` for a CUDA target needs no device: this catches
what the interpreter never checks (types of loop-carried values, static conditions, layouts,
shared memory) before a GPU session. Runs in a subprocess, where TRITON_INTERPRET is off.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# (kernel, signature, constexpr variants): the specializations the launchers create.
SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from svdfuse.kernels import rsvd, small_svd, topk

    def compile_all(fn, signature, variants, **options):
        for constexprs in variants:
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
            assert kernel.asm["cubin"], (fn.__name__, constexprs)
            print(fn.__name__, constexprs, "shared", kernel.metadata.shared)

    pointer_args = dict(A="*bf16", a_offsets="*i64", B="*fp32", b_offsets="*i64", X="*fp32", x_offsets="*i64", C="*fp32")
    ints = {name: "i32" for name in ["M", "N", "W", "stride_am", "stride_an", "stride_bm", "stride_bn", "stride_xn", "stride_xw", "stride_cm"]}
    consts = {name: "constexpr" for name in ["HAS_BASE", "PRECISION", "BLOCK_M", "BLOCK_W", "BLOCK_K"]}
    compile_all(
        rsvd._rsvd_project_kernel, {**pointer_args, **ints, **consts},
        [dict(HAS_BASE=base, PRECISION=precision, BLOCK_M=rsvd._BLOCK_M, BLOCK_W=128, BLOCK_K=rsvd._BLOCK_K)
         for base, precision in [(True, "ieee"), (False, "ieee"), (True, "tf32"), (True, "tf32x3")]],
        num_warps=rsvd._NUM_WARPS, num_stages=rsvd._NUM_STAGES,
    )
    compile_all(
        topk._topk_components_kernel, dict(S="*fp32", values="*fp32", indices="*i64", total="i32", k="i32", BUFFER="constexpr"),
        [dict(BUFFER=128), dict(BUFFER=topk.MAX_K)],
    )
    compile_all(
        small_svd._small_svd_kernel, dict(A="*fp32", J="*fp32", W="i32", HALF="constexpr", MAX_SWEEPS="constexpr", TOL="constexpr"),
        [dict(HALF=64, MAX_SWEEPS=small_svd.MAX_SWEEPS, TOL=1.1920928955078125e-07)],
        num_warps=8,
    )
    """
)


def test_triton_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("shared") == 7, done.stdout
