"""Builds the compiled extension `svdfuse._C`; package metadata lives in pyproject.toml.

Env flags: SVDFUSE_NO_EXT=1 builds no extension (pure-python package, reference ops only);
SVDFUSE_NO_CUDA=1 builds the CPU kernels only. Install with `pip install --no-build-isolation -e .`.
"""

import glob
import os
import shutil
from pathlib import Path

from setuptools import setup


def _find_cuda_home() -> str | None:
    # $CUDA_HOME, then /usr/local/cuda, then nvcc on PATH. torch's own search tries PATH first, and
    # an nvcc wrapper script in /usr/local/bin would then send the link step to /usr/local/lib.
    candidates = [os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((c for c in candidates if c and os.path.isfile(os.path.join(c, "bin", "nvcc"))), None)


# Set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
_CUDA_HOME = _find_cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions() -> list:
    if _flag("SVDFUSE_NO_EXT"):
        # An editable install imports from the source tree, where a library left by an earlier
        # build would silently shadow the pure-python install this flag asks for.
        for stale in (ROOT / "svdfuse").glob("_C*.so"):
            stale.unlink()
        print("svdfuse: building no extension (SVDFUSE_NO_EXT=1)")
        return []
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    with_cuda = with_cuda and not _flag("SVDFUSE_NO_CUDA")
    # No -std flag: cpp_extension adds the standard this torch's headers require (C++20 for torch 2.14).
    # -fno-trapping-math: no kernel reads the floating-point exception flags, and without it GCC
    # keeps a comparison's select as a branch (an ordered compare may raise FE_INVALID), so loops
    # such as the trim's `|τ| > threshold ? τ : 0` do not vectorize. Values are unchanged.
    # -fopenmp: at::parallel_for is an OpenMP region compiled into the caller; without the flag a
    # kernel's "parallel" loop runs on one thread. The extension then needs libgomp.so.1, the
    # runtime torch already loaded, so torch.set_num_threads governs its threads too.
    args = {"cxx": ["-O3", "-fno-trapping-math", "-fopenmp"], "nvcc": ["-O3", "-Xcompiler", "-fopenmp"]}
    link = ["-fopenmp"]
    if not with_cuda:
        print(f"svdfuse: building svdfuse._C with CPU kernels only ({len(cpp)} sources)")
        return [cpp_extension.CppExtension("svdfuse._C", cpp, extra_compile_args=args["cxx"], extra_link_args=link)]
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # With no GPU to read the arch from, torch would compile for every arch it knows; Hopper is our target.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    print(
        f"svdfuse: building svdfuse._C with CPU and CUDA kernels ({len(cpp) + len(cu)} sources, "
        f"CUDA_HOME={cpp_extension.CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})"
    )
    return [cpp_extension.CUDAExtension("svdfuse._C", cpp + cu, extra_compile_args=args, extra_link_args=link)]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
