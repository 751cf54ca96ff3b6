"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the ``cohort.yaml`` of the tiny phantom, generated once per test session."""
    try:
        import xpression.phantom  # noqa: F401
    except ImportError as err:  # pragma: no cover - only while the phantom is missing
        pytest.skip(f"xpression.phantom not available ({err})")
    out = tmp_path_factory.mktemp("phantom_tiny")
    proc = subprocess.run(
        [sys.executable, "-m", "xpression.phantom", "--out", str(out), "--preset", "tiny"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"phantom generation failed:\n{proc.stdout}\n{proc.stderr}")
    manifest = out / "cohort.yaml"
    assert manifest.is_file(), f"no cohort.yaml in {out}"
    return manifest


@pytest.fixture(scope="session")
def default_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the ``cohort.yaml`` of the default phantom (what `make run` trains on), generated once."""
    out = tmp_path_factory.mktemp("phantom_default")
    proc = subprocess.run(
        [sys.executable, "-m", "xpression.phantom", "--out", str(out), "--preset", "default", "--quiet"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"phantom generation failed:\n{proc.stdout}\n{proc.stderr}")
    return out / "cohort.yaml"
