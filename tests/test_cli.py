"""The entry points' last line: an input error or Ctrl-C ends in one line, not a traceback."""

import pytest

from xpression.cli import run_reporting_input_errors
from xpression.config import ConfigError


def test_ctrl_c_is_one_line_saying_what_next_with_status_130(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def task(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_reporting_input_errors(task, {}, interrupted="interrupted: the same command continues the sweep")
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted: the same command continues the sweep"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra's switch for the full story still gives it
    with pytest.raises(KeyboardInterrupt):
        run_reporting_input_errors(task, {})


def test_an_input_error_is_one_line_with_status_1_and_other_errors_stay_tracebacks(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def bad_input(cfg):
        raise ConfigError(["data.batch_size: must be a positive integer, got 0"], "training config")

    with pytest.raises(SystemExit) as stop:
        run_reporting_input_errors(bad_input, {})
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: invalid training config")

    def bug(cfg):
        raise ZeroDivisionError("a defect, not an input")

    with pytest.raises(ZeroDivisionError):
        run_reporting_input_errors(bug, {})


def test_an_uncertainty_setting_without_its_method_is_refused():
    """calibrate=true or members=[...] without uncertainty= did nothing, silently."""
    from xpression.config import check_infer_config, compose

    with pytest.raises(ConfigError) as err:
        check_infer_config(compose("infer", ["run=somewhere", "calibrate=true", "members=[a,b]"]))
    assert err.value.problems == [
        "calibrate=true scales the <target>_sd channels, which only an uncertainty method adds: add "
        "uncertainty=ensemble, mc_dropout or trees",
        "members: an ensemble's runs, but uncertainty=none: add uncertainty=ensemble"]
    check_infer_config(compose("infer", ["run=somewhere", "calibrate=true", "uncertainty=trees"]))
    check_infer_config(compose("infer", ["calibrate=true", "uncertainty=ensemble", "members=[a,b]"]))


def test_ctrl_c_in_the_tools_is_one_line_with_status_130(tmp_path, capsys, monkeypatch):
    """convert, attribute and mix ended Ctrl-C with a traceback."""
    import argparse

    import xpression.data.convert as convert
    import xpression.evaluation.attribute as attribute
    import xpression.evaluation.mix as mix

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_to_omezarr", stop)
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(tmp_path / "a.tif"), str(tmp_path / "o.ome.zarr"), "--voxel-size-um", "1"])
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == (
        "interrupted: the same command continues the conversion (the slabs written are kept)")
    monkeypatch.setattr(attribute, "run", stop)
    monkeypatch.setattr(attribute.argparse.ArgumentParser, "parse_args",
                        lambda self, argv=None: argparse.Namespace(out=None))
    assert attribute.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before anything was written; run the command again"
    monkeypatch.setattr(mix, "mix_and_score", stop)
    monkeypatch.setattr(mix.argparse.ArgumentParser, "parse_args",
                        lambda self, argv=None: argparse.Namespace(output="OUT", sources=[], weights=None, overwrite=False,
                                                                   cohort=None, figures=True))
    assert mix.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: OUT holds a partial mix; run the command again with --overwrite"
