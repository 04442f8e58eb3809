"""What a Hugging Face directory output holds besides its weights, and where it comes from.

A base given as a Hugging Face directory lends its non-weight files (config, tokenizer, the
sentence-transformers modules); a transformers `PreTrainedModel` lends its `config` (written as
`config.json`, naming the module's class as its architecture) and, when its `name_or_path` is a
local directory, that directory's other files. Nothing else carries a config: a plain `nn.Module`,
a state dict or a `.safetensors` file has none, and an open_clip model does not record which
architecture it was created as, so a merge of those is written as weights only.

Only regular files inside the directory are copied (links are followed when they stay inside it or,
for a snapshot of the Hub's cache, lead to its blobs), never the base's weights nor its hidden
entries (`.git`, `.cache`); a link that leads nowhere, in a loop or out of the directory (another
file of the machine), or anything else that is not a file or directory, is refused before anything
is written, naming it.
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import os
import shutil
import stat
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from svdfuse.sources import model_roots

__all__ = ["Template", "template_of", "NO_TEMPLATE", "WEIGHT_FILES"]

# Files of a Hugging Face directory that hold weights: replaced, never copied from the base.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")

# Follows "cannot write PATH as a Hugging Face directory: ".
NO_TEMPLATE = (
    "the base was not given as one, nor as a transformers model (PreTrainedModel), so there is no config to write: a "
    "plain nn.Module, a state dict or a .safetensors file carries none, and an open_clip model does not record its "
    "architecture's name"
)


@dataclass(frozen=True)
class Template:
    """The non-weight files of a Hugging Face directory output.

    Attributes:
        directory: a directory whose non-weight files are copied (config, tokenizer, ...).
        config: a transformers config written as `config.json` after the copy (it wins over the
            directory's), with `architectures = [architecture]`.
        architecture: the class name of the module the config belongs to.
    """

    directory: Path | None = None
    config: Any = None
    architecture: str | None = None

    def files(self, skip: Set[Path] = frozenset()) -> list[Path]:
        """The directory's files to copy, relative to it: every regular file but the weights and
        hidden entries, in subdirectories too, and none of `skip` (absolute paths: the output when
        it lies inside the directory). Raises ValueError naming a file that cannot be copied."""
        if self.directory is None:
            return []
        out: list[Path] = []
        roots = model_roots(Path(self.directory))
        self._collect(Path(self.directory), Path(), {_key(Path(self.directory))}, {p.absolute() for p in skip}, roots, out)
        return out

    def _collect(self, root: Path, relative: Path, above: set[tuple[int, int]], skip: set[Path], roots: list[Path], out: list[Path]) -> None:
        for entry in sorted((root / relative).iterdir()):
            name = relative / entry.name
            if entry.name.startswith(".") or entry.absolute() in skip or any(fnmatch.fnmatch(entry.name, p) for p in WEIGHT_FILES):
                continue
            try:
                info = entry.stat()
            except OSError as err:
                what = {errno.ENOENT: "a broken symbolic link", errno.ELOOP: "a symbolic link that loops"}.get(err.errno, err.strerror)
                target = f" (to {os.readlink(entry)!r})" if entry.is_symlink() else ""
                raise ValueError(f"cannot copy {str(entry)!r} from the base directory into the output: {what}{target}") from None
            if entry.is_symlink() and not any(entry.resolve().is_relative_to(root) for root in roots):
                # a downloaded directory's link must not carry another file of this machine into the output
                raise ValueError(
                    f"cannot copy {str(entry)!r} from the base directory into the output: it links to {str(entry.resolve())!r}, "
                    "outside the directory; svdfuse copies only files inside it"
                )
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in above:  # a link (or a mount) to a directory that holds it
                    target = f"to {os.readlink(entry)!r}, " if entry.is_symlink() else ""
                    raise ValueError(
                        f"cannot copy {str(entry)!r} from the base directory into the output: it loops ({target}a directory that holds it)"
                    )
                self._collect(root, name, above | {(info.st_dev, info.st_ino)}, skip, roots, out)
            elif stat.S_ISREG(info.st_mode):
                out.append(name)
            else:
                raise ValueError(f"cannot copy {str(entry)!r} from the base directory into the output: not a regular file or directory")

    def write(self, into: Path, files: list[Path]) -> None:
        """Copy `files` (from `files()`) and write the config into the directory `into`; new
        files and directories get the permissions the umask gives them."""
        for name in files:
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(self.directory) / name, into / name)  # type: ignore[arg-type]
        if self.config is not None:
            config = copy.deepcopy(self.config)
            if self.architecture is not None:
                config.architectures = [self.architecture]
            config.save_pretrained(into)


def _key(directory: Path) -> tuple[int, int]:
    info = directory.stat()
    return info.st_dev, info.st_ino


def template_of(base: Any, directory: Path | None) -> Template | None:
    """The template a merge of `base` writes its directory outputs with (None: weights only).

    Args:
        base: the base as given to `svdfuse.merge` (a module, a path, a state dict).
        directory: the Hugging Face directory the base was read from, if any.
    """
    if directory is not None:
        return Template(directory=directory)
    config = getattr(base, "config", None) if isinstance(base, nn.Module) else None
    if config is None or not hasattr(config, "save_pretrained") or not hasattr(config, "to_json_string"):
        return None
    name = getattr(base, "name_or_path", "") or getattr(config, "_name_or_path", "")
    own = Path(name) if name and Path(name).is_dir() else None
    return Template(directory=own, config=config, architecture=type(base).__name__)
