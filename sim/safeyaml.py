"""Reading input files anyone may have written: YAML scenarios and JSON profiles.

Every failure is a one-line DjinnsimError naming the file and, where the parser knows it, the line:
unreadable paths (NUL bytes, names too long, folders, permissions), files past `MAX_FILE_BYTES`,
bytes that are not UTF-8, every YAML error (scanner, parser, composer, constructor, reader, and the
values a constructor rejects, such as a timestamp with month 13), duplicate mapping keys (YAML
silently keeps the last one; a scenario that says a field twice says it ambiguously), nesting
deeper than `MAX_DEPTH` and aliases that expand past `MAX_NODES` nodes (a "billion laughs" bomb
reads in microseconds as shared objects, then takes forever to validate, copy or dump), recursive
aliases, and in JSON the non-standard constants NaN and Infinity.

The limits sit far above any real scenario (the shipped ones are under 40 lines, 5 levels deep)
and far below what a validator can walk in a moment.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from djinnsim.errors import DjinnsimError

MAX_FILE_BYTES = 4 * 2**20  # scenarios are a few kB; profiles (fits, samples' summaries) well under 1 MB
MAX_DEPTH = 64  # nesting levels, aliases followed
MAX_NODES = 100_000  # nodes once every alias is expanded


def _open_input(path: str | Path, what: str):
    """`path` opened for reading in binary; a one-line error for anything that keeps it from it."""
    shown = describe_path(path)
    try:
        return open(path, "rb")
    except ValueError:  # an embedded NUL: no operating system path can hold one
        raise DjinnsimError(f"{what} {shown}: a file name cannot hold a NUL byte") from None
    except FileNotFoundError:
        raise DjinnsimError(f"{what} not found: {shown}") from None
    except IsADirectoryError:
        raise DjinnsimError(f"{what} {shown} is a folder, not a file") from None
    except OSError as exc:
        raise DjinnsimError(f"{what} {shown}: cannot read it ({exc.strerror or exc})") from None


def require_file(path: str | Path, what: str) -> Path:
    """`path` if it names a readable file, else a one-line error (checked before work starts)."""
    _open_input(path, what).close()
    return Path(path)


def read_input_text(path: str | Path, what: str) -> str:
    """The text of an input file as UTF-8; a one-line error for anything that keeps it from being read."""
    shown = describe_path(path)
    with _open_input(path, what) as handle:
        try:
            data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise DjinnsimError(f"{what} {shown}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise DjinnsimError(f"{what} {shown}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DjinnsimError(f"{what} {shown}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                            f"{exc.start})") from None


def describe_path(path: str | Path) -> str:
    """A path as one printable line: control characters and undecodable bytes escaped, long names cut."""
    text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= 200 else text[:120] + "..." + text[-60:]


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit while composing and no duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        "found a key that is a list or mapping", key_node.start_mark) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, depth: int, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes under `node` with every alias expanded; refuses cycles and expansions past the limits.
    Recursion never goes deeper than MAX_DEPTH frames (the depth is checked before descending)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it (recursive)",
                                          node.start_mark)
    if depth > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels once aliases "
                                          "are expanded", node.start_mark)
    open_nodes.add(key)
    total = 1
    children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else ()
    for child in children:
        for item in (child if isinstance(child, tuple) else (child,)):
            total += _expanded_size(item, depth + 1, sizes, open_nodes)
            if total > MAX_NODES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values once aliases are "
                                                  "expanded (an alias bomb?)", node.start_mark)
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(exc, "position", None)  # a ReaderError (a character YAML does not accept)
    return f" at character {position}" if position is not None else ""


def _problem(exc: Exception) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "\0")
        return f"character U+{code:04X} is not allowed in YAML"
    text = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return " ".join(f"{context}: {text}".split()) if context and getattr(exc, "problem", None) else " ".join(text.split())


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document from `text`, within the limits above; `source` names it in errors."""
    try:
        loader = _LimitedLoader(text)
    except yaml.reader.ReaderError as exc:  # the reader checks every character first
        line = text.count("\n", 0, exc.position) + 1
        raise DjinnsimError(f"{source}: malformed YAML at line {line}: {_problem(exc)}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, 1, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise DjinnsimError(f"{source}: malformed YAML{_where(exc)}: {_problem(exc)}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's own check (e.g. 2020-13-01)
        raise DjinnsimError(f"{source}: malformed YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, what: str) -> Any:
    """`read_input_text` then `parse_yaml`."""
    return parse_yaml(read_input_text(path, what), describe_path(path))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, source: str, what: str = "document") -> Any:
    """Strict JSON (no NaN or Infinity), nesting within MAX_DEPTH."""
    too_deep = False
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        too_deep = True  # the C decoder's own limit (about 1000 levels): past ours too
    except ValueError as exc:
        raise DjinnsimError(f"{source}: not a readable JSON {what} ({exc})") from None
    if too_deep or _json_depth(value) > MAX_DEPTH:
        raise DjinnsimError(f"{source}: not a readable JSON {what} (nested deeper than {MAX_DEPTH} levels)")
    return value


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return depth
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def strict_json(document: Any, **kwargs: Any) -> str:
    """json.dumps that refuses NaN and infinities (standard JSON has neither): a result file that
    holds one is a bug upstream, and a reader in another language could not parse it."""
    try:
        return json.dumps(document, allow_nan=False, **kwargs)
    except ValueError:
        raise DjinnsimError(f"a result holds a value that is not finite ({_first_non_finite(document)}); "
                            "nothing was written") from None


def _first_non_finite(value: Any, where: str = "") -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'the document'} = {value}"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, child in children:
        found = _first_non_finite(child, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return ""
