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


def test_a_model_folder_linked_from_elsewhere_is_followed(models, tmp_path):
    """The operator's links are followed, to folders as to files: models kept on another disk."""
    elsewhere = tmp_path / "other-disk" / "sd15-v2"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    os.symlink(elsewhere, models / "linked")
    assert resolve_model_dir(models, "linked") == elsewhere.resolve()


def test_hugging_face_cache_layout_with_files_linked_into_blobs(models, tmp_path):
    """A snapshot folder whose files are links into blobs/, linked into the store as a model."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    (snapshot / "unet").mkdir(parents=True)
    (blobs / "1f2e").write_text("{}")
    os.symlink(blobs / "1f2e", snapshot / "unet" / "config.json")
    os.symlink(snapshot, models / "tiny-hf")
    resolved = resolve_model_dir(models, "tiny-hf")
    assert resolved == snapshot.resolve() and (resolved / "unet" / "config.json").read_text() == "{}"


def test_a_link_to_the_root_itself_is_no_model(models):
    os.symlink(models, models / "loop")
    with pytest.raises(InvalidFile, match="link to the model directory"):
        resolve_model_dir(models, "loop")


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
