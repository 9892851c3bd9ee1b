"""Golden summaries: every shipped scenario is simulated and its summary.json diffed against the
committed one in scenarios/golden/. After an intended change, regenerate them with
`DJINNSIM_UPDATE_GOLDEN=1 python3 -m pytest tests/test_golden.py` and review the diff in git."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from djinnsim.sim.run import run_scenario_file

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))
GOLDEN = REPO / "scenarios" / "golden"


def test_every_scenario_matches_its_golden_summary(tmp_path):
    assert SCENARIOS, "no scenarios shipped"
    update = os.environ.get("DJINNSIM_UPDATE_GOLDEN") == "1"
    diffs = []
    for path in SCENARIOS:
        out = run_scenario_file(path, out=tmp_path / path.stem, quiet=True)
        got = (out / "summary.json").read_text()
        golden = GOLDEN / f"{path.stem}.summary.json"
        if update:
            golden.write_text(got)
            continue
        want = golden.read_text() if golden.is_file() else ""
        if got != want:
            diffs.extend(
                difflib.unified_diff(
                    want.splitlines(), got.splitlines(), str(golden.relative_to(REPO)), "simulated now", lineterm=""
                )
            )
    assert not diffs, "summaries changed:\n" + "\n".join(diffs[:200])
