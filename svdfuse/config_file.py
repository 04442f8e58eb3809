"""A YAML configuration file as svdfuse reads it, written by anyone: what both configuration
dialects (`svdfuse.config`, `svdfuse.mergekit_config`) share, and nothing that runs a merge.

The file is refused, naming it, unless it is a regular UTF-8 text file of at most
`MAX_CONFIG_BYTES`, one YAML document nested at most `MAX_DEPTH` levels, whose aliases (`*name`,
`<<: *name`) expanded in place hold at most `MAX_EXPANDED_NODES` values and `MAX_CONFIG_BYTES` of
text (a few hundred bytes of nested aliases otherwise expand to gigabytes), with no key given twice
in one mapping. Values are shown in messages through `shown`, cut to a few dozen characters.
"""

from __future__ import annotations

import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import AfterValidator, StringConstraints, ValidationError

__all__ = ["ConfigError", "MergeRequest", "PathText", "read_yaml", "schema_error", "shown", "DTYPES"]

MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EXPANDED_NODES = 100_000
MAX_PROBLEMS = 3  # a schema error lists this many problems, then how many more

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]


class ConfigError(ValueError):
    """A configuration file that cannot be run: says which file, which key, what was expected."""


def _no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("a path cannot hold a NUL character")
    return text


# A path as written in a configuration: never empty, never longer than any file system takes.
PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_no_nul)]


@dataclass
class MergeRequest:
    """What a configuration asks `svdfuse.merge` to do: the sources (label -> path) and the
    keyword arguments, plus the file's text for the model card."""

    models: list[str] | dict[str, str]
    kwargs: dict[str, Any]
    text: str
    notes: list[str] = field(default_factory=list)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value: object) -> str:
    """`repr(value)` cut to a few dozen characters, in bounded time whatever `value` holds."""
    return _SHORT.repr(value)


def key_path(loc: tuple) -> str:
    """('sources', 1, 'weight') -> 'sources[1].weight' (a long key cut short)."""
    text = ""
    for part in loc:
        part = part if isinstance(part, int) or len(str(part)) <= 40 else str(part)[:40] + "..."
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_error(path: Path, error: ValidationError) -> ConfigError:
    """One line naming the file and, for each problem (the first few), its key path."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif message == item["msg"] and item["type"] != "missing" and isinstance(item["input"], (bool, int, float, str)):
            message += f", found {shown(item['input'])}"  # pydantic's own message does not say what it found
        problems.append(f"{key_path(item['loc'])}: {message}" if item["loc"] else message)
    more = f"; and {len(problems) - MAX_PROBLEMS} more problems" if len(problems) > MAX_PROBLEMS else ""
    return ConfigError(f"{path}: " + "; ".join(problems[:MAX_PROBLEMS]) + more)


def read_yaml(path: Path) -> tuple[Any, str]:
    """The YAML document in `path` and the file's text, or a `ConfigError` naming the file
    (module docstring: what is refused)."""
    text = _read_text(path)
    loader = _BoundedLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data(), text
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        what = "; ".join(filter(None, (err.context, err.problem)))
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {what}{where}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())[:200]}") from None
    except ValueError as err:  # an int of more digits than Python converts, a date that does not exist
        raise ConfigError(f"{path}: a value cannot be read: {str(err).split(';')[0][:200]}") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer before fstat can refuse it
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ConfigError(f"{path}: a configuration cannot be opened: {err.strerror}") from None
    except ValueError:  # os.open's refusal of a NUL character
        raise ConfigError(f"{shown(str(path))}: a configuration's path cannot hold a NUL character") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file"
            raise ConfigError(f"{path}: a configuration must be a regular YAML text file, found {kind}")
        data = b""
        while len(data) <= MAX_CONFIG_BYTES:  # read() may return less than asked, never more
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: a configuration is at most {MAX_CONFIG_BYTES} bytes (1 MiB); this file is larger")
    if b"\0" in data:
        raise ConfigError(f"{path}: a configuration must be UTF-8 text, found a binary file (NUL byte at offset {data.index(0)})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: a configuration must be UTF-8 text, found byte 0x{data[err.start]:02x} at offset {err.start}") from None


# libyaml's scanner and parser when PyYAML was built with it: a 1 MiB file in about a second
# instead of ten; the composer stays PyYAML's own, which is where nesting is bounded.
try:
    from yaml.cyaml import CParser as _LIBYAML
except ImportError:
    _LIBYAML = None
_EVENTS = (_LIBYAML,) if _LIBYAML is not None else (yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser)


class _BoundedLoader(yaml.composer.Composer, *_EVENTS, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """PyYAML's safe loader, refusing deep nesting while it composes, and checking the composed
    document (aliases are shared nodes there, so this is cheap) before building any Python value."""

    def __init__(self, stream: str) -> None:
        if _LIBYAML is not None:
            _LIBYAML.__init__(self, stream)
        else:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self.aliases = 0

    def compose_node(self, parent, index):
        self.aliases += self.check_event(yaml.AliasEvent)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.name}: line {line}: nested more than {MAX_DEPTH} levels deep; a configuration needs a few")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _Expansion(self).measure(node)
        return self.construct_document(node)


class _Expansion:
    """The size of a composed document with every alias expanded, measured once per node (in
    document order an alias's node is already measured, so the walk's depth is the text's)."""

    def __init__(self, loader: _BoundedLoader) -> None:
        self.loader = loader
        self.sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, depth)

    def refuse(self, what: str, node: yaml.Node) -> ConfigError:
        return ConfigError(f"{self.loader.name}: line {node.start_mark.line + 1}: {what}")

    def measure(self, node: yaml.Node) -> tuple[int, int, int]:
        if id(node) in self.sizes:
            if self.sizes[id(node)] is None:
                raise self.refuse("an alias refers to the value that holds it", node)
            return self.sizes[id(node)]
        self.sizes[id(node)] = None  # type: ignore[assignment]
        if isinstance(node, yaml.ScalarNode):
            size = (1, len(node.value), 1)
        else:
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            if isinstance(node, yaml.MappingNode):
                self.no_key_twice(node)
            measured = [self.measure(c) for c in children]
            size = (1 + sum(m[0] for m in measured), sum(m[1] for m in measured), 1 + max((m[2] for m in measured), default=0))
        for value, bound, what in zip(size, (MAX_EXPANDED_NODES, MAX_CONFIG_BYTES, MAX_DEPTH), ("values", "characters", "levels deep")):
            if value > bound:
                grows = "its aliases (*name) expand to" if self.loader.aliases else "it holds"
                raise self.refuse(f"{grows} more than {bound} {what}; a configuration needs far fewer", node)
        self.sizes[id(node)] = size
        return size

    def no_key_twice(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, yaml.Node] = {}
        for key, _ in node.value:
            if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                continue  # keys a merge (<<) brings in are overridden by those written, as YAML says
            value = self.loader.construct_object(key)
            if value in seen:
                first = seen[value].start_mark.line + 1
                raise self.refuse(f"key {shown(value)} is given twice in one mapping (first at line {first}); give it once", key)
            seen[value] = key
