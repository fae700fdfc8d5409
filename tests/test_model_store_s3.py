"""Models fetched from an S3 prefix into a local cache (storage/model_store.py's ModelStore).

Everything goes through a real S3-compatible server on loopback (the ``s3_server``
fixture in conftest.py) and boto3; the two-process test runs real processes.
"""

import fcntl
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from maskfleet.model_dirs import load_unet_denoiser
from maskfleet.storage import InvalidFile
from maskfleet.storage.model_store import MANIFEST_NAME, ModelStore

GOLDEN_UNET = Path(__file__).parent / "data" / "golden" / "tiny_unet"
TINY_FILES = sorted(p.name for p in GOLDEN_UNET.iterdir())


def put(client, bucket, key, data: bytes, sha256: str | None = "auto") -> None:
    metadata = {}
    if sha256 == "auto":
        metadata["sha256"] = hashlib.sha256(data).hexdigest()
    elif sha256 is not None:
        metadata["sha256"] = sha256
    client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)


def upload_tiny(client, bucket, prefix="models/tiny/", sha256="auto") -> None:
    for path in GOLDEN_UNET.iterdir():
        put(client, bucket, prefix + path.name, path.read_bytes(), sha256)


@pytest.fixture
def bucket(s3_server):
    name = s3_server.make_bucket()
    upload_tiny(s3_server.client, name)
    return name


@pytest.fixture
def store(bucket, tmp_path):
    return ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")


def test_fetches_verifies_and_loads_the_model(store):
    model_dir = store.local_dir("tiny", field="base_sampler.model")
    assert model_dir == store.cache_path("tiny")
    assert model_dir.is_relative_to(store.cache_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([*TINY_FILES, MANIFEST_NAME])
    for name in TINY_FILES:
        assert (model_dir / name).read_bytes() == (GOLDEN_UNET / name).read_bytes()
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert manifest["source"] == f"s3://{store.bucket}/models/tiny/"
    weights = (GOLDEN_UNET / "diffusion_pytorch_model.safetensors").read_bytes()
    assert manifest["files"]["diffusion_pytorch_model.safetensors"] == {
        "size": len(weights),
        "etag": manifest["files"]["diffusion_pytorch_model.safetensors"]["etag"],
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert store.downloads == len(TINY_FILES)
    assert not list(model_dir.parent.glob(".tiny.tmp-*"))

    denoiser = load_unet_denoiser(model_dir)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    out = denoiser.denoise(x, torch.tensor(2.0), context)
    reference = load_unet_denoiser(GOLDEN_UNET).denoise(x, torch.tensor(2.0), context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_second_call_uses_the_cache_without_the_store(store, s3_server, bucket, tmp_path):
    first = store.local_dir("tiny")
    for name in TINY_FILES:  # the store no longer has the model: the cache must not need it
        s3_server.client.delete_object(Bucket=bucket, Key=f"models/tiny/{name}")
    again = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    assert again.local_dir("tiny") == first
    assert again.downloads == 0


FETCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from maskfleet.storage.model_store import MANIFEST_NAME, ModelStore

    store = ModelStore(sys.argv[1], cache_dir=Path(sys.argv[2]))
    print("ready", flush=True)
    path = store.local_dir("tiny")
    manifest = (path / MANIFEST_NAME).stat()
    print(json.dumps({"path": str(path), "downloads": store.downloads,
                      "inode": manifest.st_ino, "mtime_ns": manifest.st_mtime_ns}), flush=True)
""")


def test_two_processes_fetch_once(bucket, tmp_path):
    """Both processes get the same complete directory; the objects are downloaded once.

    The test holds the model's lock while both processes start, so both are inside
    local_dir, waiting on the lock, when it is let go.
    """
    cache = tmp_path / "cache"
    store = ModelStore(f"s3://{bucket}/models", cache_dir=cache)
    lock_path = store.lock_path("tiny")
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, store.root, str(cache)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # both now block in flock
        assert not store.cache_path("tiny").exists()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["path"] == results[1]["path"] == str(store.cache_path("tiny"))
    assert sorted(r["downloads"] for r in results) == [0, len(TINY_FILES)]
    assert results[0]["inode"] == results[1]["inode"]
    assert results[0]["mtime_ns"] == results[1]["mtime_ns"]
    model_dir = Path(results[0]["path"])
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([*TINY_FILES, MANIFEST_NAME])
    assert not list(model_dir.parent.glob(".tiny.tmp-*"))
    load_unet_denoiser(model_dir)  # complete enough to load


def test_entry_without_manifest_is_refetched(store):
    model_dir = store.local_dir("tiny")
    (model_dir / MANIFEST_NAME).unlink()
    (model_dir / "stray.json").write_text("{}")  # the discarded entry's leftovers go too
    assert store.local_dir("tiny") == model_dir
    assert store.downloads == 2 * len(TINY_FILES)
    assert (model_dir / MANIFEST_NAME).is_file()
    assert not (model_dir / "stray.json").exists()


def test_truncated_file_is_refetched(store):
    model_dir = store.local_dir("tiny")
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    store.local_dir("tiny")
    assert weights.read_bytes() == (GOLDEN_UNET / weights.name).read_bytes()
    assert store.downloads == 2 * len(TINY_FILES)


def test_leftover_temporary_directory_is_cleaned(store):
    parent = store.cache_path("tiny").parent
    stale = parent / ".tiny.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    store.local_dir("tiny")
    assert not stale.exists()


def test_sha256_mismatch_is_refused_and_leaves_nothing(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    upload_tiny(s3_server.client, bucket, sha256="0" * 64)
    store = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidFile, match="sha256 .* does not match the object's metadata 0000") as info:
        store.local_dir("tiny", field="mask_sampler.model")
    assert info.value.field == "mask_sampler.model"
    assert not store.cache_path("tiny").exists()
    assert not list(store.cache_path("tiny").parent.glob(".tiny.tmp-*"))


def test_objects_without_sha256_are_checked_by_size(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    upload_tiny(s3_server.client, bucket, sha256=None)
    store = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    manifest = json.loads((store.local_dir("tiny") / MANIFEST_NAME).read_text())
    assert all("sha256" not in entry for entry in manifest["files"].values())
    assert manifest["files"]["config.json"]["size"] == (GOLDEN_UNET / "config.json").stat().st_size


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "tiny/../tiny"])
def test_model_name_traversal_is_rejected(store, name):
    with pytest.raises(InvalidFile, match="invalid model name") as info:
        store.local_dir(name, field="base_sampler.model")
    assert info.value.field == "base_sampler.model"
    assert store.downloads == 0


@pytest.mark.parametrize("bad_key", ["models/evil/../../outside.json", "models/evil/unet//x.json",
                                     "models/evil/./config.json", f"models/evil/{MANIFEST_NAME}"])
def test_object_keys_escaping_the_model_dir_are_refused(s3_server, tmp_path, bad_key):
    bucket = s3_server.make_bucket()
    upload_tiny(s3_server.client, bucket, prefix="models/evil/")
    put(s3_server.client, bucket, bad_key, b"{}")
    store = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidFile, match="would escape the model's directory"):
        store.local_dir("evil")
    assert store.downloads == 0
    assert not (tmp_path / "outside.json").exists() and not store.cache_path("evil").exists()


@pytest.mark.parametrize("weights", ["diffusion_pytorch_model.bin", "unet/model.ckpt", "x.pt", "x.pth", "x.PKL"])
def test_pickle_weights_are_refused(s3_server, tmp_path, weights):
    bucket = s3_server.make_bucket()
    upload_tiny(s3_server.client, bucket)
    put(s3_server.client, bucket, f"models/tiny/{weights}", b"\x80\x02pickle")
    store = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidFile, match=r"holds pickle-format weights \(" + weights.replace(".", r"\.")):
        store.local_dir("tiny")
    assert store.downloads == 0
    assert not store.cache_path("tiny").exists()


def test_only_safetensors_and_configs_are_fetched(s3_server, store, bucket):
    put(s3_server.client, bucket, "models/tiny/README.md", b"# tiny")
    put(s3_server.client, bucket, "models/tiny/tokenizer/vocab.json", b"{}")
    put(s3_server.client, bucket, "models/tiny/tokenizer/merges.txt", b"#version: 0.2\n")
    s3_server.client.put_object(Bucket=bucket, Key="models/tiny/unet/", Body=b"")  # a console's folder marker
    model_dir = store.local_dir("tiny")
    assert not (model_dir / "README.md").exists()
    assert (model_dir / "tokenizer" / "vocab.json").read_bytes() == b"{}"
    assert (model_dir / "tokenizer" / "merges.txt").is_file()
    assert store.downloads == len(TINY_FILES) + 2


def test_missing_model_lists_the_available_ones(s3_server, store, bucket):
    upload_tiny(s3_server.client, bucket, prefix="models/other/")
    with pytest.raises(InvalidFile, match=r"no model named 'sd3' in s3://.*/models/; available: other, tiny"):
        store.local_dir("sd3")


def test_prefix_without_a_diffusers_config_is_refused(s3_server, store, bucket):
    put(s3_server.client, bucket, "models/notes/readme.txt", b"hello")
    with pytest.raises(InvalidFile, match="not a diffusers model directory"):
        store.local_dir("notes")


def test_bucket_root_and_trailing_slash(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    upload_tiny(s3_server.client, bucket, prefix="tiny/")
    for root in (f"s3://{bucket}", f"s3://{bucket}/"):
        store = ModelStore(root, cache_dir=tmp_path / "cache")
        assert (store.local_dir("tiny") / "config.json").is_file()


def test_stores_with_different_prefixes_do_not_share_entries(s3_server, bucket, tmp_path):
    upload_tiny(s3_server.client, bucket, prefix="other/tiny/")
    a = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    b = ModelStore(f"s3://{bucket}/other", cache_dir=tmp_path / "cache")
    assert a.cache_path("tiny") != b.cache_path("tiny")


def test_invalid_bucket_is_refused(tmp_path):
    with pytest.raises(InvalidFile, match="invalid bucket name"):
        ModelStore("s3://Not_A_Bucket/models", cache_dir=tmp_path)


def test_local_root_resolves_like_resolve_model_dir(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    store = ModelStore(str(tmp_path / "models"))
    assert store.local_dir("tiny") == (tmp_path / "models" / "tiny").resolve()
    assert ModelStore((tmp_path / "models").as_uri()).local_dir("tiny") == (tmp_path / "models" / "tiny").resolve()
    with pytest.raises(InvalidFile, match="invalid model name"):
        store.local_dir("../models")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKFLEET_MODEL_CACHE", str(tmp_path / "env-cache"))
    assert ModelStore("s3://bucket/models").cache_dir == tmp_path / "env-cache"
    monkeypatch.delenv("MASKFLEET_MODEL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ModelStore("s3://bucket/models").cache_dir == tmp_path / "home" / ".cache" / "maskfleet" / "models"


def test_unreachable_store_is_storage_unavailable_not_bad_input(s3_server, tmp_path, monkeypatch):
    """An outage while listing a model is retried by the task (StorageUnavailable), not failed as bad input."""
    import socket

    from maskfleet.storage import StorageUnavailable, reset_s3_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("MASKFLEET_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("MASKFLEET_S3_CONNECT_TIMEOUT", "1")
    reset_s3_client()
    try:
        with pytest.raises(StorageUnavailable) as info:
            ModelStore("s3://models-bucket/models", tmp_path / "cache").local_dir("tiny", "base_sampler.model")
    finally:
        monkeypatch.undo()
        reset_s3_client()
    assert str(info.value).startswith("base_sampler.model: ")
    assert not any((tmp_path / "cache").glob("tiny*"))


def test_a_single_file_checkpoint_is_fetched_with_its_sidecar(s3_server, tmp_path):
    """NAME.safetensors on the store (named NAME or NAME.safetensors), its sidecar beside it: one cache
    entry, the file's path returned, the same weights as the folder's."""
    from ldm_checkpoints import write_checkpoint

    bucket = s3_server.make_bucket()
    path = write_checkpoint(GOLDEN_UNET, tmp_path / "tiny-file.safetensors", sidecar={"prediction": "epsilon"})
    put(s3_server.client, bucket, "models/tiny-file.safetensors", path.read_bytes())
    put(s3_server.client, bucket, "models/tiny-file.json", path.with_suffix(".json").read_bytes())
    put(s3_server.client, bucket, "models/old.ckpt", b"\x80\x04pickle")
    store = ModelStore(f"s3://{bucket}/models", cache_dir=tmp_path / "cache")
    local = store.local_model("tiny-file", "base_sampler.model")
    assert local.name == "tiny-file.safetensors" and local.read_bytes() == path.read_bytes()
    assert local.with_suffix(".json").read_text() == path.with_suffix(".json").read_text()
    assert store.local_model("tiny-file.safetensors").read_bytes() == path.read_bytes()
    downloads = store.downloads
    assert store.local_model("tiny-file") == local and store.downloads == downloads  # cached
    ours, folder = load_unet_denoiser(local).unet.state_dict(), load_unet_denoiser(GOLDEN_UNET).unet.state_dict()
    assert all(torch.equal(ours[k], folder[k]) for k in folder)
    for name in ("old", "old.ckpt"):
        with pytest.raises(InvalidFile, match="old.ckpt is a pickle-format checkpoint"):
            store.local_model(name, "mask_sampler.model")
