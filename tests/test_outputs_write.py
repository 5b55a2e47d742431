"""Output folders are written atomically: an interrupted write leaves the previous file whole."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from boft_diffusion.core import files
from boft_diffusion.core.files import atomic_folder, atomic_write_text
from boft_diffusion.outputs.write import save_latest_validation


def test_latest_validation_grid_is_replaced_atomically(tmp_path, monkeypatch):
    grids = tmp_path / "validation"
    grids.mkdir()
    for step, colour in ((1, "red"), (2, "blue")):
        Image.new("RGB", (8, 8), colour).save(grids / f"step-{step:06d}.png")
    save_latest_validation(tmp_path)
    assert (grids / "latest.png").read_bytes() == (grids / "step-000002.png").read_bytes()

    Image.new("RGB", (8, 8), "green").save(grids / "step-000003.png")

    def killed_midway(source, target):
        Path(target).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_latest_validation(tmp_path)
    assert (grids / "latest.png").read_bytes() == (grids / "step-000002.png").read_bytes()
    assert sorted(p.name for p in grids.iterdir()) == ["latest.png", "step-000001.png", "step-000002.png",
                                                      "step-000003.png"]


def test_text_is_replaced_atomically(tmp_path, monkeypatch):
    card = atomic_write_text(tmp_path / "out" / "README.md", "# first ✓\n")
    assert card.read_text(encoding="utf-8") == "# first ✓\n"

    def killed_midway(self, text, **kwargs):
        Path.write_bytes(self, b"# sec")
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(card, "# second\n")
    assert card.read_text(encoding="utf-8") == "# first ✓\n"
    assert [p.name for p in card.parent.iterdir()] == ["README.md"]


def test_a_replaced_folder_is_deleted_only_after_the_new_one_has_its_name(tmp_path, monkeypatch):
    """A kill while the old folder is being deleted (seconds, for a model) leaves the new folder
    under the name, whole: never the old one half deleted and no folder at all."""
    model = tmp_path / "model"
    with atomic_folder(model) as staging:
        (staging / "weights").write_text("old")
    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if ".trash-" in Path(path).name:
            (Path(path) / "weights").unlink()
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(model) as staging:
            (staging / "weights").write_text("new")
    assert (model / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.trash-{os.getpid()}", "model"]
