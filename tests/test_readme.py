"""The README's examples run as written: every YAML block is simulated, every `djinnsim ...`
command with concrete arguments is run (a slow one with the reduced override REDUCED names), and
every command that holds a placeholder (SCENARIO, PATH, [--option]) or needs a GPU names only
options its command has. The set-up section has exactly two commands and `.ci/run` runs the
second, the test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from djinnsim.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
runner = CliRunner()

# Commands too slow to run whole in the tests, with the override that makes them small (the same
# command, fewer points or runs); anything else is run exactly as the README writes it.
REDUCED = {
    "djinnsim run scenarios/agents32.yaml --set 'workload.agents=[1,1024]' --set gpu=h200":
        ["--set", "workload.agents=[1,64]"],
    "djinnsim search scenarios/exp21_decode.yaml --break-even-ms 30":
        ["--set", "workload.runs=3", "--set", "workload.warmup_runs=1", "--set", "workload.new_tokens=8"],
    "djinnsim run scenarios/agents32_batching.yaml": ["--agents", "1,8"],
}
# A YAML block is a scenario when it has a name; else a fragment laid over BASE. Either is run at
# these N (the full sweep of the README's scenario block takes a minute on two cores).
BASE = REPO / "scenarios" / "agents32.yaml"
BLOCK_AGENTS = "1,2"
# Commands that run for minutes on real hardware: their options are checked, and the path they
# stand for is tested elsewhere (tests/test_calibrate_cli.py, tests/test_validate_e2e.py).
MEASURES = ("calibrate", "validate")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|^\[|^\.\.\.$|\||^/$")  # SCENARIO, PROFILE.json, [--x], a|b, a / b
SUBCOMMANDS = {"run", "search", "calibrate", "validate"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _commands() -> list[str]:
    """Every `djinnsim ...` in a bash block (comments dropped, after `&&`) or inline in the text."""
    found = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("djinnsim "):
                    found.append(part.strip())
    text = README.replace("\n", " ")
    found += [c.strip() for c in re.findall(r"`(djinnsim [^`]+)`", text)]
    return list(dict.fromkeys(found))


def _concrete(command: str) -> bool:
    """Runnable as written: no placeholder, no GPU or real measurement, and more than a command's
    name mentioned in the text (`djinnsim search` alone)."""
    words = shlex.split(command)
    mention = len(words) == 2 and words[1] in SUBCOMMANDS
    placeholder = any(PLACEHOLDER.search(w) or (w.endswith("]") and "=" not in w) for w in words[2:])
    return not mention and words[1] not in MEASURES and not placeholder


RUNNABLE = [c for c in _commands() if _concrete(c)]
CHECKED = [c for c in _commands() if not _concrete(c)]


def test_the_readme_has_examples_of_each_kind():
    assert len(_blocks("yaml")) >= 2
    assert "djinnsim run scenarios/agents32.yaml" in RUNNABLE
    assert any(c.startswith("djinnsim search") for c in RUNNABLE)
    assert any(c.startswith("djinnsim calibrate") for c in CHECKED)
    assert set(REDUCED) <= set(RUNNABLE), set(REDUCED) - set(RUNNABLE)


@pytest.mark.parametrize("block", _blocks("yaml"), ids=lambda b: b.split("\n")[0][:40])
def test_every_yaml_block_runs(block, tmp_path):
    raw = yaml.safe_load(block)
    if "name" not in raw:  # a fragment (e.g. a custom backend): laid over the shipped agents32
        raw = {**yaml.safe_load(BASE.read_text()), **raw}
    path = tmp_path / "block.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(path), "--quiet", "--agents", BLOCK_AGENTS, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("command", RUNNABLE)
def test_every_concrete_command_runs(command, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    words = shlex.split(command)[1:] + REDUCED.get(command, [])
    if words[0] in ("run", "search") and "--out" not in words:
        words += ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, f"{command}: {result.output}"


def _options_of(subcommand: str) -> set[str]:
    # rich sizes the help from COLUMNS, not click's terminal_width: a long option name is cut at 80
    text = runner.invoke(app, [subcommand, "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


@pytest.mark.parametrize("command", CHECKED)
def test_commands_with_placeholders_name_real_options(command):
    words = shlex.split(command)
    assert words[1] in SUBCOMMANDS, command
    named = {w.strip("[]").split("=")[0] for w in words[2:] if w.strip("[]").startswith("--")}
    assert named <= _options_of(words[1]), named - _options_of(words[1])


def test_set_up_has_two_commands_and_ci_runs_the_test_command():
    commands = [line for block in re.findall(r"```bash\n(.*?)```", _section("Set up"), flags=re.S)
                for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("djinnsim run scenarios/agents32.yaml")
    # a CPU build of torch from its own index: the test command works on a machine with no GPU and
    # no local wheel cache
    assert "--extra-index-url https://download.pytorch.org/whl/cpu torch==" in tests
    assert tests.endswith("python3 -m pytest -q")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci, "the README's test command is not the one .ci/run runs"


def test_the_seed_is_defined_where_it_first_appears():
    first = README.index("the seed")
    assert "evaluation plan" in README[max(first - 200, 0):first + 40]
