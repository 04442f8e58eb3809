"""What a Hugging Face directory output holds besides its weights, and where it comes from.

A base given as a Hugging Face directory lends its non-weight files (config, tokenizer, the
sentence-transformers modules); a transformers `PreTrainedModel` lends its `config` (written as
`config.json`, naming the module's class as its architecture) and, when its `name_or_path` is a
local directory, that directory's other files. Nothing else carries a config: a plain `nn.Module`,
a state dict or a `.safetensors` file has none, and an open_clip model does not record which
architecture it was created as, so a merge of those is written as weights only.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["Template", "template_of", "NO_TEMPLATE"]

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

    def write(self, into: Path, ignore: Callable[[str, list[str]], set[str]]) -> None:
        """Copy the directory's non-weight files (`ignore` names the weight files) and write the config into `into`."""
        if self.directory is not None:
            shutil.copytree(self.directory, into, ignore=ignore, dirs_exist_ok=True)
        if self.config is not None:
            config = copy.deepcopy(self.config)
            if self.architecture is not None:
                config.architectures = [self.architecture]
            config.save_pretrained(into)


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
