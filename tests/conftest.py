"""Shared fixtures: synthetic cohorts generated once per test session, through the CLI users run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xpression.resolvers import register_resolvers

register_resolvers()  # as train.py and infer.py do, for the tests that compose conf/



def _generate(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    out = tmp_path_factory.mktemp(f"phantom_{preset}")
    proc = subprocess.run(
        [sys.executable, "-m", "xpression.phantom", "--out", str(out), "--preset", preset, "--quiet"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"phantom generation failed:\n{proc.stdout}\n{proc.stderr}")
    manifest = out / "cohort.yaml"
    assert manifest.is_file(), f"no cohort.yaml in {out}"
    return manifest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the ``cohort.yaml`` of the tiny phantom."""
    return _generate(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def default_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the ``cohort.yaml`` of the default phantom (what `make run` trains on)."""
    return _generate(tmp_path_factory, "default")


# Files whose tests train (or sweep) end to end, several runs each: `make test` runs them,
# `make test-fast` (-m "not slow") leaves them out. Single slow tests elsewhere carry the marker.
SLOW_FILES = {"test_train.py", "test_train_runs.py", "test_experiments.py", "test_resume.py", "test_notebooks.py",
              "test_paper_recipe.py", "test_phantom_realism.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
