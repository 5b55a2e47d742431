"""The bundled example subject resolves from package data first, the checkout second, else a clear error."""

import pytest

from boft_diffusion.models import bundled


def test_example_subject_is_found_in_package_data_then_checkout(tmp_path, monkeypatch):
    package, checkout = tmp_path / "site" / "boft_diffusion", tmp_path / "checkout"
    monkeypatch.setattr(bundled, "PACKAGE_DIR", package)
    monkeypatch.setattr(bundled, "CHECKOUT_DIR", checkout)
    with pytest.raises(FileNotFoundError, match="sks_star.*--instance_data_dir") as error:
        bundled.example_subject_dir()
    assert str(package / "tiny" / "subjects" / "sks_star") in str(error.value)
    (checkout / "examples" / "sks_star").mkdir(parents=True)
    assert bundled.example_subject_dir() == checkout / "examples" / "sks_star"
    (package / "tiny" / "subjects" / "sks_star").mkdir(parents=True)
    assert bundled.example_subject_dir() == package / "tiny" / "subjects" / "sks_star"


def test_the_default_subject_exists_in_this_checkout():
    assert any(bundled.example_subject_dir().glob("*.png"))
