"""The sweep's progress away from a terminal (a batch job's log): log lines with the rate and
time left, after the first tile, at most one per interval, and always one at the end."""

import logging

from xpression.inference.volume_sweep import _duration, _Progress


def test_progress_off_a_terminal_logs_lines_with_time_left(caplog):
    caplog.set_level(logging.INFO, logger="xpression.inference.volume_sweep")
    with _Progress(4, "mock_0 [dense]", enabled=True, every_s=0.0, terminal=False) as bar:
        for _ in range(4):
            bar.advance(1_000_000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("mock_0 [dense]: 1/4 tiles (25%), ") and " Mvox/s, " in lines[0] and lines[0].endswith(" left")
    assert lines[-1].startswith("mock_0 [dense]: 4/4 tiles (100%)") and lines[-1].endswith(", 0 s left")
    caplog.clear()
    with _Progress(50, "v", enabled=True, every_s=3600.0, terminal=False) as bar:
        for _ in range(50):
            bar.advance(10)
    assert [r.getMessage()[:18] for r in caplog.records] == ["v: 1/50 tiles (2%)", "v: 50/50 tiles (10"]  # first, last
    caplog.clear()
    with _Progress(3, "v", enabled=False, every_s=0.0, terminal=False) as bar:  # progress=false: silent
        bar.advance(10)
    assert not caplog.records


def test_durations_read_as_people_write_them():
    assert [_duration(s) for s in (0.4, 42, 65, 3599.6, 3720)] == ["0 s", "42 s", "1 min 05 s", "1 h 00 min", "1 h 02 min"]
