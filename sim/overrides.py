"""Command-line overrides of a scenario file: `--set FIELD=VALUE` and the shortcuts `--agents`,
`--backends`, `--gpu` and `--link-gbps`; and the results folder a run of them goes to.

An override names any field of the scenario by its dotted path (`workload.agents`, `link.rtt_ms`,
`server.rules.admission`); its VALUE is parsed as YAML (`[1, 1024]` is a list, `h200` a string,
`null` clears a field). The overrides are applied in order to the scenario as written in its file
(what the file left unset keeps its default) and the result is validated by the scenario model
again, so a bad value is one line naming the field.

A run of an overridden scenario goes to `results/<file>__<tag>/`, where `<file>` is the scenario
file's name without `.yaml` and `<tag>` eight hex digits of the overrides' sha256; a plain run to
`results/<file>/`. The folder follows the file, not the scenario's `name`, so a copied scenario
that kept its `name` never writes into the original's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from djinnsim.errors import DjinnsimError

from .outputs import safe_name
from .safeyaml import parse_yaml
from .scenario import Scenario, load_scenario, parse_scenario

MAX_VALUE_CHARS = 10_000  # a value typed on a command line; longer is a mistake
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|[0-9]+")
_REMOVE = object()  # a shortcut's "drop this field" (a single --gpu replaces the scenario's gpu sweep)

# A field that a sweep replaces: setting it alone while the sweep lists values would change nothing.
SWEPT_BY = {("gpu",): ("sweep", "gpu"), ("model",): ("sweep", "model"), ("link", "gbps"): ("sweep", "link_gbps")}


@dataclass(frozen=True)
class Override:
    """One change to a scenario: the field's path, its new value, and how the user wrote it."""

    path: tuple[str, ...]
    value: Any
    flag: str

    @property
    def canonical(self) -> str:
        """What the results tag hashes: the path and the parsed value, however they were spelled."""
        value = "<removed>" if self.value is _REMOVE else json.dumps(self.value, sort_keys=True)
        return f"{'.'.join(self.path)}={value}"


def _path(text: str, flag: str) -> tuple[str, ...]:
    parts = tuple(text.strip().split("."))
    if not text.strip() or not all(_FIELD.fullmatch(p) for p in parts):
        raise DjinnsimError(f"{flag}: {text!r} is not a dotted field name (e.g. workload.agents)")
    return parts


def _yaml_value(text: str, flag: str) -> Any:
    """The value parsed as YAML within the limits scenario files have (sim.safeyaml: nesting, alias
    expansion)."""
    if len(text) > MAX_VALUE_CHARS:
        raise DjinnsimError(f"{flag}: the value is longer than {MAX_VALUE_CHARS} characters")
    return parse_yaml(text, f"{flag}: the value") if text.strip() else None


def parse_set(text: str) -> Override:
    """`FIELD=VALUE` (the text of one `--set`)."""
    flag = f"--set {text}" if len(text) <= 80 else f"--set {text[:77]}..."
    if "=" not in text:
        raise DjinnsimError(f"{flag}: expected FIELD=VALUE, e.g. --set workload.agents=[1,1024]")
    key, _, value = text.partition("=")
    return Override(_path(key, flag), _yaml_value(value, flag), flag)


def _list(text: str, flag: str) -> list[Any]:
    """`a,b,c`, a YAML list `[a, b]` or one value."""
    stripped = text.strip()
    if stripped.startswith("["):
        value = _yaml_value(stripped, flag)
        if not isinstance(value, list):
            raise DjinnsimError(f"{flag}: expected a list such as [1, 2]")
        return value
    items = [item.strip() for item in stripped.split(",")]
    if not stripped or any(not item for item in items):
        raise DjinnsimError(f"{flag}: expected one value or a comma-separated list")
    return [_yaml_value(item, flag) for item in items]


def _one_or_sweep(values: list[Any], field: tuple[str, ...], flag: str) -> list[Override]:
    """One value sets the field and drops its sweep; several values become the sweep."""
    sweep = SWEPT_BY[field]
    if len(values) == 1:
        return [Override(field, values[0], flag), Override(sweep, _REMOVE, flag)]
    return [Override(sweep, values, flag)]


def shortcut_overrides(agents: str | None = None, backends: str | None = None, gpu: str | None = None,
                       link_gbps: str | None = None) -> list[Override]:
    """The overrides the shortcut options stand for.

    `--agents 1,1024` is workload.agents; `--backends djinn,ray_keepalive` is backends; `--gpu h200`
    is gpu (and drops sweep.gpu), `--gpu a100-80gb,h200` is sweep.gpu; `--link-gbps` likewise with
    link.gbps and sweep.link_gbps."""
    found: list[Override] = []
    if agents is not None:
        found.append(Override(("workload", "agents"), _list(agents, f"--agents {agents}"), f"--agents {agents}"))
    if backends is not None:
        found.append(Override(("backends",), _list(backends, f"--backends {backends}"), f"--backends {backends}"))
    if gpu is not None:
        found += _one_or_sweep(_list(gpu, f"--gpu {gpu}"), ("gpu",), f"--gpu {gpu}")
    if link_gbps is not None:
        found += _one_or_sweep(_list(link_gbps, f"--link-gbps {link_gbps}"), ("link", "gbps"), f"--link-gbps {link_gbps}")
    return found


def collect(sets: Iterable[str] | None = None, **shortcuts: str | None) -> list[Override]:
    """Every override of a command line: the `--set`s in order, then the shortcuts."""
    return [parse_set(text) for text in sets or ()] + shortcut_overrides(**shortcuts)


def _assign(raw: dict[str, Any], override: Override) -> None:
    node: Any = raw
    *parents, last = override.path
    for depth, part in enumerate(parents):
        where = ".".join(override.path[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where, override.flag)
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise DjinnsimError(f"{override.flag}: {'.'.join(override.path[:depth]) or 'the scenario'} "
                                "is not a mapping")
        if not isinstance(node, (dict, list)):
            raise DjinnsimError(f"{override.flag}: {where} is {node!r}, not a mapping or list")
    if isinstance(node, list):
        index = _index(node, last, ".".join(override.path), override.flag)
        node[index] = override.value
    elif override.value is _REMOVE:
        node.pop(last, None)
    else:
        node[last] = override.value


def _index(items: list, part: str, where: str, flag: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise DjinnsimError(f"{flag}: {where}: the list has {len(items)} items, indexed 0..{len(items) - 1}")
    return int(part)


def _list_item(items: list, part: str, where: str, flag: str) -> Any:
    return items[_index(items, part, where, flag)]


def _check_not_swept(raw: dict[str, Any], overrides: Sequence[Override]) -> None:
    touched = {o.path for o in overrides}
    for o in overrides:
        sweep = SWEPT_BY.get(o.path)
        if sweep is None or o.value is _REMOVE or sweep in touched:
            continue
        swept = (raw.get("sweep") or {}).get(sweep[1])
        if swept:
            shortcut = {"gpu": "--gpu", "link_gbps": "--link-gbps"}.get(sweep[1])
            instead = f"{shortcut} (it replaces the sweep) or " if shortcut else ""
            raise DjinnsimError(f"{o.flag} would change nothing: the scenario sweeps {'.'.join(sweep)} {swept}; "
                                f"give {instead}--set {'.'.join(sweep)}=[...]")


def apply_overrides(scenario: Scenario, overrides: Sequence[Override], source: str = "<scenario>") -> Scenario:
    """The scenario with the overrides applied in order, validated again."""
    if not overrides:
        return scenario
    raw = scenario.model_dump(mode="json", exclude_unset=True)
    for override in overrides:
        _assign(raw, override)
    _check_not_swept(raw, overrides)
    flags = list(dict.fromkeys(o.flag for o in overrides))
    return parse_scenario(raw, f"{source} with {' '.join(flags)}")


def overrides_tag(overrides: Sequence[Override]) -> str | None:
    """Eight hex digits naming a set of overrides (None: no overrides)."""
    if not overrides:
        return None
    text = "\n".join(o.canonical for o in overrides)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def results_folder(scenario_path: str | Path, overrides: Sequence[Override] = ()) -> str:
    """`<file>` or `<file>__<tag>`: the folder under results/ that runs of this file go to."""
    stem = Path(scenario_path).name
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    stem = safe_name(stem)  # a file named `...yaml` must not name results/..
    tag = overrides_tag(overrides)
    return stem if tag is None else f"{stem}__{tag}"


def load_overridden(path: str | Path, overrides: Sequence[Override] = ()) -> tuple[Scenario, str]:
    """The scenario file with the overrides applied, and the results folder name of the pair."""
    scenario = apply_overrides(load_scenario(path), overrides, str(path))
    return scenario, results_folder(path, overrides)
