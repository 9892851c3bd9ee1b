"""The tracked tree travels to the lent GPU machine, which takes at most 64 MiB of it (with the
carried wheels beside it): committed reports must leave room."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 56 * 2**20  # 64 MiB less room for the carried wheels (.whl, under 3 MB) and growth


def test_tracked_tree_fits_what_the_gpu_machine_takes():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [REPO / p for p in listed.decode().split("\0") if p]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    biggest = sorted(((p.stat().st_size, p) for p in paths if p.is_file()), reverse=True)[:3]
    assert total <= LIMIT_BYTES, (f"tracked files hold {total / 2**20:.1f} MiB, over {LIMIT_BYTES / 2**20:.0f} MiB; "
                                  f"largest: {[str(p.relative_to(REPO)) for _, p in biggest]}")
