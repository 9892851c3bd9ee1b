"""Mutated scenarios and profiles through the real CLI: counts tracebacks, hangs and exit codes.

    python benchmarks/fuzz.py --cases 1200 --seed 0 [--jobs 2] [--timeout-s 60]

Each case writes a scenario (and for profile cases a calibration profile) mutated from a small valid
one, then runs `python -m djinnsim run CASE.yaml --quiet --out DIR` (a few cases `search`) in a
subprocess with a timeout. The mutations are the kinds issue 12 lists:

  bytes      bytes that are not UTF-8, NUL and control bytes, truncation
  yaml       syntax errors of every kind (brackets, indentation, tabs, tags, anchors, documents)
  nesting    lists or mappings nested hundreds to thousands deep
  alias      alias bombs, under an unused custom backend or any field; recursive aliases
  names      scenario and backend names with separators, `..`, NUL, control characters, 1000 chars
  numbers    NaN, inf, 0, negative, tiny, huge, wrong types in a random numeric field (link, sweep,
             durations, tokens, agents, cluster, server)
  duplicates agent counts, backends, sweep values, mapping keys
  backends   custom backends, used or not, with wrong toggles, bad bases, cycles
  cli        --seed -1 / 2^70 / text, --bands, --jobs, --out onto a file, file names too long
  profile    NaN / inf / negative / huge numbers anywhere in the bundled profile, unknown fit
             features, wrong lengths, deleted fields, truncated or deeply nested JSON

A case's outcome: `ok` (exit 0 and, for run, a summary.json that parses as strict JSON), `error`
(exit 1, one line on stderr starting `error:`), `traceback`, `hang` (past the timeout with no
warning that the run would be long), `long` (past the timeout after the estimate's warning), or
`other` (any other exit code or output). The contract is 0 tracebacks, 0 hangs, 0 other.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import yaml

BASE_AGENTS = {
    "name": "fuzz", "seed": 1, "backends": ["djinn", "ray_keepalive"],
    "link": {"gbps": 25, "rtt_ms": 0.2},
    "workload": {"kind": "agents", "agents": [1, 2], "reason": {"input_tokens": 72, "new_tokens": 8},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 16, "new_tokens": 8},
                 "iterations": 1, "arrival": {"kind": "simultaneous"}},
}
BASE_DECODE = {
    "name": "fuzzd", "seed": 1, "backends": ["full_djinn", "native_pytorch"],
    "workload": {"kind": "decode", "prompt_tokens": 16, "new_tokens": 8, "runs": 3, "warmup_runs": 1},
    "sweep": {"link_gbps": [10, 25]},
}
BAD_NUMBERS = [0, -1, -0.0, 1e-300, 1e300, math.nan, math.inf, -math.inf, 2**70, 10**7, 0.5, "abc", None,
               [], {}, True, "1e3", 123456789]
NUMERIC_FIELDS = [
    ("link", "gbps"), ("link", "rtt_ms"), ("link", "framing_bytes"), ("link", "stream_cap_gbps"),
    ("workload", "reason", "input_tokens"), ("workload", "reason", "new_tokens"),
    ("workload", "reflect", "new_tokens"), ("workload", "act", "seconds"), ("workload", "iterations"),
    ("workload", "agents", 0), ("workload", "agents", 1), ("seed",), ("trace_point",), ("bands",),
    ("server", "max_batch"), ("cluster", "nodes"), ("cluster", "gpus_per_node"),
    ("server", "rules", "session_arena_mib"), ("server", "rules", "idle_eviction_s"),
    ("sweep", "link_gbps", 0), ("workload", "arrival", "rate_per_s"),
]
DECODE_FIELDS = [("workload", "prompt_tokens"), ("workload", "new_tokens"), ("workload", "runs"),
                 ("workload", "warmup_runs"), ("workload", "batch"), ("sweep", "link_gbps", 1)]
YAML_BREAKS = ["key: [1, 2", "key: {a: 1", "  bad: indent\n x: 1", "\tkey: 1", "key: !!python/object:os.system x",
               "key: *undefined", "key: &a 1\nkey2: &a 2\nkey3: [*a", "---\na: 1\n---\nb: 2", "key: 'unclosed",
               "key: \"\\q\"", "? [a, b]\n: 1", "key: !custom 1", "key: 2020-13-45", "%YAML 9.9\n---\na: 1",
               "key: @reserved", "- a\nb: 1", "key: |\n bad\n  indent\n x", "&a [*a]", "key: !!binary '!!!'",
               "key: !!int abc", "a: 1\na: 2", "<<: 5"]


def _set(doc: dict, path: tuple, value) -> None:
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int):
        if last < len(node):
            node[last] = value
        else:
            node.append(value)


def _dump(doc) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode("utf-8", "surrogateescape")


def _bomb(depth: int, width: int) -> str:
    lines = ["  bomb:", "    base: djinn", f"    l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines)


class CaseMaker:
    """Deterministic cases from one seed: (kind, files {name: bytes}, extra CLI args, command)."""

    def __init__(self, seed: int, profile_text: str) -> None:
        self.rng = random.Random(seed)
        self.profile = json.loads(profile_text)

    def base(self) -> dict:
        return copy.deepcopy(self.rng.choice([BASE_AGENTS, BASE_DECODE]))

    def case(self, index: int) -> tuple[str, dict[str, bytes], list[str], str]:
        kind = ["bytes", "yaml", "nesting", "alias", "names", "numbers", "numbers", "duplicates", "backends",
                "cli", "profile", "profile"][index % 12]
        files, args = getattr(self, f"_{kind}")()
        command = "search" if kind in ("numbers", "cli") and self.rng.random() < 0.15 else "run"
        return kind, files, args, command

    def _bytes(self):
        data = bytearray(_dump(self.base()))
        how = self.rng.randrange(5)
        if how == 0:
            data[self.rng.randrange(len(data)):0] = bytes([self.rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0xED])])
        elif how == 1:
            data[self.rng.randrange(len(data)):0] = self.rng.choice([b"\x00", b"\x01", b"\x1b[31m", b"\x7f", b"\r"])
        elif how == 2:
            del data[self.rng.randrange(len(data)):]
        elif how == 3:
            for _ in range(self.rng.randint(1, 8)):
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        else:
            data = bytearray(b"\xff\xfe" + _dump(self.base()).decode().encode("utf-16-le"))
        return {"case.yaml": bytes(data)}, []

    def _yaml(self):
        text = _dump(self.base()).decode()
        lines = text.splitlines()
        lines.insert(self.rng.randrange(len(lines) + 1), self.rng.choice(YAML_BREAKS))
        return {"case.yaml": "\n".join(lines).encode()}, []

    def _nesting(self):
        depth = self.rng.choice([65, 100, 1000, 5000, 20000])
        doc = self.base()
        opener, closer = self.rng.choice([("[", "]"), ("{a: ", "}")])
        field = self.rng.choice(["description", "custom_backends", "extra", "link"])
        text = _dump(doc).decode() + f"{field}: {opener * depth}1{closer * depth}\n"
        if self.rng.random() < 0.5:  # block style: indentation
            text = _dump(doc).decode() + "deep:\n" + "".join(" " * i + f"k{i}:\n" for i in range(depth // 10)) + "\n"
        return {"case.yaml": text.encode()}, []

    def _alias(self):
        doc = self.base()
        text = _dump({k: v for k, v in doc.items() if k != "custom_backends"}).decode()
        how = self.rng.randrange(3)
        if how == 0:
            text += "custom_backends:\n" + _bomb(self.rng.choice([6, 9, 12]), self.rng.choice([9, 10])) + "\n"
        elif how == 1:
            text += "description: &d [" + ", ".join(["x"] * 10) + "]\n"
            text += "".join(f"extra{i}: &e{i} [{', '.join([f'*e{i - 1}' if i else '*d'] * 10)}]\n" for i in range(8))
        else:
            text += "custom_backends:\n  loop: &loop {base: djinn, again: *loop}\n" if self.rng.random() < 0.5 else \
                "custom_backends: &cb\n  x: {base: djinn}\n  y: *cb\n"
        return {"case.yaml": text.encode()}, []

    def _names(self):
        doc = self.base()
        name = self.rng.choice(["../../x", "a/b", "/etc/passwd", "..", ".", "", "x" * 1000, "a\x00b", "a\x01b",
                                "nul\x00", "con:", "name with spaces", "ünï", "-rf", ".hidden", "a\\b", "~"])
        if self.rng.random() < 0.5:
            doc["name"] = name
        else:
            doc["custom_backends"] = {name: {"base": "djinn"}}
            doc["backends"] = [*doc["backends"], name] if self.rng.random() < 0.5 else doc["backends"]
        return {"case.yaml": _dump(doc)}, []

    def _numbers(self):
        doc = self.base()
        fields = NUMERIC_FIELDS + (DECODE_FIELDS if doc["workload"]["kind"] == "decode" else [])
        for _ in range(self.rng.randint(1, 2)):
            _set(doc, self.rng.choice(fields), self.rng.choice(BAD_NUMBERS))
        return {"case.yaml": _dump(doc)}, []

    def _duplicates(self):
        doc = self.base()
        how = self.rng.randrange(4)
        if how == 0 and doc["workload"]["kind"] == "agents":
            doc["workload"]["agents"] = [2, 1, 2]
        elif how == 1:
            doc["backends"] = [doc["backends"][0], doc["backends"][0]]
        elif how == 2:
            doc["sweep"] = self.rng.choice([{"link_gbps": [25, 25.0]}, {"model": ["llama-2-7b", "meta-llama/Llama-2-7b-hf"]},
                                            {"gpu": ["h100-80gb", "h100-80gb"]}, {"link_gbps": [10, 10.0000001]}])
        else:
            return {"case.yaml": _dump(doc) + b"seed: 2\n"}, []
        return {"case.yaml": _dump(doc)}, []

    def _backends(self):
        doc = self.base()
        toggles = self.rng.choice([{"base": "djinn", "kv": "sideways"}, {"base": "nope"}, {"base": "a"},
                                   {"location": "remote"}, {"base": "djinn", "ops_per_layer": 10**12},
                                   {"base": "djinn", "name": "../x"}, {"base": "djinn", "bytes_per_op": -1},
                                   {"base": ["djinn"]}, {"base": "djinn", "kv_policy": {"kind": "ttl", "ttl_s": math.nan}},
                                   {"base": "djinn", "scheduler": "continuous_batching"}, "djinn", None, 5])
        doc["custom_backends"] = {"a": toggles, "b": {"base": "a"}}
        if self.rng.random() < 0.5:
            doc["backends"] = [*doc["backends"], "b"]
        return {"case.yaml": _dump(doc)}, []

    def _cli(self):
        doc = self.base()
        args = self.rng.choice([["--seed", "-1"], ["--seed", str(2**70)], ["--seed", "abc"], ["--seed", "1.5"],
                                ["--bands", "-1"], ["--bands", "100000"], ["--jobs", "0"], ["--jobs", "-3"],
                                ["--out", "FILE"], ["--calibration", "x" * 5000], ["--calibration", "/"],
                                ["--bogus"], ["--seed"], ["--calibration", "case.yaml"], ["--seed", "7"]])
        return {"case.yaml": _dump(doc)}, args

    def _profile(self):
        profile = copy.deepcopy(self.profile)
        how = self.rng.randrange(6)
        if how == 0:  # a numeric leaf anywhere
            leaves = []
            _leaves(profile, (), leaves)
            path = self.rng.choice(leaves)
            _set_any(profile, path, self.rng.choice(BAD_NUMBERS))
        elif how == 1:
            fit = self.rng.choice(["prefill", "decode_step"])
            target = profile[fit]["pieces"][0] if "pieces" in profile[fit] else profile[fit]
            self.rng.choice([
                lambda: target["features"].__setitem__(0, self.rng.choice(["tokens_cubed", "", "1 ", "batch*2"])),
                lambda: target["coef"].append(1.0),
                lambda: target["coef"].__setitem__(0, self.rng.choice([math.nan, math.inf, -1e9, 1e300])),
                lambda: target.__setitem__("features", []),
            ])()
        elif how == 2:
            keys = [k for k in profile if k not in ("schema_version",)]
            del profile[self.rng.choice(keys)]
        elif how == 3:
            text = json.dumps(profile)
            return {"case.yaml": _dump(self._profile_scenario()), "profile.json": text[:self.rng.randrange(len(text))].encode()}, \
                ["--calibration", "profile.json"]
        elif how == 4:
            profile[self.rng.choice(["jitter_decode", "jitter_prefill"])] = self.rng.choice(
                [[-1.0], [0.0], [math.nan], [1e9], [], ["x"]])
        else:
            depth = self.rng.choice([100, 2000])
            return {"case.yaml": _dump(self._profile_scenario()),
                    "profile.json": ("[" * depth + "]" * depth).encode()}, ["--calibration", "profile.json"]
        return {"case.yaml": _dump(self._profile_scenario()), "profile.json": json.dumps(profile).encode()}, \
            ["--calibration", "profile.json"]

    def _profile_scenario(self) -> dict:
        doc = self.base()
        doc["model"], doc["gpu"] = "llama-2-7b", "h100-80gb"
        return doc


def _leaves(node, path, out) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _leaves(value, (*path, key), out)
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            _leaves(value, (*path, i), out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out.append(path)


def _set_any(doc, path, value) -> None:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def run_case(index: int, case, timeout_s: float, workdir: Path) -> tuple[str, str, int | None, str]:
    kind, files, args, command = case
    folder = workdir / f"case{index:05d}"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "FILE").write_text("a file, not a folder\n")
    out = [] if "--out" in args else ["--out", "out"]
    extra = ["--slo-p99-ms", "5000"] if command == "search" and "decode" not in files["case.yaml"].decode(
        "utf-8", "replace") else (["--break-even-ms", "50"] if command == "search" else [])
    argv = [sys.executable, "-m", "djinnsim", command, "case.yaml", *([] if command == "search" else ["--quiet"]),
            *out, *extra, *args]
    try:
        proc = subprocess.run(argv, cwd=folder, capture_output=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
    except subprocess.TimeoutExpired as exc:
        stderr = (exc.stderr or b"").decode("utf-8", "replace")
        verdict = "long" if "a large run" in stderr else "hang"
        shutil.rmtree(folder, ignore_errors=True)
        return kind, verdict, None, f"timeout after {timeout_s:g} s"
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    if "Traceback (most recent call last)" in stderr:
        verdict = "traceback"
    elif proc.returncode == 0:
        verdict = "ok" if _complete(folder / "out", command) else "other"
    elif proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "):
        verdict = "error"
    else:
        verdict = "other"
    shutil.rmtree(folder, ignore_errors=True)
    return kind, verdict, proc.returncode, (lines[-1] if lines else "")[:160]


def _complete(out: Path, command: str) -> bool:
    name = "summary.json" if command == "run" else "search.json"
    try:
        json.loads((out / name).read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        return True
    except (OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--show", type=int, default=3, help="example lines printed per kind and outcome")
    opts = parser.parse_args()
    profile_path = Path(str(resources.files("djinnsim.sim") / "data" / "profiles" / "h100-80gb-llama-2-7b.json"))
    maker = CaseMaker(opts.seed, profile_path.read_text())
    cases = [maker.case(i) for i in range(opts.cases)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="djinnsim-fuzz-") as tmp:
        results = []
        with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
            for result in pool.map(lambda ic: run_case(ic[0], ic[1], opts.timeout_s, Path(tmp)), enumerate(cases)):
                results.append(result)
                if len(results) % 100 == 0:  # a running tally, so a long run shows where it stands
                    tally = Counter(verdict for _, verdict, _, _ in results)
                    print(f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())),
                          file=sys.stderr, flush=True)
    wall_s = time.perf_counter() - started
    outcomes = ["ok", "error", "traceback", "hang", "long", "other"]
    table = Counter((kind, verdict) for kind, verdict, _, _ in results)
    kinds = sorted({kind for kind, _, _, _ in results})
    print(f"{'kind':<12}" + "".join(f"{o:>10}" for o in outcomes) + f"{'cases':>8}")
    for kind in kinds:
        print(f"{kind:<12}" + "".join(f"{table[(kind, o)]:>10}" for o in outcomes)
              + f"{sum(table[(kind, o)] for o in outcomes):>8}")
    totals = Counter(verdict for _, verdict, _, _ in results)
    print(f"{'all':<12}" + "".join(f"{totals[o]:>10}" for o in outcomes) + f"{len(results):>8}")
    codes = Counter(code for _, _, code, _ in results)
    print("exit codes: " + ", ".join(f"{code}: {count}" for code, count in sorted(codes.items(), key=str)))
    print(f"{len(results)} cases in {wall_s:.0f} s, {opts.jobs} at a time, timeout {opts.timeout_s:g} s")
    shown = Counter()
    for kind, verdict, code, line in results:
        if verdict in ("traceback", "hang", "other", "long") or (verdict == "error" and shown[(kind, verdict)] < opts.show):
            if shown[(kind, verdict)] < max(opts.show, 1) or verdict != "error":
                print(f"  {kind:<11}{verdict:<10}rc={code}  {line}")
            shown[(kind, verdict)] += 1
    if totals["traceback"] or totals["hang"] or totals["other"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
