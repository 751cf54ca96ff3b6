"""How `train.py` and `infer.py` end on bad input: the cause on one line, last, exit status 1.

Errors of the project's own types (a bad file, manifest, volume, config or run) say what is wrong
and where; their traceback only buries that. Any other exception keeps its traceback, and so does
every error with `HYDRA_FULL_ERROR=1` (Hydra's switch for full stack traces) or in a multirun,
whose launcher and sweeper handle failed jobs themselves.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["input_error", "log_into", "run_reporting_input_errors"]

log = logging.getLogger(__name__)


def _input_error_types() -> tuple[type[BaseException], ...]:
    from xpression.config import ConfigError
    from xpression.data.geometry import DataError
    from xpression.data.manifest import ManifestError
    from xpression.data.volume import VolumeError
    from xpression.inference.predictor import InferenceError
    from xpression.models.losses import LossKindError
    from xpression.models.masked import InitFromError
    from xpression.resume import ResumeError

    return (ConfigError, DataError, ManifestError, VolumeError, InferenceError, InitFromError, ResumeError, LossKindError)


def input_error(err: BaseException) -> BaseException | None:
    """``err`` or the exception it was raised from (``raise ... from``, as Hydra's
    ``instantiate`` wraps errors) when that is one of the project's input errors, else None."""
    kinds = _input_error_types()
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _to_log_files(message: str) -> None:
    """Record the failure in the run's log file (Hydra's `<task>.log`) without printing it twice."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def log_into(folder: str | os.PathLike, name: str) -> Path:
    """Also write the log (as Hydra's log file does) to ``<folder>/<name>``, unless a log file
    already goes into ``folder``; returns the log file's path."""
    folder = Path(folder).absolute()
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    for handler in files:
        if Path(handler.baseFilename).parent == folder:
            return Path(handler.baseFilename)
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / name)
    handler.setFormatter(files[0].formatter if files else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return folder / name


def run_reporting_input_errors(task: Callable[[Any], Any], cfg: Any, interrupted: str = "interrupted") -> Any:
    """Run ``task(cfg)``; on an input error print ``error: <cause>`` to stderr and exit with 1; on
    Ctrl-C print ``interrupted`` (what to do next, e.g. that a rerun continues) and exit with 130
    (128 + SIGINT, as a shell reports it)."""
    try:
        return task(cfg)
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
            raise
        _to_log_files(interrupted)
        sys.stdout.flush()
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as err:
        cause = input_error(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
            raise
        _to_log_files(str(cause))
        sys.stdout.flush()
        print(f"error: {cause}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
