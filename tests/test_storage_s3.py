"""S3 and URI-level I/O (storage/s3_client.py, objects.py, allowed_roots.py) against a real
S3-compatible server (moto's standalone server, see s3_server.py) on loopback."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from maskfleet.storage import (
    InvalidFile,
    StorageUnavailable,
    check_uri,
    delete_object,
    get_s3_client,
    objects,
    parse_s3_uri,
    read_conditioning,
    read_conditioning_with_pooled,
    read_latent,
    read_mask,
    read_object,
    reset_s3_client,
    write_latent,
    write_object,
)
from local_xattrs import user_xattr_or_skip
from maskfleet.storage.allowed_roots import confine, open_confined
from maskfleet.storage.file_uris import read_bytes, write_atomic
from PIL import Image


@pytest.fixture
def s3(s3_server):
    """The server, with a fresh client before and after each test (env changes apply)."""
    reset_s3_client()
    yield s3_server
    reset_s3_client()


@pytest.fixture
def bucket(s3):
    return s3.make_bucket()


def latent(shape=(1, 4, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_sha256_stamped(s3, uri, returned):
    """The object's sha256 metadata equals the returned hash and the stored bytes' hash."""
    bucket, key = parse_s3_uri(uri, "output")
    head = s3.client.head_object(Bucket=bucket, Key=key)
    body = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert head["Metadata"] == {"sha256": returned}
    assert returned == hashlib.sha256(body).hexdigest()
    return body


def put(s3, uri, data):
    bucket, key = parse_s3_uri(uri, "test")
    s3.client.put_object(Bucket=bucket, Key=key, Body=data)


def count_calls(client, operation):
    calls = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda **kw: calls.append(kw))
    return calls


# --- the client -------------------------------------------------------------------------

def test_endpoint_comes_from_boto3s_own_environment(s3, monkeypatch):
    assert get_s3_client().meta.endpoint_url == s3.endpoint_url  # AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)  # the S3-specific one wins
    reset_s3_client()
    assert get_s3_client().meta.endpoint_url == s3.endpoint_url


def test_botocore_config_defaults_and_env(s3, monkeypatch):
    config = get_s3_client().meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (5, 60, 16)
    assert config.s3 == {"addressing_style": "auto"}
    for name, value in [("ADDRESSING_STYLE", "path"), ("MAX_ATTEMPTS", "2"),
                        ("CONNECT_TIMEOUT", "1.5"), ("READ_TIMEOUT", "7"), ("MAX_POOL", "3")]:
        monkeypatch.setenv(f"MASKFLEET_S3_{name}", value)
    reset_s3_client()
    config = get_s3_client().meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (1.5, 7, 3)
    assert config.s3 == {"addressing_style": "path"}


@pytest.mark.parametrize("name, value, words", [
    ("ADDRESSING_STYLE", "dns", "expected one of auto, path, virtual"),
    ("MAX_ATTEMPTS", "three", "expected a whole number"),
    ("READ_TIMEOUT", "0", "must be positive"),
])
def test_bad_client_settings_say_which_variable(s3, monkeypatch, name, value, words):
    monkeypatch.setenv(f"MASKFLEET_S3_{name}", value)
    with pytest.raises(ValueError, match=words) as info:
        get_s3_client()
    assert f"MASKFLEET_S3_{name}" in str(info.value)


def test_one_client_per_process(s3):
    client = get_s3_client()
    assert get_s3_client() is client
    reset_s3_client()
    assert get_s3_client() is not client


def test_forked_child_builds_its_own_client(s3, bucket):
    parent_client = get_s3_client()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            child_client = get_s3_client()
            ok = child_client is not parent_client and get_s3_client() is child_client
            child_client.head_bucket(Bucket=bucket)  # and it works
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_s3_client() is parent_client


def test_path_style_addressing(s3, bucket, monkeypatch):
    # A host name, like a MinIO endpoint's; the bucket must be in the path, not the host.
    endpoint = f"http://localhost:{s3.port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MASKFLEET_S3_ADDRESSING_STYLE", "path")
    reset_s3_client()
    urls = []
    get_s3_client().meta.events.register("before-send.s3", lambda request, **kw: urls.append(request.url))
    uri = f"s3://{bucket}/path-style/x.latent"
    x = latent()
    write_latent(uri, x)
    assert torch.equal(read_latent(uri), x)
    assert len(urls) == 2  # one PUT, one GET (the GET's headers give the size before its body is read)
    assert all(url.startswith(f"{endpoint}/{bucket}/path-style/") for url in urls), urls


def test_virtual_style_setting_reaches_botocore(s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://localhost:{s3.port}")
    monkeypatch.setenv("MASKFLEET_S3_ADDRESSING_STYLE", "virtual")
    reset_s3_client()

    class Stop(Exception):
        pass

    def stop(request, **kw):
        raise Stop(request.url)

    client = get_s3_client()
    client.meta.events.register("before-send.s3", stop)
    with pytest.raises(Stop) as info:
        client.head_object(Bucket=bucket, Key="k")
    assert str(info.value) == f"http://{bucket}.localhost:{s3.port}/k"


# --- URIs -------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, words", [
    ("s3://", "names no bucket"),
    ("s3:///key", "names no bucket"),
    ("s3://bucket", "names no object key"),
    ("s3://bucket/", "names no object key"),
    ("s3://bucket/dir/", "names a prefix"),
    ("s3://My_Bucket/key", "invalid bucket name 'My_Bucket'"),
    ("s3://ab/key", "invalid bucket name"),
    ("s3://a..b/key", "invalid bucket name"),
    ("s3://-ab/key", "invalid bucket name"),
    ("s3://192.168.0.1/key", "invalid bucket name"),
    ("s3://user@bucket/key", "invalid bucket name"),
    ("s3://bucket:9000/key", "invalid bucket name"),
    ("s3://bucket/" + "k" * 1025, "1024-byte"),
])
def test_bad_s3_uris(uri, words):
    with pytest.raises(InvalidFile) as info:
        check_uri(uri, "latent")
    assert words in info.value.reason and info.value.field == "latent"


def test_good_uris_parse_without_io(tmp_path):
    assert parse_s3_uri("S3://my.bucket-1/a/b%20c?d#e.latent", "x") == ("my.bucket-1", "a/b%20c?d#e.latent")
    check_uri("s3://bucket/x.latent", "latent")
    check_uri((tmp_path / "missing" / "x.latent").as_uri(), "latent")
    check_uri("relative/x.latent", "latent")
    with pytest.raises(InvalidFile, match="unsupported URI scheme 'http://'"):
        check_uri("http://example.com/x.latent", "latent")


def test_keys_are_taken_literally(s3, bucket):
    uri = f"s3://{bucket}/in/a b%20?c#d.latent"
    x = latent()
    write_latent(uri, x)
    assert s3.client.head_object(Bucket=bucket, Key="in/a b%20?c#d.latent")["ContentLength"] > 0
    assert torch.equal(read_latent(uri), x)


# --- every format through s3:// ---------------------------------------------------------

def test_latent_file_round_trip_is_what_comfyui_loads(s3, bucket):
    x = latent((2, 4, 8, 16))
    uri = f"s3://{bucket}/out/x.latent"
    digest = write_latent(uri, x)
    body = assert_sha256_stamped(s3, uri, digest)
    stored = safetensors.torch.load(body)
    # ComfyUI's LoadLatent: rescale by 1/0.18215 unless latent_format_version_0 is present.
    multiplier = 1.0 if "latent_format_version_0" in stored else 1.0 / 0.18215
    assert torch.equal(stored["latent_tensor"].float() * multiplier, x)
    assert torch.equal(read_latent(uri), x)


def test_safetensors_latent_round_trip(s3, bucket):
    x = latent()
    uri = f"s3://{bucket}/out/x.safetensors"
    digest = write_latent(uri, x, field="output")
    assert list(safetensors.torch.load(assert_sha256_stamped(s3, uri, digest))) == ["latent"]
    assert torch.equal(read_latent(uri), x)


def comfyui_save_latent_bytes(samples, marker=True):
    """What ComfyUI's SaveLatent writes: latent_tensor, the version marker, and the
    prompt/workflow JSON as safetensors metadata."""
    output = {"latent_tensor": samples.contiguous()}
    if marker:
        output["latent_format_version_0"] = torch.tensor([])
    metadata = {"prompt": json.dumps({"3": {"class_type": "KSampler"}}),
                "workflow": json.dumps({"nodes": []})}
    return safetensors.torch.save(output, metadata=metadata)


def test_comfyui_written_latent_fixture(s3, bucket):
    x = latent((1, 4, 16, 8), seed=1).half()
    put(s3, f"s3://{bucket}/in/ComfyUI_00001_.latent", comfyui_save_latent_bytes(x))
    put(s3, f"s3://{bucket}/in/old.latent", comfyui_save_latent_bytes(x, marker=False))
    assert torch.equal(read_latent(f"s3://{bucket}/in/ComfyUI_00001_.latent"), x.float())
    torch.testing.assert_close(read_latent(f"s3://{bucket}/in/old.latent"), x.float() / 0.18215)


def png_bytes(array, mode):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_masks_with_and_without_alpha(s3, bucket):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, 3] = 0
    gray = np.array([[0, 255], [51, 255]], dtype=np.uint8)
    put(s3, f"s3://{bucket}/m/alpha.png", png_bytes(rgba, "RGBA"))
    put(s3, f"s3://{bucket}/m/gray.png", png_bytes(gray, "L"))
    assert read_mask(f"s3://{bucket}/m/alpha.png").tolist() == [[[0.0, 1.0], [0.0, 0.0]]]
    torch.testing.assert_close(read_mask(f"s3://{bucket}/m/gray.png"),
                               torch.tensor([[[0.0, 1.0], [0.2, 1.0]]]))


def test_safetensors_mask(s3, bucket):
    values = torch.tensor([[[0.0, 0.25], [1.0, 0.5]]])
    put(s3, f"s3://{bucket}/m/mask.safetensors", safetensors.torch.save({"mask": values}))
    assert torch.equal(read_mask(f"s3://{bucket}/m/mask.safetensors", "mask"), values)


def test_conditioning_with_and_without_pooled(s3, bucket):
    embeds, pooled = torch.randn(2, 77, 32), torch.randn(2, 16)
    put(s3, f"s3://{bucket}/c/sdxl.safetensors",
        safetensors.torch.save({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}))
    put(s3, f"s3://{bucket}/c/sd15.safetensors", safetensors.torch.save({"cond": embeds[0]}))
    got, got_pooled = read_conditioning_with_pooled(f"s3://{bucket}/c/sdxl.safetensors", "positive")
    assert torch.equal(got, embeds) and torch.equal(got_pooled, pooled)
    assert torch.equal(read_conditioning(f"s3://{bucket}/c/sdxl.safetensors", "positive"), embeds)
    got, got_pooled = read_conditioning_with_pooled(f"s3://{bucket}/c/sd15.safetensors", "negative")
    assert torch.equal(got, embeds[:1]) and got_pooled is None


def test_write_object_stamps_sha256_and_content_type(s3, bucket):
    uri = f"s3://{bucket}/out/preview.png"
    digest = write_object(uri, b"\x89PNG fake", content_type="image/png")
    assert assert_sha256_stamped(s3, uri, digest) == b"\x89PNG fake"
    assert s3.client.head_object(Bucket=bucket, Key="out/preview.png")["ContentType"] == "image/png"


def test_large_output_goes_multipart_and_is_stamped(s3, bucket, monkeypatch):
    monkeypatch.setattr(objects, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(objects, "MULTIPART_CHUNKSIZE", 5 << 20)
    data = os.urandom((11 << 20) + 5)
    uri = f"s3://{bucket}/out/big.safetensors"
    digest = write_object(uri, data)
    assert assert_sha256_stamped(s3, uri, digest) == data
    assert s3.client.head_object(Bucket=bucket, Key="out/big.safetensors")["ETag"].endswith('-3"')


# --- rejections -------------------------------------------------------------------------

def test_oversize_object_is_refused_before_download(s3, bucket):
    uri = f"s3://{bucket}/in/x.latent"
    write_latent(uri, latent())
    bodies = []  # the GET's streaming body, as botocore hands it to us: how much of it we read
    get_s3_client().meta.events.register(
        "after-call.s3.GetObject", lambda parsed, **kw: bodies.append(parsed.get("Body")))
    with pytest.raises(InvalidFile) as info:
        read_latent(uri, max_bytes=100)
    assert info.value.field == "latent"
    assert "over the 100-byte input cap" in info.value.reason and uri in info.value.reason
    assert len(bodies) == 1 and bodies[0].tell() == 0  # refused on the headers: not a byte of the body read
    read_latent(uri)
    assert len(bodies) == 2 and bodies[1].tell() > 100  # the counter does see downloads


def test_missing_key_and_missing_bucket_name_the_field(s3, bucket):
    with pytest.raises(InvalidFile) as info:
        read_latent(f"s3://{bucket}/nope.latent", "latent")
    assert str(info.value) == f"latent: s3://{bucket}/nope.latent does not exist"
    with pytest.raises(InvalidFile) as info:
        read_mask("s3://mf-no-such-bucket/m.png", "mask")
    assert str(info.value) == "mask: s3://mf-no-such-bucket/m.png: bucket 'mf-no-such-bucket' does not exist"
    with pytest.raises(InvalidFile) as info:
        read_conditioning(f"s3://{bucket}/c.safetensors", "base_sampler.positive")
    assert info.value.field == "base_sampler.positive" and "does not exist" in info.value.reason


def test_pickle_suffix_is_refused_before_any_request(s3, bucket):
    calls = []
    get_s3_client().meta.events.register("before-call.s3", lambda **kw: calls.append(kw))
    with pytest.raises(InvalidFile, match=r"weights\.ckpt: \.ckpt files are pickles"):
        read_latent(f"s3://{bucket}/weights.ckpt")
    with pytest.raises(InvalidFile, match="pickles"):
        read_conditioning(f"s3://{bucket}/c.pt", "positive")
    assert calls == []


def test_unreachable_endpoint_is_storage_unavailable(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("MASKFLEET_S3_MAX_ATTEMPTS", "1")
    reset_s3_client()
    with pytest.raises(StorageUnavailable) as info:
        read_latent("s3://bucket/x.latent")
    assert info.value.field == "latent"
    assert "cannot read s3://bucket/x.latent" in info.value.reason
    assert isinstance(info.value, InvalidFile)


def test_write_to_missing_bucket_creates_nothing(s3):
    with pytest.raises(InvalidFile) as info:
        write_latent("s3://mf-missing-out/x.latent", latent())
    assert info.value.field == "output" and "bucket 'mf-missing-out' does not exist" in info.value.reason
    assert "mf-missing-out" not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


def test_failed_multipart_upload_is_aborted(s3, bucket, monkeypatch):
    monkeypatch.setattr(objects, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(objects, "MULTIPART_CHUNKSIZE", 5 << 20)

    class PartFailed(Exception):
        pass

    def fail_second_part(params, **kw):
        if params["PartNumber"] == 2:
            raise PartFailed()

    get_s3_client().meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    with pytest.raises(PartFailed):
        write_object(f"s3://{bucket}/out/big.latent", os.urandom(11 << 20))
    assert "Contents" not in s3.client.list_objects_v2(Bucket=bucket)
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_delete_object(s3, bucket, tmp_path):
    uri = f"s3://{bucket}/out/x.latent"
    write_latent(uri, latent())
    delete_object(uri)
    delete_object(uri)  # already gone: fine
    assert "Contents" not in s3.client.list_objects_v2(Bucket=bucket)
    path = tmp_path / "x.latent"
    write_latent(path.as_uri(), latent())
    delete_object(path.as_uri())
    delete_object(str(path))
    assert not path.exists()


# --- local files: sha256 xattr, failures, allowed roots ----------------------------------

def test_local_write_returns_sha256_and_sets_xattr(tmp_path):
    path = tmp_path / "out" / "x.safetensors"
    digest = write_latent(path.as_uri(), latent())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    stamped = user_xattr_or_skip(path)
    assert stamped == digest.encode()


def test_local_write_failures_leave_nothing(tmp_path):
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(InvalidFile, match="cannot write") as info:
        write_latent(str(tmp_path / "afile" / "x.latent"), latent(), field="output")
    assert info.value.field == "output"
    (tmp_path / "taken.latent").mkdir()  # the rename fails after the bytes were written
    with pytest.raises(InvalidFile, match="cannot write"):
        write_latent(str(tmp_path / "taken.latent"), latent())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken.latent"]
    assert list((tmp_path / "taken.latent").iterdir()) == []


@pytest.fixture
def roots(tmp_path, monkeypatch):
    inside, other, outside = tmp_path / "jobs", tmp_path / "scratch", tmp_path / "private"
    for d in (inside, other, outside):
        d.mkdir()
    monkeypatch.setenv("MASKFLEET_ALLOWED_ROOTS", f"{inside}:{other}")
    return inside, other, outside


def test_allowed_roots_permit_reads_and_writes_inside(roots):
    inside, other, _ = roots
    x = latent()
    write_latent((inside / "a" / "x.latent").as_uri(), x)
    write_latent(str(other / "y.safetensors"), x)
    os.symlink(inside / "a", other / "link")  # a symlink that stays inside the roots
    assert torch.equal(read_latent((other / "link" / "x.latent").as_uri()), x)
    assert torch.equal(read_latent(other / "y.safetensors"), x)


def test_allowed_roots_refuse_outside_and_symlink_escapes(roots):
    inside, _, outside = roots
    secret = outside / "secret.latent"
    secret.write_bytes(b"not for jobs")
    os.symlink(secret, inside / "innocent.latent")
    os.symlink(outside, inside / "door")
    for uri in (secret.as_uri(), str(inside / ".." / "private" / "secret.latent"),
                (inside / "innocent.latent").as_uri(), str(inside / "door" / "secret.latent")):
        with pytest.raises(InvalidFile, match="is outside the allowed roots") as info:
            read_object(uri, "latent")
        assert info.value.field == "latent"
    for uri in ((outside / "out.latent").as_uri(), str(inside / "door" / "out.latent")):
        with pytest.raises(InvalidFile, match="is outside the allowed roots") as info:
            write_latent(uri, latent())
        assert info.value.field == "output"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.latent"]


def test_a_symlink_swapped_in_after_the_check_is_not_followed(roots):
    """The window between confine()'s check and the open: whoever can write under a root
    replaces a checked directory (or the file itself) by a symlink to outside. The open
    walks from the root without following links, so it fails instead of escaping."""
    inside, _, outside = roots
    (outside / "x.latent").write_bytes(b"secret")
    (inside / "sub").mkdir()
    (inside / "sub" / "x.latent").write_bytes(b"inside")
    checked = confine(inside / "sub" / "x.latent", "latent")
    (inside / "sub" / "x.latent").unlink()
    (inside / "sub").rmdir()
    os.symlink(outside, inside / "sub")  # the directory swapped
    with pytest.raises(InvalidFile, match="'sub' is now a symlink") as info:
        read_bytes(checked, "latent", open_file=lambda: open_confined(checked, "latent"))
    assert info.value.field == "latent"

    (inside / "f.latent").write_bytes(b"inside")
    checked = confine(inside / "f.latent", "latent")
    (inside / "f.latent").unlink()
    os.symlink(outside / "x.latent", inside / "f.latent")  # the file itself swapped
    with pytest.raises(InvalidFile, match="'f.latent' is now a symlink"):
        read_bytes(checked, "latent", open_file=lambda: open_confined(checked, "latent"))

    target = confine(inside / "new" / "out.latent", "output", writing=True)
    os.symlink(outside, inside / "new")  # a directory the write would have created
    with pytest.raises(InvalidFile, match="'new' is now a symlink"):
        write_atomic(target, b"x", open_dir=lambda: open_confined(target.parent, "output", directory=True, create=True))
    assert sorted(p.name for p in outside.iterdir()) == ["x.latent"]


def test_confined_writes_create_missing_folders_and_reads_refuse_fifos(roots):
    inside, _, _ = roots
    write_object((inside / "a" / "b" / "out.bin").as_uri(), b"abc")
    assert read_object(str(inside / "a" / "b" / "out.bin"), "latent") == b"abc"
    os.mkfifo(inside / "pipe")
    with pytest.raises(InvalidFile, match="is not a regular file"):  # and does not hang waiting for a writer
        read_object(str(inside / "pipe"), "mask")
    delete_object(str(inside / "a" / "b" / "out.bin"))
    delete_object(str(inside / "no-such-folder" / "x.bin"))  # nothing to delete is fine
    assert not (inside / "a" / "b" / "out.bin").exists()


def test_symlink_at_output_name_is_replaced_not_followed(roots):
    inside, _, outside = roots
    victim = outside / "victim.latent"
    victim.write_bytes(b"keep me")
    os.symlink(victim, inside / "out.latent")
    write_latent(str(inside / "out.latent"), latent())
    assert victim.read_bytes() == b"keep me"
    assert not (inside / "out.latent").is_symlink()


def test_empty_allowed_roots_allow_no_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKFLEET_ALLOWED_ROOTS", "")
    with pytest.raises(InvalidFile, match="local files are not allowed"):
        read_object(str(tmp_path / "x"), "mask")
    monkeypatch.setenv("MASKFLEET_ALLOWED_ROOTS", "relative/dir")
    with pytest.raises(ValueError, match="not an absolute path"):
        read_object(str(tmp_path / "x"), "mask")


def test_without_allowed_roots_local_files_are_unrestricted(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKFLEET_ALLOWED_ROOTS", raising=False)
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert read_object(path.as_uri(), "latent") == b"abc"
