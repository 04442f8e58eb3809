"""Writing merged models: safetensors files and Hugging Face directories, all-or-nothing.

Every writer builds its output under a temporary name beside the target and renames it into
place at the end, so a failure never leaves a partial file, and an existing path is never
overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import Tensor

if TYPE_CHECKING:
    from svdfuse.result import MergeResult

__all__ = ["save_safetensors", "save_hf_directory", "save_merged"]

# Files of a Hugging Face directory that hold weights: replaced, never copied from the base.
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"output path {str(path)!r} already exists; svdfuse never overwrites, choose a new path")


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage or are strided views.
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in state.items()}


def _publish(tmp: str, path: Path) -> None:
    # A hard link never replaces an existing file, so a path created while we wrote is not
    # clobbered; filesystems without hard links get a rename after one more check.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"output path {str(path)!r} appeared while writing; svdfuse never overwrites") from None
    except OSError:
        _refuse_existing(path)
        os.replace(tmp, path)


def save_safetensors(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write `state` to the new file `path` (temp file, then rename)."""
    path = Path(path)
    _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_contiguous(state), tmp, metadata={"format": "pt"})
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _template_ignore(*outputs: Path):
    # Weight files are replaced, never copied; and when the output lies inside the template
    # (saving into the base directory) its temporary directory must not be copied into itself.
    weights = shutil.ignore_patterns(*_WEIGHT_FILES)
    skip = {out.resolve() for out in outputs}

    def ignore(directory: str, names: list[str]) -> set[str]:
        return set(weights(directory, names)) | {name for name in names if (Path(directory) / name).resolve() in skip}

    return ignore


def save_hf_directory(state: Mapping[str, Tensor], path: str | os.PathLike, template: str | os.PathLike) -> None:
    """Write a Hugging Face model directory at the new path `path`: every non-weight file of
    `template` (config, tokenizer, ...) plus `model.safetensors` holding `state`."""
    path, template = Path(path), Path(template)
    _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        shutil.copytree(template, tmp, ignore=_template_ignore(tmp, path), dirs_exist_ok=True)
        save_file(_contiguous(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_merged(result: "MergeResult", path: str | os.PathLike, *, format: str = "auto") -> None:
    """Save a merge's dense weights. format: "safetensors", "hf" or "auto" (by the path's suffix:
    `.safetensors` is a file; anything else a Hugging Face directory, which needs a base directory)."""
    path = Path(path)
    _refuse_existing(path)
    if format == "auto":
        format = "safetensors" if path.suffix == ".safetensors" else "hf"
    if format == "safetensors":
        save_safetensors(result.state_dict(), path)
    elif format == "hf":
        if result.source_directory is None:
            raise ValueError(
                f"cannot write {str(path)!r} as a Hugging Face directory: the base was not given as one, so there is no "
                "config to copy; save to a .safetensors file instead"
            )
        save_hf_directory(result.state_dict(), path, result.source_directory)
    else:
        raise ValueError(f"format must be 'auto', 'safetensors' or 'hf', found {format!r}")
