"""The benchmark shell scripts take their settings from the environment: --help prints the
header, any argument is refused, and neither starts a run (a `--help` used to start one)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["default_recipe", "levers", "lesion_placement", "run_benchmark"])
def test_help_prints_the_header_and_an_argument_is_refused(script, tmp_path):
    path = ROOT / "benchmarks" / f"{script}.sh"
    header = [line[2:] for line in path.read_text().splitlines()[1:4]]
    shown = subprocess.run(["bash", str(path), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.splitlines()[:3] == header
    refused = subprocess.run(["bash", str(path), "--seeds", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"error: {script}.sh takes no arguments (settings are environment variables; see --help)"
    assert list(tmp_path.iterdir()) == []  # no run folder started
