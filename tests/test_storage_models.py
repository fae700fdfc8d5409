"""Model names to directories (storage/model_store.py)."""

import os

import pytest

from maskfleet.storage import InvalidFile, models_root_from, resolve_model_dir


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    (root / "sd15").mkdir(parents=True)
    (root / "sd15" / "config.json").write_text("{}")
    (root / "sdxl" / "unet").mkdir(parents=True)
    (root / "sdxl" / "unet" / "config.json").write_text("{}")
    (root / "empty").mkdir()
    return root


def test_resolves_pipeline_and_unet_layouts(models):
    assert resolve_model_dir(models, "sd15") == (models / "sd15").resolve()
    assert resolve_model_dir(models, "sdxl") == (models / "sdxl").resolve()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "a..b", "", "x" * 129, "a\\b"])
def test_rejects_unsafe_names(models, name):
    with pytest.raises(InvalidFile, match="invalid model name") as info:
        resolve_model_dir(models, name, field="base_sampler.model")
    assert info.value.field == "base_sampler.model"


def test_rejects_symlink_escaping_root(models, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    os.symlink(outside, models / "evil")
    with pytest.raises(InvalidFile, match="outside the model directory"):
        resolve_model_dir(models, "evil")


def test_symlink_inside_root_is_fine(models):
    os.symlink(models / "sd15", models / "alias")
    assert resolve_model_dir(models, "alias") == (models / "sd15").resolve()


def test_missing_model_lists_available(models):
    with pytest.raises(InvalidFile) as info:
        resolve_model_dir(models, "sd3")
    assert "no model named 'sd3'" in info.value.reason
    assert "available: empty, sd15, sdxl" in info.value.reason


def test_directory_without_config_is_rejected(models):
    with pytest.raises(InvalidFile, match="not a diffusers model directory"):
        resolve_model_dir(models, "empty")


def test_missing_root(tmp_path):
    with pytest.raises(InvalidFile, match="does not exist"):
        resolve_model_dir(tmp_path / "none", "sd15")


def test_models_root_from_cli_then_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKFLEET_MODELS", str(tmp_path / "env"))
    assert models_root_from(str(tmp_path / "cli")) == str(tmp_path / "cli")
    assert models_root_from(None) == str(tmp_path / "env")
    assert models_root_from("s3://bucket/models") == "s3://bucket/models"
    monkeypatch.delenv("MASKFLEET_MODELS")
    with pytest.raises(InvalidFile) as info:
        models_root_from(None)
    assert info.value.field == "models" and "--models DIR" in info.value.reason
