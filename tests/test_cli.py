"""The CLI: bad input is one line naming the problem and exit code 1; good input delegates."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from djinnsim.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

SMALL = """
name: small
seed: 3
backends: [djinn]
workload:
  kind: agents
  agents: [1, 2]
  reason: {input_tokens: 8, new_tokens: 4}
  act: {kind: fixed, seconds: 1}
  reflect: {input_tokens: 4, new_tokens: 4}
"""


def _run(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def scenario_file(tmp_path: Path):
    def write(text: str, name: str = "s.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_missing_scenario_file(tmp_path):
    _one_line_error(_run("run", str(tmp_path / "nope.yaml")), "scenario file not found", "nope.yaml")


def test_malformed_yaml(scenario_file):
    path = scenario_file("name: x\nbackends: [djinn\n")
    _one_line_error(_run("run", str(path)), "malformed YAML", "line")


def test_unknown_backend(scenario_file):
    path = scenario_file(SMALL.replace("[djinn]", "[djinn, warp_drive]"))
    _one_line_error(_run("run", str(path)), "unknown backend", "warp_drive")


def test_unknown_model(scenario_file):
    path = scenario_file(SMALL + "model: gpt-17\n")
    _one_line_error(_run("run", str(path)), "unknown model", "gpt-17")


def test_non_positive_agent_count(scenario_file):
    path = scenario_file(SMALL.replace("agents: [1, 2]", "agents: [0, 2]"))
    _one_line_error(_run("run", str(path)), "workload", "agents", "> 0")


def test_unknown_field_is_named(scenario_file):
    path = scenario_file(SMALL + "lnk: {gbps: 10}\n")
    _one_line_error(_run("run", str(path)), "lnk")


def test_missing_calibration(scenario_file, tmp_path):
    path = scenario_file(SMALL)
    _one_line_error(
        _run("run", str(path), "--calibration", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")),
        "calibration profile not found",
    )


def test_unreadable_calibration(scenario_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    path = scenario_file(SMALL)
    _one_line_error(_run("run", str(path), "--calibration", str(bad), "--out", str(tmp_path / "o")), "bad.json")


def test_profile_of_unknown_schema_version(scenario_file, tmp_path):
    bad = tmp_path / "v99.json"
    bad.write_text('{"schema_version": 99}')
    path = scenario_file(SMALL)
    _one_line_error(
        _run("run", str(path), "--calibration", str(bad), "--out", str(tmp_path / "o")), "schema_version", "99"
    )


def test_nothing_written_is_lost_on_error(scenario_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("precious")
    path = scenario_file(SMALL.replace("[djinn]", "[nope]"))
    assert _run("run", str(path), "--out", str(out)).exit_code == 1
    assert keep.read_text() == "precious"


def test_run_writes_results(scenario_file, tmp_path):
    out = tmp_path / "out"
    result = _run("run", str(scenario_file(SMALL)), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "scenario.yaml").is_file()
    assert (out / "records.csv").is_file()
    resolved = (out / "scenario.yaml").read_text()
    assert "rtt_ms" in resolved  # defaults are written out, not only what the user typed


def test_same_seed_gives_byte_identical_results(scenario_file, tmp_path):
    path = scenario_file(SMALL)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run("run", str(path), "--out", str(a), "--quiet").exit_code == 0
    assert _run("run", str(path), "--out", str(b), "--quiet").exit_code == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_seed_flag_changes_the_seed(scenario_file, tmp_path):
    path = scenario_file(SMALL)
    out = tmp_path / "s"
    assert _run("run", str(path), "--out", str(out), "--seed", "11", "--quiet").exit_code == 0
    assert "seed: 11" in (out / "scenario.yaml").read_text()


def test_help_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("run", "calibrate", "validate"):
        assert command in result.output


def test_a_missing_gpu_extra_is_one_line(monkeypatch, tmp_path):
    """calibrate/validate without torch installed: name the package and the extra, no traceback."""
    import djinnsim.calibrate.runner as runner

    def no_torch(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(runner, "run_calibration", no_torch)
    result = _run("calibrate", "--device", "cpu", "--model", "tiny-llama", "--out", str(tmp_path / "p.json"))
    _one_line_error(result, "torch is not installed", "djinnsim[gpu]")


def test_the_simulator_never_imports_torch():
    """sim/ sees costs only through the cost model: a whole run leaves torch unimported."""
    import subprocess
    import sys

    code = (
        "import sys, tempfile\n"
        "from djinnsim.sim.run import run_scenario_file\n"
        f"run_scenario_file({str(REPO / 'scenarios' / 'agents32.yaml')!r}, out=tempfile.mkdtemp(), quiet=True)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_run_tables_title_names_the_cost_model_once(scenario_file, tmp_path):
    result = _run("run", str(scenario_file(SMALL)), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    title = " ".join(result.output.split())  # rich wraps the title over lines
    assert "cost model:" in title and "cost model cost model" not in title and "HBM3 cost model)" not in title


def test_several_cost_models_are_named_short_in_the_table_and_whole_under_it(tmp_path):
    """exp21_decode runs a measured H100 and a transferred A100: each row is one line wide in 80
    columns, its cost model's kind in the column, every description once under the table."""
    from djinnsim.sim.report import print_summary
    from djinnsim.sim.run import simulate_scenario
    from djinnsim.sim.scenario import load_scenario
    from rich.console import Console

    result = simulate_scenario(load_scenario(REPO / "scenarios" / "exp21_decode.yaml"))
    console = Console(width=80, record=True, force_terminal=False)
    print_summary(result, console)
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(result.points), text  # no row wraps
    assert sum("measured" in r for r in rows) == sum("transfe" in r for r in rows) == len(rows) // 2
    described = " ".join(line for line in text.splitlines() if not line.startswith(("│", "┃", "┏", "┡", "└")))
    assert " ".join(described.split()).count("transferred cost model: meta-llama/Llama-2-7b-hf on NVIDIA A100") == 1
    assert " ".join(described.split()).count("measured cost model: meta-llama/Llama-2-7b-hf on NVIDIA H100") == 1


def test_an_error_after_the_run_started_leaves_stdout_empty_when_piped(scenario_file, tmp_path):
    """A fault met once the run is under way (a corrupt profile read for the first point): one line
    on stderr, exit 1, and nothing on a piped stdout (no progress bar's blank line)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 2, "metadata": ')
    done = subprocess.run([sys.executable, "-m", "djinnsim", "run", str(scenario_file(SMALL)), "--calibration", str(bad),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ") and "bad.json" in done.stderr
