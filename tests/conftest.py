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


# Single tests that took over 2 s each (``pytest -m "not slow" --durations=40``, quiet 2-core CPU),
# most of them sweeps or CLI runs in subprocesses; `make test-fast` stays under 2 minutes without them.
SLOW_TESTS = {
    "test_gpu_check.py::test_gpu_check_runs_every_stage_on_the_cpu",  # 43 s
    "test_forest_sweep_benchmark.py::test_every_profiled_step_is_found_and_threads_time_the_command",  # 13 s with its run
    "test_uncertainty.py::test_infer_with_ood_and_mc_dropout_scores_against_the_truth",  # 26 s
    "test_checkpoint_only.py::test_a_checkpoint_alone_sweeps_like_its_run_folder",  # 2 x 12 s
    "test_input_checks.py::test_every_shipped_config_passes_the_checks",  # 21 s
    "test_input_checks.py::test_cli_prints_the_cause_last_without_a_traceback",  # 17 s
    "test_inference_cli.py::test_cohort_sweep_end_to_end",  # 12 s
    "test_gene_maps.py::test_gene_maps_of_fitted_programs_end_to_end",  # 12 s
    "test_layers.py::test_import_has_no_side_effects",  # 4 fresh interpreters, 11 s
    "test_pretrain.py::test_reconstruction_loss_falls_on_a_fixed_batch",  # 2 x 3.5 s
    "test_attribution.py::test_command_on_a_run_of_the_tiny_cohort",  # 5 s with its run
    "test_attribution.py::test_command_on_a_multiscale_run",  # 6 s
    "test_multiscale_dense.py::test_a_dense_multiscale_ensemble_equals_its_patch_ensemble",  # 2 s
    "test_ensemble_spots.py::test_infer_scores_an_ensemble_on_the_spots_no_member_trained_on",  # 9 s with its cohort
    "test_mix_maps.py::test_a_mix_of_maps_with_themselves_scores_what_infer_recorded",  # 5 s with its cohort and sweeps
    "test_inference_store.py::test_two_processes_match_one",  # 3 s
    "test_phantom.py::test_deterministic",  # 3 s
    "test_pandas_strings.py::test_cohort_writes_and_reads_with_the_string_dtype",  # 2.4 s
    "test_resolvers.py::test_phantom_resolver_generates_once",  # 2.2 s
    "test_module.py::test_overfits_fixed_batches",  # 4.5 s of training steps
    "test_chrysalis.py::test_section_maps_and_depth_plot_use_the_compartment_colours",  # 1.9 s of figures
    "test_sweep.py::test_dense_equals_patch_for_dense_equivalent_net",  # 8.6 s (first spacing)
    "test_sweep.py::test_not_dense_equivalent_net_runs_with_overlap",  # 6.5 s
    "test_sweep.py::test_gpu_style_reading_gives_the_same_maps",  # 3.8 s
    "test_sweep.py::test_a_read_error_reaches_the_caller",  # 3.2 s
    "test_multiscale_dense.py::test_infer_sweeps_a_multiscale_run_densely_with_the_patch_answers",  # 7.6 s
    "test_multiscale_dense.py::test_dense_features_equal_the_per_patch_features",  # 6.1 + 5.6 s (first cases)
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)  # parametrised tests: the function's name
        if item.path.name in SLOW_FILES or f"{item.path.name}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
