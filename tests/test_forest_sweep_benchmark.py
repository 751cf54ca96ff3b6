"""benchmarks/forest_sweep.py on a forest run of the tiny cohort: every step of its profile is
found (a step renamed or moved shows as 0 s) and `--threads` times the command alone."""

from __future__ import annotations

import re

import torch

from tests._scripts import load_benchmark
from tests.test_train import _cfg
from xpression.training import train


def test_every_profiled_step_is_found_and_threads_time_the_command(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(run, tiny_cohort, ["model=forest", "model.n_trees=10", "figures=false"]))
        script = load_benchmark("forest_sweep")
        assert script.main([str(run), "--volume-id", "mock_0", "--out", str(tmp_path / "maps")]) == 0
        out = capsys.readouterr().out
        assert script.main([str(run), "--volume-id", "mock_0", "--out", str(tmp_path / "maps2"), "--threads", "2"]) == 0
        threaded = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    points = int(re.search(r"mock_0, ([\d,]+) grid points", out).group(1).replace(",", ""))
    assert points > 1000
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    for label, _, _ in script.STEPS:  # a step the profile did not find prints "0 | - | -"
        assert rows[label][1].endswith("%") and int(rows[label][2].strip(" |").replace(",", "")) > 0, (label, out)
    assert "whole command (profiled)" in rows
    assert "2 thread(s)" in threaded and "| whole command |" in threaded and "Gaussian features" not in threaded
