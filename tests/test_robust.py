"""Issue 12's reliability contract, case by case: bad input is one line, a stalled clock is an error
naming its cause, huge runs are refused before they start, and output folders are atomic."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from djinnsim.errors import DjinnsimError
from djinnsim.sim import estimate, outputs, safeyaml
from djinnsim.sim.engine import guard
from djinnsim.sim.engine.world import CountingEnvironment
from djinnsim.sim.profile import load_profile
from djinnsim.sim.run import bundled_profiles, run_scenario_file
from djinnsim.sim.scenario import expand_points, load_scenario, parse_scenario
from djinnsim.sim.simulate import simulate_point

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "small", "seed": 3, "backends": ["djinn"],
    "workload": {"kind": "agents", "agents": [1, 2], "reason": {"input_tokens": 8, "new_tokens": 4},
                 "act": {"kind": "fixed", "seconds": 1}, "reflect": {"input_tokens": 4, "new_tokens": 4}},
}


def _scenario(**changes) -> dict:
    doc = json.loads(json.dumps(SMALL))
    doc.update(changes)
    return doc


def _write(tmp_path: Path, text: str | bytes, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _refused(tmp_path: Path, text: str | bytes, *needles: str) -> str:
    with pytest.raises(DjinnsimError) as info:
        load_scenario(_write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- reading files ---------------------------------------------------------------------------------


def _bomb(levels: int) -> str:
    lines = ["custom_backends:", "  unused:", "    base: djinn", "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return yaml.safe_dump(SMALL) + "\n".join(lines) + "\n"


def test_an_alias_bomb_under_an_unused_custom_backend_is_refused_by_size(tmp_path):
    _refused(tmp_path, _bomb(9), "more than 100000 values once aliases are expanded")


def test_aliases_that_stay_small_still_work(tmp_path):
    text = yaml.safe_dump(SMALL) + "custom_backends:\n  a: &t {base: djinn}\n  b: *t\n"
    assert set(load_scenario(_write(tmp_path, text)).custom_backends) == {"a", "b"}


def test_a_recursive_alias_is_refused(tmp_path):
    _refused(tmp_path, yaml.safe_dump(SMALL) + "custom_backends: &c\n  x: *c\n", "recursive")


@pytest.mark.parametrize("text", [
    "description: " + "[" * 100 + "]" * 100,
    "description: " + "{a: " * 100 + "1" + "}" * 100,
    "deep:\n" + "".join(" " * i + f"k{i}:\n" for i in range(100)),
])
def test_nesting_past_the_limit_is_refused(tmp_path, text):
    _refused(tmp_path, yaml.safe_dump(SMALL) + text, "nested deeper than 64 levels")


@pytest.mark.parametrize("text,needle", [
    ("name: x\nbackends: [djinn\n", "malformed YAML at line"),
    ("a: !!python/object:os.system x\n", "could not determine a constructor"),
    ("a: 2020-13-01\n", "month must be in 1..12"),
    ("a: *nowhere\n", "found undefined alias"),
    ("a: 1\n---\nb: 2\n", "expected a single document"),
    ("a: 'unclosed\n", "malformed YAML"),
    ("a: \x01\n", "character U+0001 is not allowed"),
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("? [a]\n: 1\n", "a key that is a list or mapping"),
])
def test_every_kind_of_yaml_error_is_one_line(tmp_path, text, needle):
    _refused(tmp_path, text, needle)


def test_bytes_that_are_not_utf8_are_named_with_their_offset(tmp_path):
    _refused(tmp_path, b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 9)")


def test_unreadable_paths_are_one_line(tmp_path):
    for path, needle in [(tmp_path / ("x" * 5000 + ".yaml"), "File name too long"),
                         (Path("a\x00b.yaml"), "NUL byte"), (tmp_path, "is a folder"),
                         (tmp_path / "missing.yaml", "not found")]:
        with pytest.raises(DjinnsimError, match=needle) as info:
            load_scenario(path)
        assert len(str(info.value)) < 400  # a 5000-character name is shortened


def test_strict_json_refuses_non_finite_numbers_and_names_where():
    with pytest.raises(DjinnsimError, match=r"points\.0\.p99_ms = inf"):
        safeyaml.strict_json({"points": [{"p99_ms": math.inf}]})
    assert safeyaml.strict_json({"a": 1.5}) == '{"a": 1.5}'


def test_write_json_writes_null_for_non_finite_numbers_and_leaves_no_temporary_file(tmp_path):
    path = outputs.write_json(tmp_path / "x.json", {"a": [1.5, math.nan, (math.inf, -math.inf)], "b": "nan"},
                              indent=1)
    assert json.loads(path.read_text()) == {"a": [1.5, None, [None, None]], "b": "nan"}
    assert "NaN" not in path.read_text() and list(tmp_path.iterdir()) == [path]
    with pytest.raises(DjinnsimError, match="cannot write"):
        outputs.write_json(tmp_path / "missing" / "x.json", {})


# --- scenario fields -------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,needle", [
    ({"name": "../../x"}, "field name"),
    ({"name": "a/b"}, "field name"),
    ({"name": ".hidden"}, "field name"),
    ({"name": "x" * 101}, "field name"),
    ({"seed": -1}, "field seed"),
    ({"seed": 2**64}, "field seed"),
    ({"link": {"gbps": 0}}, "field link.gbps"),
    ({"link": {"gbps": 0.0009}}, "greater than or equal to 0.001"),
    ({"link": {"gbps": math.nan}}, "finite number"),
    ({"link": {"rtt_ms": math.inf}}, "field link.rtt_ms"),
    ({"sweep": {"link_gbps": [0, 10]}}, "field sweep.link_gbps.0"),
    ({"sweep": {"link_gbps": [math.nan]}}, "field sweep.link_gbps.0"),
    ({"sweep": {"link_gbps": [25, 25.0000001]}}, "link rate '25' appears twice"),
    ({"sweep": {"model": ["llama-2-7b", "meta-llama/Llama-2-7b-hf"]}}, "sweep.model: model 'llama-2-7b-hf' appears twice"),
    ({"backends": ["djinn", "djinn"]}, "backend 'djinn' appears twice"),
    ({"custom_backends": {"unused": {"base": "djinn", "kv": "sideways"}}}, "backend 'unused'"),
    ({"custom_backends": {"../x": {"base": "djinn"}}}, "custom backend '../x'"),
    ({"custom_backends": {"x": {"base": "djinn", "name": "../y"}}}, "drop its field name"),
    ({"custom_backends": {"x": {"base": ["djinn"]}}}, "field base must be a backend's name"),
    ({"custom_backends": {"x": {"base": "djinn", "ops_per_layer": 10**12}}}, "field ops_per_layer"),
])
def test_bad_fields_are_named(changes, needle):
    with pytest.raises(DjinnsimError, match=None) as info:
        parse_scenario(_scenario(**changes), "s.yaml")
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("path,value", [
    (("workload", "agents"), [2, 1, 2]), (("workload", "act", "seconds"), math.inf),
    (("workload", "act", "seconds"), 1e7), (("workload", "reason", "new_tokens"), 10**7),
    (("workload", "iterations"), 10**8),
])
def test_duplicate_and_absurd_workload_values_are_refused(path, value):
    doc = _scenario()
    doc[path[0]][path[1]] = value if len(path) == 2 else {**doc[path[0]][path[1]], path[2]: value}
    with pytest.raises(DjinnsimError, match=f"field {'.'.join(path)}"):
        parse_scenario(doc)


# --- profiles --------------------------------------------------------------------------------------


def _profile_doc() -> dict:
    return json.loads(bundled_profiles()[0].read_text())


def _load_mutated(tmp_path: Path, text: str):
    path = tmp_path / "p.json"
    path.write_text(text)
    return load_profile(path)


def _first_fit(doc: dict, name: str) -> dict:
    return doc[name]["pieces"][0] if "pieces" in doc[name] else doc[name]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: _first_fit(d, "decode_step")["coef"].__setitem__(0, math.nan), "not a JSON number"),
    (lambda d: _first_fit(d, "prefill")["features"].__setitem__(0, "tokens_cubed"), "unknown fit feature 'tokens_cubed'"),
    (lambda d: _first_fit(d, "prefill")["coef"].append(1.0), "as long as each other"),
    (lambda d: _first_fit(d, "prefill")["coef"].__setitem__(0, 1e300), "coefficient beyond"),
    (lambda d: _first_fit(d, "prefill").__setitem__("floor_s", -1.0), "prefill.floor_s: Input should be greater than or equal to 0"),
    (lambda d: d.__setitem__("jitter_decode", [-1.0]), "jitter factors"),
    (lambda d: d["h2d_pinned"].__setitem__("gbps", 0), "h2d_pinned.gbps"),
])
def test_bad_profiles_are_one_line_naming_the_field(tmp_path, mutate, needle):
    doc = _profile_doc()
    mutate(doc)
    with pytest.raises(DjinnsimError) as info:
        _load_mutated(tmp_path, json.dumps(doc))
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def _timeslice(d: dict) -> dict:
    return d["timeslice_mp"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: _first_fit(d, "prefill").__setitem__("floor_s", True), "prefill.floor_s: Input should be a valid number"),
    (lambda d: _first_fit(d, "cached_prefill").__setitem__("floor_s", 1e300), "cached_prefill.floor_s: Input should be less"),
    (lambda d: _timeslice(d).__setitem__("gpu_step_s", -1.0), "timeslice_mp.gpu_step_s: Input should be greater than 0"),
    (lambda d: _timeslice(d).__setitem__("gpu_step_s", 0.0), "timeslice_mp.gpu_step_s: Input should be greater than 0"),
    (lambda d: _timeslice(d).__setitem__("gpu_step_s", True), "timeslice_mp.gpu_step_s: Input should be a valid number"),
    (lambda d: _timeslice(d).__setitem__("gpu_step_s", 1e300), "timeslice_mp.gpu_step_s: Input should be less"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [-1]), "timeslice_mp.saturated_k"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [0]), "timeslice_mp.saturated_k"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [1]), "timeslice_mp.saturated_k"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [99]), "timeslice_mp.saturated_k: k = 99 is not a measured k >= 2"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [8, 8]), "timeslice_mp.saturated_k"),
    (lambda d: _timeslice(d).__setitem__("saturated_k", [True]), "timeslice_mp.saturated_k"),
    (lambda d: _timeslice(d).__setitem__("gpu_step_s", None), "timeslice_mp.saturated_k: given without gpu_step_s"),
])
def test_bad_new_fit_fields_are_one_line_naming_the_field(tmp_path, mutate, needle):
    """The max-form prefill's floor_s and the time-sliced model's gpu_step_s and saturated_k: a bool,
    a value no measurement gives, or a saturated k that is not one of the stage's k >= 2 is refused."""
    doc = json.loads(next(p for p in bundled_profiles() if "h200" in p.name).read_text())
    mutate(doc)
    with pytest.raises(DjinnsimError) as info:
        _load_mutated(tmp_path, json.dumps(doc))
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_corrupt_new_field_stops_djinnsim_run_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from djinnsim.cli import app

    doc = json.loads(next(p for p in bundled_profiles() if "h200" in p.name).read_text())
    doc["timeslice_mp"]["saturated_k"] = [-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["run", str(REPO / "scenarios" / "exp21_decode.yaml"), "--calibration", str(bad),
                                      "--out", str(tmp_path / "o"), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "timeslice_mp.saturated_k" in lines[0], result.output
    assert "Traceback" not in result.output


def test_deeply_nested_profile_json_is_one_line(tmp_path):
    for depth in (100, 5000):
        with pytest.raises(DjinnsimError, match="nested deeper than 64 levels"):
            _load_mutated(tmp_path, "[" * depth + "]" * depth)


# --- the clock guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [math.nan, math.inf])
def test_a_delay_that_is_not_a_finite_duration_stops_the_run(delay):
    with pytest.raises(guard.ClockStalled, match="a simulated step of"):
        CountingEnvironment().timeout(delay)


def _push_through(site: str, env: CountingEnvironment, step_s: float) -> None:
    """A step of `step_s` scheduled by one of the places that push an event into the queue themselves."""
    import simpy

    from djinnsim.sim.engine import pipe

    if site == "schedule":
        env.schedule(simpy.Event(env), delay=step_s)
    elif site == "recurring":
        pipe.Recurring(lambda _event: None).after(env, step_s)
    elif site == "schedule_at":
        pipe.schedule_at(env, simpy.Event(env), env.now + step_s)
    else:  # a lone transfer's closed form, its fixed time after the pipe being the step
        pipe.SharedPipe(env, lambda k: 1e9).transfer(1e6, after_s=step_s)


@pytest.mark.parametrize("site", ["schedule", "recurring", "schedule_at", "closed_form"])
@pytest.mark.parametrize("step_s", [math.nan, math.inf, -0.5, 0, 0.0, 2, 0.25])
def test_every_place_that_schedules_guards_its_step(site, step_s):
    """Each place that pushes an event itself checks the step as `schedule` does (their float
    comparisons with float literals: NaN, infinity and a negative step are still refused, a zero
    or positive one, int or float, taken)."""
    env = CountingEnvironment()
    refused = (site != "closed_form" and not 0 <= step_s < math.inf) or (site == "closed_form" and step_s == math.inf)
    if refused:  # a negative delay of a recurring call is SimPy's own ValueError, as a Timeout's
        with pytest.raises((guard.ClockStalled, ValueError), match="simulated step|Negative delay"):
            _push_through(site, env, step_s)
        return
    _push_through(site, env, step_s)
    assert len(env._queue) == 1
    expected_at = (1e6 / 1e9 + (step_s if step_s > 0 else 0.0)) if site == "closed_form" else step_s
    assert env._queue[0][0] == pytest.approx(expected_at)


def test_a_clock_that_stands_still_stops_the_run_after_one_window():
    env = CountingEnvironment(window=1000)

    def spin(env):
        while True:
            yield env.timeout(0)

    env.process(spin(env))
    with pytest.raises(guard.ClockStalled, match="stayed at 0 s for 1,000 events"):
        env.run()
    assert 1000 <= env.events_scheduled <= 2001


def test_a_clock_that_advances_is_never_stopped():
    env = CountingEnvironment(window=100)

    def tick(env):
        for _ in range(1000):
            yield env.timeout(0.001)

    env.process(tick(env))
    env.run()
    assert env.now == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [math.nan, -0.5])
def test_a_cost_that_is_not_a_duration_stops_the_point_and_is_named(fake_cost, bad):
    import numpy as np

    scenario = parse_scenario(_scenario())
    point = expand_points(scenario)[0]
    fake_cost.decode_step_s = lambda batch, sum_context: bad
    fake_cost.prefill_s = lambda *args, **kwargs: bad
    with pytest.raises(DjinnsimError, match=f"cannot progress.*decode step at batch 1, context 8.* is {bad}"):
        simulate_point(scenario, point, fake_cost, np.random.SeedSequence(1))


def test_the_window_grows_with_the_clients():
    assert guard.progress_window(0) == guard.PROGRESS_WINDOW
    assert guard.progress_window(100_000) > 100_000 * 8  # a simultaneous arrival of every agent fits


# --- the estimate ----------------------------------------------------------------------------------


def test_a_huge_workload_is_refused_before_it_starts():
    doc = _scenario()
    doc["workload"] = {**doc["workload"], "agents": [10**7], "iterations": 100}
    with pytest.raises(DjinnsimError, match="records to keep in memory"):
        estimate.check_workload(parse_scenario(doc))
    many = _scenario(backends=["djinn"], sweep={"link_gbps": [float(i + 1) for i in range(400)]})
    many["workload"] = {**many["workload"], "agents": list(range(1, 401))}
    with pytest.raises(DjinnsimError, match="160,000 points"):
        estimate.check_workload(parse_scenario(many))


def test_a_long_workload_warns_with_its_expected_time_and_a_small_one_does_not():
    doc = _scenario(backends=["full_djinn"])
    doc["workload"] = {"kind": "decode", "runs": 100_000, "new_tokens": 50}
    warning = estimate.check_workload(parse_scenario(doc))
    assert warning and "expected to take" in warning and "min" in warning
    assert estimate.check_workload(parse_scenario(_scenario())) is None


def test_the_estimate_bounds_the_events_a_run_schedules(fake_cost):
    """The per-token constants are upper bounds of what the engine schedules (checked, not assumed)."""
    import numpy as np

    for backends, workload in [(["djinn", "ray_serverless", "ray_keepalive"], SMALL["workload"]),
                               (["full_djinn", "native_pytorch", "op_remoting"],
                                {"kind": "decode", "runs": 4, "new_tokens": 6, "warmup_runs": 1})]:
        scenario = parse_scenario(_scenario(backends=backends, workload=workload))
        events = sum(simulate_point(scenario, p, fake_cost, np.random.SeedSequence(1)).events
                     for p in expand_points(scenario))
        assert events <= estimate.estimate(scenario)["events"]


# --- output folders --------------------------------------------------------------------------------


def test_an_output_folder_appears_only_once_complete(tmp_path):
    folder = outputs.OutputFolder(tmp_path / "out", tmp_path / "unused")
    with folder as staging:
        (staging / "summary.json").write_text("{}")
        assert staging.name.startswith(".out.partial-") and not (tmp_path / "out").exists()
    assert folder.path == tmp_path / "out" and (tmp_path / "out" / "summary.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), DjinnsimError("bad"), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_run_leaves_nothing(tmp_path, error):
    """Not even the parents it made for its folder (results/ and results/x/ of a first run)."""
    with pytest.raises((KeyboardInterrupt, DjinnsimError)) as info:
        with outputs.OutputFolder(None, tmp_path / "results" / "x" / "stamp") as staging:
            (staging / "summary.json").write_text("{}")
            raise error
    assert list(tmp_path.iterdir()) == []
    if isinstance(error, OSError):
        assert "disk full" in str(info.value) and "\n" not in str(info.value)


def test_a_failed_run_keeps_the_folders_that_were_there(tmp_path):
    (tmp_path / "results" / "x").mkdir(parents=True)  # empty, but not this run's to remove
    (tmp_path / "results" / "y").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with outputs.OutputFolder(None, tmp_path / "results" / "x" / "stamp"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with outputs.OutputFolder(tmp_path / "results" / "new" / "deeper" / "out", tmp_path / "unused"):
            raise KeyboardInterrupt
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["results", "results/x", "results/y"]


def test_a_parent_another_run_writes_into_stays(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with outputs.OutputFolder(None, tmp_path / "results" / "x" / "one"):
            with outputs.OutputFolder(None, tmp_path / "results" / "x" / "two") as other:
                (other / "summary.json").write_text("{}")
            raise KeyboardInterrupt
    assert [p.name for p in (tmp_path / "results" / "x").iterdir()] == ["two"]


@pytest.mark.parametrize("signal_after", ["results", "x", outputs.PARTIAL_TAG])
def test_a_signal_while_the_folders_are_made_leaves_none(tmp_path, monkeypatch, signal_after):
    """SIGINT right after any of the folders is made (held back until the step ends, or raised at once
    when another thread of the process takes it): all are removed."""
    real_mkdir = Path.mkdir

    def signalled(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if signal_after in self.name:  # to this thread: a process-wide signal may go to a native thread
            # of a library (torch, Ray) and land in this one at any later step (the clean-up's own
            # robustness to that is tested by ..._in_the_middle_of_a_discard_...)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(Path, "mkdir", signalled)
    with pytest.raises(KeyboardInterrupt):
        with outputs.OutputFolder(None, tmp_path / "results" / "x" / "stamp"):
            pytest.fail("the block ran although SIGINT came before it")
    assert list(tmp_path.iterdir()) == []


def test_a_commit_refused_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DjinnsimError, match="was filled by something else"):
        with outputs.OutputFolder(out, out) as staging:
            (staging / "summary.json").write_text("{}")
            out.mkdir()
            (out / "notes.txt").write_text("someone else's")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, DjinnsimError])
@pytest.mark.parametrize("agents", [None, "1,3"])  # results/s/ or, with an override, results/s__<hash>/
def test_a_run_interrupted_or_failed_leaves_no_results_folder(tmp_path, monkeypatch, error, agents):
    from djinnsim.overrides_cli import collect
    from djinnsim.sim import run as run_module

    scenario = _write(tmp_path, yaml.safe_dump(SMALL))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "earlier").mkdir(parents=True)  # results/ was there: it stays

    def fail_while_simulating(*args, **kwargs):
        staging = [p for p in (tmp_path / "results").rglob("*") if outputs.PARTIAL_TAG in p.name]
        assert len(staging) == 1 and (staging[0] / "scenario.yaml").is_file()  # inside the run, folders made
        raise error("stopped")

    monkeypatch.setattr(run_module, "simulate_scenario", fail_while_simulating)
    with pytest.raises(error):
        run_scenario_file(scenario, quiet=True, overrides=collect(None, agents=agents))
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["earlier"]


def test_default_folders_of_the_same_second_do_not_mix(tmp_path):
    default = tmp_path / "results" / "x" / "20260101T000000Z"
    for i in range(3):
        with outputs.OutputFolder(None, default) as staging:
            (staging / "summary.json").write_text(str(i))
    names = sorted(p.name for p in default.parent.iterdir())
    assert names == ["20260101T000000Z", "20260101T000000Z-2", "20260101T000000Z-3"]
    assert sorted((default.parent / n / "summary.json").read_text() for n in names) == ["0", "1", "2"]


def test_a_non_empty_out_needs_force_and_force_replaces_only_djinnsim_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DjinnsimError, match="is not empty; give --force"):
        outputs.OutputFolder(out, out)
    with pytest.raises(DjinnsimError, match="holds no djinnsim output; not replacing it"):
        outputs.OutputFolder(out, out, force=True)
    (out / "summary.json").write_text("old")
    with outputs.OutputFolder(out, out, force=True) as staging:
        (staging / "summary.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one is gone, no .old- left
    with pytest.raises(DjinnsimError, match="exists and is not a folder"):
        outputs.OutputFolder(out / "summary.json", out)
    with pytest.raises(DjinnsimError, match="holds the current folder"):
        outputs.OutputFolder(Path.cwd(), out, force=True)


def test_a_permission_error_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(outputs.os, "mkdir", refuse)
    with pytest.raises(DjinnsimError, match="cannot create the output folder .*ro: Permission denied"):
        with outputs.OutputFolder(tmp_path / "ro" / "out", tmp_path):
            pass


def test_a_run_into_a_full_disk_leaves_no_folder(tmp_path, monkeypatch):
    scenario = _write(tmp_path, yaml.safe_dump(SMALL))
    real_write = Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name == "records.csv" or self.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DjinnsimError, match="disk full"):
        run_scenario_file(scenario, out=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_run_writes_strict_json_and_refuses_a_non_empty_out(tmp_path):
    scenario = _write(tmp_path, yaml.safe_dump(SMALL))
    out = run_scenario_file(scenario, out=tmp_path / "out", quiet=True)
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    with pytest.raises(DjinnsimError, match="not empty; give --force"):
        run_scenario_file(scenario, out=tmp_path / "out", quiet=True)
    assert run_scenario_file(scenario, out=tmp_path / "out", quiet=True, force=True) == tmp_path / "out"


# --- the console entry -----------------------------------------------------------------------------


def _cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "djinnsim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.mark.parametrize("args,needle", [
    (["run", "--bogus"], "No such option: --bogus"),
    (["run"], "Missing argument"),
    (["run", "s.yaml", "--seed", "-1"], "--seed must be an integer in 0..18446744073709551615, not -1"),
    (["run", "s.yaml", "--seed", "abc"], "Invalid value for '--seed'"),
    (["run", "s.yaml", "--bands", "100000"], "--bands must be <= 1000"),
    (["search", "s.yaml", "--slo-p99-ms", "nan"], "--slo-p99-ms must be a finite number"),
])
def test_usage_and_option_errors_are_one_line_and_exit_1(tmp_path, args, needle):
    _write(tmp_path, yaml.safe_dump(SMALL))
    proc = _cli(*args, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], proc.stderr


def _wait_for_handlers(pid: int) -> None:
    """Until djinnsim.main has installed its SIGTERM handler (a signal before that, while the
    interpreter itself starts, is Python's); on a loaded machine start-up takes a second or more."""
    status = Path(f"/proc/{pid}/status")
    for _ in range(600):
        caught = next((line for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "")
        if caught and int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_any_moment_leaves_no_complete_looking_folder(tmp_path, signum, code):
    doc = _scenario(backends=["djinn", "ray_serverless"])
    doc["workload"] = {**doc["workload"], "agents": [64, 128, 256]}
    _write(tmp_path, yaml.safe_dump(doc))
    # during the imports, then simulation or writing (a signal in the first tens of milliseconds, while
    # the interpreter itself starts, reaches Python before any djinnsim code runs)
    for delay_s in (0.0, 1.0, 2.5):
        proc = subprocess.Popen([sys.executable, "-m", "djinnsim", "run", "s.yaml", "--quiet"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_handlers(proc.pid)
        time.sleep(delay_s)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        results = tmp_path / "results" / "small"
        folders = list(results.iterdir()) if results.is_dir() else []
        assert not [f for f in folders if outputs.PARTIAL_TAG in f.name], folders
        if proc.returncode == code and stderr.strip().endswith("interrupted"):
            assert stderr.strip().splitlines()[-1] == "interrupted"
            assert not folders, folders
        else:  # finished before the signal came
            assert proc.returncode == 0 and all((f / "summary.json").is_file() for f in folders)
        for folder in folders:
            for path in sorted(folder.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            folder.rmdir()


def _children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _running(pid: int, grace_s: float = 2.0) -> bool:
    """Whether `pid` still runs `grace_s` after it was told to end: a killed child the command did
    not wait for is a zombie until whoever inherits it reaps it (slowly where PID 1 is a container's
    shell), and a signal takes a moment to land; neither writes anything."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        if state in ("Z", "X") or time.monotonic() > deadline:
            return state not in ("Z", "X")
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(os, "fork"), reason="needs /proc and fork")
def test_an_interrupt_while_children_write_ends_them_too(tmp_path):
    """A large point's rows and its figure are written by child processes while it is simulated
    (sim/report.py): an interrupt then ends them with the command, and leaves no folder."""
    doc = _scenario(server={"scheduler": "continuous_batching"})
    # large enough that the run is still going when its children have come (20,000 agents finished
    # first on some runs); interrupted as soon as they come, it costs no more
    doc["workload"] = {**doc["workload"], "agents": [200000], "arrival": {"kind": "poisson", "rate_per_s": 50}}
    _write(tmp_path, yaml.safe_dump(doc))
    driver = ("import sys; from djinnsim.sim import records, report; report.RecordsCsv.aside_rows = 1; "
              "records.RecordBuilder.flush_rows = 64; from djinnsim.main import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", driver, "run", "s.yaml", "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[int] = set()
    for _ in range(3000):  # the rows' child and the figure's: both start with the first records
        children |= _children(proc.pid) if proc.poll() is None else set()
        if len(children) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert len(children) >= 2, "no child processes came"
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:  # a run the interrupt did not end would go on loading the machine
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    for child in children:
        assert not _running(child), f"child {child} outlived the command"
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("summary.json"))


def test_python_m_djinnsim_and_the_console_script_are_one_entry():
    from djinnsim import main as entry

    scripts = [line for line in Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text().splitlines()
               if line.startswith("djinnsim =")]
    assert scripts == ['djinnsim = "djinnsim.main:main"']
    assert "from djinnsim.main import main" in Path(entry.__file__).with_name("__main__.py").read_text()


@pytest.mark.parametrize("file_name,folder", [("...yaml", "_"), ("..yaml", "scenario"), ("a b/../c.yaml", "c"),
                                              ("ünï code.yaml", "_n__code"), (".hidden.yaml", "hidden")])
def test_a_results_folder_named_after_the_file_stays_under_results(file_name, folder):
    from djinnsim.sim.overrides import results_folder

    name = results_folder(file_name)
    assert name == folder and "/" not in name and ".." not in name and not name.startswith(".")


def test_an_interrupt_in_the_middle_of_a_discard_still_removes_every_folder(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside the clean-up (a signal another thread took lands at any later
    step of this one): the clean-up finishes, then the interrupt is raised."""
    real_rmdir = Path.rmdir
    raised = []

    def interrupted_once(self):
        real_rmdir(self)
        if not raised:
            raised.append(self)
            raise KeyboardInterrupt

    folder = outputs.OutputFolder(None, tmp_path / "results" / "x" / "stamp")
    with pytest.raises(KeyboardInterrupt):
        with folder:
            monkeypatch.setattr(Path, "rmdir", interrupted_once)
            raise ValueError("the run failed")
    assert raised and list(tmp_path.iterdir()) == []


def test_signals_deferred_restores_the_mask_when_an_interrupt_lands_on_the_way_out(monkeypatch):
    """A KeyboardInterrupt raised at the very call that restores the mask (a signal another thread took
    lands at any step): the mask is restored all the same, then the interrupt raised."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    real = signal.pthread_sigmask
    calls = []

    def interrupted_restore(how, mask):
        calls.append(how)
        if how == signal.SIG_SETMASK and calls.count(signal.SIG_SETMASK) == 1:
            raise KeyboardInterrupt
        return real(how, mask)

    monkeypatch.setattr(signal, "pthread_sigmask", interrupted_restore)
    with pytest.raises(KeyboardInterrupt):
        with outputs.signals_deferred():
            pass
    monkeypatch.undo()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
