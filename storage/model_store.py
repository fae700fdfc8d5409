"""The model store: finding a diffusers model directory or a single-file checkpoint by the name a job gives.

Jobs name models ("sd15"), never paths, so a job cannot point a worker at an arbitrary
directory. This module maps a name to an entry of the models root and refuses names that
could be paths (separators, "..", hidden names). The root is the operator's: symlinks in
it, to model folders or to weight files (the Hugging Face cache links files into
`blobs/`), are the operator's and are followed wherever they lead, one rule for both.

A model is a diffusers directory or a single-file checkpoint ``NAME.safetensors`` (with
an optional sidecar ``NAME.json``; maskfleet/checkpoint_files.py reads it); pickle-format
checkpoints (``.ckpt``, ``.pt``...) are refused by name. The root is a local folder or an
``s3://bucket/prefix``. An S3 model (every object under ``prefix/name/``, or
``prefix/NAME.safetensors`` and its sidecar) is downloaded once into a local cache directory
($MASKFLEET_MODEL_CACHE, default ``~/.cache/maskfleet/models``) and used from there:

- atomic: objects go into a temporary directory beside the entry, are checked, a
  manifest is written last, and the directory is renamed into place;
- safe across processes on one host: an ``fcntl.flock`` on a per-model lock file, so a
  second process waits for the first's download and then uses its directory;
- verified: each file's size against the listing and, where the object's metadata has
  ``sha256``, its digest; an entry without a valid manifest (or whose files' sizes no
  longer match it) is discarded and fetched again;
- safe: object keys that would leave the model's directory are refused, and so is a
  model holding pickle-format weights (.bin, .pt, .ckpt, .pth, .pkl, .pickle); only
  safetensors weights and .json/.txt configs are fetched, anything else is skipped.

A cached model is not compared with the store again: to change a model, upload it under
a new name (or delete its cache entry).
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

from ..names import MODEL_NAME_PATTERN
from ..settings import load_settings, variable
from .errors import InvalidFile, StorageUnavailable
from .file_uris import resolve_path

MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
MODELS_ENV = variable("models")
MANIFEST_NAME = ".maskfleet-manifest.json"
FETCHED_SUFFIXES = (".safetensors", ".json", ".txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl", ".pickle")
CHECKPOINT_SUFFIX = ".safetensors"


def models_root_from(cli_value: str | None) -> str:
    """The models root as given (a local path, ``file://`` or ``s3://`` URI): ``cli_value``, else $MASKFLEET_MODELS.

    Kept a string: ``Path("s3://b/p")`` would fold the ``//``.
    """
    value = cli_value or load_settings().models
    if not value:
        raise InvalidFile("models", f"no model directory: pass --models DIR (or s3://bucket/prefix) or set {MODELS_ENV}")
    return value


def available_models(models_root: Path) -> list[str]:
    """Names of the directories and single-file checkpoints (``*.safetensors``) under ``models_root``."""
    try:
        entries = list(models_root.iterdir())
    except OSError:
        return []
    return sorted(p.name for p in entries if MODEL_NAME.fullmatch(p.name)
                  and (p.is_dir() or (p.suffix == CHECKPOINT_SUFFIX and p.is_file())))


def pickle_checkpoint(file_name: str, field: str) -> InvalidFile:
    """The refusal of a pickle-format checkpoint named as a model, in a local store or on S3."""
    return InvalidFile(field, f"{file_name} is a pickle-format checkpoint: it is never loaded (unpickling can run "
                              "code); convert it to safetensors")


def resolve_model(models_root: Path, name: str, field: str = "model") -> Path:
    """The model ``name`` names: a single-file checkpoint ``NAME`` or ``NAME.safetensors`` in the root
    (ComfyUI's models/checkpoints and models/unet), else a diffusers directory (resolve_model_dir).

    A pickle-format checkpoint (``.ckpt``, ``.pt``, ...) is refused with the reason: it is never loaded.
    """
    check_model_name(name, field)
    root = resolve_path(models_root, field)
    if root.is_dir():
        for candidate in (root / name, root / f"{name}{CHECKPOINT_SUFFIX}"):
            if candidate.suffix == CHECKPOINT_SUFFIX and candidate.is_file():
                return resolve_path(candidate, field)
        for candidate in [root / name] + [root / f"{name}{suffix}" for suffix in PICKLE_SUFFIXES]:
            if candidate.suffix.lower() in PICKLE_SUFFIXES and candidate.is_file():
                raise pickle_checkpoint(candidate.name, field)
    return resolve_model_dir(models_root, name, field)


def check_model_name(name: str, field: str = "model") -> None:
    """Raise InvalidFile unless ``name`` is a valid model name (see resolve_model_dir)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidFile(
            field, f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters, no '..'")


def resolve_model_dir(models_root: Path, name: str, field: str = "model") -> Path:
    """Return the resolved diffusers directory for model ``name`` under ``models_root``.

    The name must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without "..", so it names an
    entry of the root, never a path; an entry that is a symlink (the operator's) is
    followed wherever it leads, as links to weight files are. The directory must contain
    ``config.json`` (a pipeline or single model) or ``unet/config.json``.
    """
    check_model_name(name, field)
    root = resolve_path(models_root, field)
    if not root.is_dir():
        raise InvalidFile(field, f"model directory {models_root} does not exist")
    model_dir = resolve_path(root / name, field)
    if model_dir == root:
        raise InvalidFile(field, f"model {name!r} is a link to the model directory {root} itself")
    if not model_dir.is_dir():
        names = available_models(root)
        shown = ", ".join(names[:50]) + (", ..." if len(names) > 50 else "")
        raise InvalidFile(
            field, f"no model named {name!r} in {root}; available: {shown or '(none)'}")
    if not ((model_dir / "config.json").is_file() or (model_dir / "unet" / "config.json").is_file()):
        raise InvalidFile(
            field, f"{model_dir} is not a diffusers model directory "
            "(no config.json or unet/config.json)")
    return model_dir


def default_model_cache() -> Path:
    """$MASKFLEET_MODEL_CACHE, else ``~/.cache/maskfleet/models``."""
    value = load_settings().model_cache
    return Path(value).expanduser() if value else Path.home() / ".cache" / "maskfleet" / "models"


class ModelStore:
    """Model names to local diffusers directories, from a local root or an S3 prefix.

    ``root`` is a local folder (a path or ``file://`` URI) or ``s3://bucket[/prefix]``.
    ``cache_dir`` holds downloaded S3 models (default: see default_model_cache). The
    counter ``downloads`` is the number of objects this instance has downloaded.
    """

    def __init__(self, root: str | Path, cache_dir: Path | None = None):
        self.root = str(root)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_model_cache()
        self.downloads = 0
        self.is_s3 = self.root[:5].lower() == "s3://"
        if self.is_s3:
            from .s3_client import parse_s3_uri

            bucket, _, prefix = self.root[5:].partition("/")
            prefix = prefix.strip("/")
            parse_s3_uri(f"s3://{bucket}/{prefix or 'x'}", "models")  # checks the bucket name
            self.bucket, self.prefix = bucket, prefix
        else:
            from .file_uris import local_path

            self.local_root = local_path(self.root, "models")

    def __repr__(self) -> str:
        return f"ModelStore({self.root!r}, cache_dir={str(self.cache_dir)!r})"

    def local_model(self, name: str, field: str = "model") -> Path:
        """The local diffusers directory or single-file checkpoint of model ``name``.

        On S3, ``NAME.safetensors`` (named ``NAME`` or ``NAME.safetensors``; its sidecar
        ``NAME.json`` with it) is fetched into a cache entry of its own like a folder, and
        the path of the file in it is returned.
        """
        if not self.is_s3:
            return resolve_model(self.local_root, name, field)
        check_model_name(name, field)
        files = self._list_checkpoint(name, field)
        if files is None:
            return self.local_dir(name, field)
        return self._cached(name, field, files) / files[0]["rel"]

    def local_dir(self, name: str, field: str = "model") -> Path:
        """The local diffusers directory of model ``name``, fetched first if the root is S3."""
        if not self.is_s3:
            return resolve_model_dir(self.local_root, name, field)
        check_model_name(name, field)
        return self._cached(name, field, None)

    def _cached(self, name: str, field: str, files: list[dict] | None) -> Path:
        """The complete cache entry of ``name``, fetched (``files``, else the folder's listing) under the lock."""
        target = self.cache_path(name)
        if _complete(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path(name), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if _complete(target):  # another process fetched it while we waited
                return target
            for stale in target.parent.glob(f".{name}.tmp-*"):  # left by a killed process
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():  # incomplete or altered: discard it
                shutil.rmtree(target)
            self._fetch(name, field, target, files if files is not None else self._list(name, field))
        return target

    def _list_checkpoint(self, name: str, field: str) -> list[dict] | None:
        """The objects of single-file model ``name`` (the checkpoint first, then its sidecar), or None when
        the store holds no ``NAME.safetensors``; a pickle-format ``NAME.ckpt`` (...) is refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        suffix = Path(name).suffix.lower()
        stem = name[:-len(suffix)] if suffix in (CHECKPOINT_SUFFIX, *PICKLE_SUFFIXES) else name
        base = f"{self.prefix}/{stem}." if self.prefix else f"{stem}."
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            objects = {obj["Key"][len(base) - 1:]: obj for page in pages for obj in page.get("Contents", [])}
        except (BotoCoreError, ClientError) as exc:
            from .objects import s3_error

            raise s3_error(exc, self.uri(name), field, "list") from None
        if CHECKPOINT_SUFFIX not in objects or suffix in PICKLE_SUFFIXES:
            pickled = [found for found in PICKLE_SUFFIXES if found in objects and suffix in ("", found)]
            if pickled:
                raise pickle_checkpoint(stem + pickled[0], field)
            return None
        return [{"key": obj["Key"], "rel": stem + suffix, "size": obj["Size"], "etag": obj.get("ETag", "")}
                for suffix, obj in sorted(objects.items(), key=lambda item: item[0] != CHECKPOINT_SUFFIX)
                if suffix in (CHECKPOINT_SUFFIX, ".json")]

    def cache_path(self, name: str) -> Path:
        """Where model ``name`` is (or will be) cached: one folder per store and name."""
        client = self._client()
        source = f"{client.meta.endpoint_url}|{self.bucket}|{self.prefix}"
        tag = hashlib.sha256(source.encode()).hexdigest()[:12]
        return self.cache_dir.absolute() / f"{self.bucket}-{tag}" / name

    def lock_path(self, name: str) -> Path:
        """The per-model lock file that serialises fetches of ``name`` on this host."""
        return self.cache_path(name).with_name(f".{name}.lock")

    def uri(self, name: str = "") -> str:
        return "s3://" + "/".join(p for p in (self.bucket, self.prefix, name) if p) + "/"

    def _client(self):
        from .s3_client import get_s3_client

        return get_s3_client()

    def _model_prefix(self, name: str) -> str:
        return f"{self.prefix}/{name}/" if self.prefix else f"{name}/"

    def _list(self, name: str, field: str) -> list[dict]:
        """The objects of model ``name`` to fetch: ``{"key", "rel", "size", "etag"}``."""
        from botocore.exceptions import BotoCoreError, ClientError

        model_prefix = self._model_prefix(name)
        found: list[dict] = []
        pickles: list[str] = []
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=model_prefix)
            objects = [obj for page in pages for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as exc:
            from .objects import s3_error  # an outage is StorageUnavailable (retried), not bad input

            raise s3_error(exc, self.uri(name), field, "list") from None
        for obj in objects:
            key = obj["Key"]
            rel = key[len(model_prefix):]
            if rel == "" or (rel.endswith("/") and obj["Size"] == 0):
                continue  # a "folder" marker
            _check_relative_key(rel, key, field)
            suffix = PurePosixPath(rel).suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                pickles.append(rel)
            elif suffix in FETCHED_SUFFIXES:
                found.append({"key": key, "rel": rel, "size": obj["Size"], "etag": obj.get("ETag", "")})
        if pickles:
            shown = ", ".join(pickles[:5]) + (", ..." if len(pickles) > 5 else "")
            raise InvalidFile(
                field, f"model {name!r} in {self.uri()} holds pickle-format weights ({shown}); "
                "only safetensors weights are accepted: remove those objects from the store")
        if not objects:
            available = self._available()
            shown = ", ".join(available[:50]) + (", ..." if len(available) > 50 else "")
            raise InvalidFile(field, f"no model named {name!r} in {self.uri()}; available: {shown or '(none)'}")
        rels = {f["rel"] for f in found}
        if "config.json" not in rels and "unet/config.json" not in rels:
            raise InvalidFile(
                field, f"{self.uri(name)} is not a diffusers model directory "
                "(no config.json or unet/config.json)")
        return found

    def _available(self) -> list[str]:
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", Delimiter="/")
            names = [p["Prefix"].rstrip("/").rpartition("/")[2]
                     for page in pages for p in page.get("CommonPrefixes", [])]
        except Exception:  # only for the error message
            return []
        return sorted(n for n in names if MODEL_NAME.fullmatch(n) and ".." not in n)

    def _fetch(self, name: str, field: str, target: Path, files: list[dict]) -> None:
        """Download ``files`` of model ``name`` into ``target`` (which must not exist) whole or not at all."""
        needed = sum(f["size"] for f in files)
        free = shutil.disk_usage(target.parent).free
        if needed > free:
            raise InvalidFile(
                field, f"model {name!r} needs {needed} bytes but {target.parent} has {free} free")
        client = self._client()
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.tmp-"))
        try:
            manifest = {"source": self.uri(name), "endpoint": client.meta.endpoint_url,
                        "fetched_at": time.time(), "files": {}}
            for f in files:
                dest = tmp / f["rel"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                head = self._download(client, f["key"], dest, field)
                if f["etag"] and head.get("ETag") != f["etag"]:
                    raise StorageUnavailable(field, f"{self.uri(name)}{f['rel']} changed while it was being fetched")
                self.downloads += 1
                entry = {"size": f["size"], "etag": f["etag"]}
                size = dest.stat().st_size
                if size != f["size"]:
                    raise InvalidFile(
                        field, f"{self.uri(name)}{f['rel']}: downloaded {size} bytes, "
                        f"the listing says {f['size']}")
                expected = (head.get("Metadata") or {}).get("sha256")
                if expected:
                    digest = _sha256_file(dest)
                    if digest != expected.lower():
                        raise InvalidFile(
                            field, f"{self.uri(name)}{f['rel']}: sha256 {digest} does not match "
                            f"the object's metadata {expected}")
                    entry["sha256"] = digest
                _fsync(dest)
                manifest["files"][f["rel"]] = entry
            manifest_path = tmp / MANIFEST_NAME
            manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync(manifest_path)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _download(self, client, key: str, dest: Path, field: str) -> dict:
        """HEAD then download one object of a model; botocore failures classified as for job inputs."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
            client.download_file(self.bucket, key, str(dest))  # boto3's managed transfer
        except (BotoCoreError, ClientError) as exc:
            from .objects import s3_error

            raise s3_error(exc, f"s3://{self.bucket}/{key}", field, "read") from None
        return head


def _check_relative_key(rel: str, key: str, field: str) -> None:
    """Refuse an object key whose part under the model's prefix could leave its folder."""
    parts = rel.split("/")
    if (rel.startswith("/") or "\\" in rel or "\0" in rel
            or any(p in ("", ".", "..") for p in parts) or rel == MANIFEST_NAME):
        raise InvalidFile(field, f"object key {key!r} would escape the model's directory; refusing the model")


def _complete(target: Path) -> bool:
    """Whether ``target`` is a finished cache entry: a manifest, and its files at their sizes."""
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
        files = manifest["files"]
        return bool(files) and all((target / rel).stat().st_size == entry["size"] for rel, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
