"""xpression.plotting.save_figure: written where asked, one clear error where a file is in the way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xpression.plotting import file_in_the_way, new_figure, save_figure


def _figure():
    fig, ax = new_figure(figsize=(2.0, 1.5))
    ax.plot([0, 1], [0, 1])
    return fig


def test_save_figure_creates_the_parent_folders_and_writes_the_png(tmp_path):
    out = tmp_path / "a" / "b" / "fig.png"
    assert save_figure(_figure(), out, dpi=50) == out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (100, 75)  # 2.0 x 1.5 inches at 50 dpi
        assert np.asarray(im).std() > 0  # something drawn


@pytest.mark.parametrize("parent", ["taken", "taken/deeper"])
def test_a_file_where_the_folder_should_be_is_one_clear_error(tmp_path, parent):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / parent / "s0_overlay.png"
    assert file_in_the_way(out.parent) == tmp_path / "taken"
    with pytest.raises(NotADirectoryError) as err:
        save_figure(_figure(), out)
    assert str(err.value) == f"cannot write {out}: {tmp_path / 'taken'} is a file, not a folder"
    assert (tmp_path / "taken").read_text() == "a file"  # untouched


def test_a_folder_at_the_output_path_is_one_clear_error(tmp_path):
    (tmp_path / "fig.png").mkdir()
    with pytest.raises(IsADirectoryError, match=r"^cannot write .*fig\.png: it is a folder$"):
        save_figure(_figure(), tmp_path / "fig.png")


def test_file_in_the_way_is_none_for_folders_and_paths_yet_to_be_made(tmp_path):
    assert file_in_the_way(tmp_path) is None
    assert file_in_the_way(tmp_path / "new" / "deeper") is None
    (tmp_path / "f").write_text("")
    assert file_in_the_way(tmp_path / "f") == tmp_path / "f"
