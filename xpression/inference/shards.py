"""Who computes which tile, and which tiles are finished (resumable, multi-process sweeps).

Every process appends the index of each tile it has finished (after its output chunk is
written) to its own log, ``done.rank<R>.log``, flushed and fsynced line by line. A restarted
sweep reads all logs and skips those tiles; a torn last line is ignored, so a tile cut off
mid-record is simply recomputed (same inputs, same numbers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["DoneLog", "dist_rank_world", "process_device", "shard", "wait_for"]


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from an initialised ``torch.distributed`` group, else from the
    ``RANK`` / ``WORLD_SIZE`` environment variables (torchrun, Lightning), else ``(0, 1)``."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except ImportError:  # pragma: no cover - torch always has distributed on supported builds
        pass
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def process_device(device: str | None) -> str | None:
    """This process's GPU when several run on one machine: ``cuda:LOCAL_RANK`` (torchrun sets
    ``LOCAL_RANK``; modulo the GPUs present) for ``device`` ``auto``/``cuda``/None; any other
    device, or no ``LOCAL_RANK``, is returned unchanged."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or device not in (None, "auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"


def shard(items: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share: every ``world``-th item starting at ``rank`` (disjoint, balanced)."""
    return list(items[rank::world])


class DoneLog:
    """Append-only record of finished tiles in ``folder`` for process ``rank``."""

    def __init__(self, folder: str | os.PathLike, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"done.rank{rank}.log"
        self._fh = None

    def done(self) -> set[int]:
        """Tiles recorded as finished by any process."""
        out: set[int] = set()
        for log in self.folder.glob("done.rank*.log"):
            text = log.read_text()
            lines = text.split("\n")
            for line in lines[:-1]:  # the last element is '' or a torn line
                if line.strip().isdigit():
                    out.add(int(line))
        return out

    def mark(self, index: int) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a")
        self._fh.write(f"{int(index)}\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def clear(self) -> None:
        self.close()
        for log in self.folder.glob("done.rank*.log"):
            log.unlink()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def missing(expected: Iterable[int], done: set[int]) -> list[int]:
    return [i for i in expected if i not in done]
