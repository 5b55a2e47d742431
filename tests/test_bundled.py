"""The bundled example subjects are package data; a missing one gives a clear error."""

import pytest

from boft_diffusion.tiny import bundled, world


def test_example_subject_comes_from_package_data(tmp_path, monkeypatch):
    package = tmp_path / "site" / "boft_diffusion"
    monkeypatch.setattr(bundled, "PACKAGE_DIR", package)
    with pytest.raises(FileNotFoundError, match="sks_star.*--instance_data_dir") as error:
        bundled.example_subject_dir()
    assert str(package / "tiny" / "subjects" / "sks_star") in str(error.value)
    (package / "tiny" / "subjects" / "sks_star").mkdir(parents=True)
    assert bundled.example_subject_dir() == package / "tiny" / "subjects" / "sks_star"


@pytest.mark.parametrize("name", sorted(world.SUBJECTS))
def test_every_bundled_subject_exists_in_this_checkout(name):
    assert len(list(bundled.example_subject_dir(name).glob("*.png"))) == 5
