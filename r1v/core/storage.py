"""Run roots in an object store (`s3://bucket/prefix`, any S3-compatible endpoint) beside plain paths.

Everything goes through pyarrow's filesystem layer (what Ray Train's `storage_filesystem` takes). The endpoint,
region and credentials come from the usual environment variables (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
`AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the
AWS config files) and are never part of a URI, so nothing r1v writes or logs can carry them.

Atomicity: one object is written by one PUT (or one multipart upload, which the store shows only once complete),
so a reader sees an object whole or not at all; a directory is uploaded with a manifest (`MANIFEST`: each file's
sha256 and size) written last, and readers check every file against it, so a half-replaced directory or a
corrupted object is refused by name instead of loaded.

`stage_local(uri)` gives a node-local copy of an uploaded file or directory: downloaded once per node into the
cache (`$R1V_CACHE`, default `~/.cache/r1v`) under a file lock, so concurrent workers on one node download once,
and keyed by the manifest's digest, so a stage re-run under a new config is staged afresh. Plain paths pass
through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

from r1v.core.fs import file_lock, owner_tag

MANIFEST = ".r1v-manifest.json"
KEEP = ".r1v-keep"
"""An empty object standing for an empty directory (a store has only objects), listed in the manifest."""
SCHEMES = ("s3",)
CHUNK = 8 * 2**20
_STAGED = re.compile(r"/store/(?P<digest>[0-9a-f]{16})/(?P<scheme>s3)/(?P<rest>.+)$")


class ChecksumError(OSError):
    """A stored object does not match the manifest written when it was uploaded."""


def is_uri(s: str | os.PathLike | None) -> bool:
    """Whether `s` names an object store location (`s3://...`) rather than a path."""
    return isinstance(s, str) and s.split("://", 1)[0] in SCHEMES and "://" in s


def _split(uri: str) -> tuple[str, str]:
    u = urllib.parse.urlparse(uri)
    if u.scheme not in SCHEMES or not u.netloc:
        raise ValueError(f"not an object store URI: {uri!r} (expected s3://bucket/prefix)")
    return u.scheme, f"{u.netloc}/{u.path.strip('/')}".rstrip("/")


def endpoint() -> str | None:
    """The S3 endpoint from the environment (the AWS SDKs' variables), None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@cache
def _s3(endpoint_url: str | None, region: str) -> Any:
    import pyarrow.fs as pafs

    kw: dict[str, Any] = {"region": region}
    if endpoint_url:
        u = urllib.parse.urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kw.update(scheme=u.scheme, endpoint_override=u.netloc)
        # a non-AWS endpoint (MinIO, Ceph, a test server) names buckets in the path, not the host
        kw["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kw)


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for `uri`; credentials are read by pyarrow from the environment."""
    _, path = _split(uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3(endpoint(), region), path


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a URI or a path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def _info(uri: str) -> Any:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str | os.PathLike) -> bool:
    if not is_uri(uri):
        return Path(uri).exists()
    import pyarrow.fs as pafs

    return _info(str(uri)).type != pafs.FileType.NotFound


def put_bytes(uri: str, data: bytes) -> None:
    """Write one object in one request: readers see the old object or the new one, never a part."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def put_json(uri: str, data: Any) -> None:
    put_bytes(uri, (json.dumps(data, indent=2, default=str) + "\n").encode())


def get_bytes(uri: str) -> bytes | None:
    """The object's bytes, None when there is none."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_json(uri: str, default: Any = None) -> Any:
    data = get_bytes(uri)
    return default if data is None else json.loads(data)


def list_files(uri: str) -> dict[str, int]:
    """{path relative to `uri`: size} of every object under the prefix `uri`."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return {}
    return {i.path[len(path) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def delete(uri: str) -> None:
    """Remove one object (nothing when there is none)."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_dirs(uri: str) -> list[str]:
    """The names of the "directories" (common prefixes) right under `uri`."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def move_dir(src: str, dst: str) -> None:
    """Copy every object of `src` under `dst`, manifest last, then delete `src` (a store has no rename)."""
    fs, spath = filesystem(src)
    _, dpath = filesystem(dst)
    files = sorted(list_files(src), key=lambda r: r == MANIFEST)
    for rel in files:
        fs.copy_file(f"{spath}/{rel}", f"{dpath}/{rel}")
    delete_dir(src)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def upload_file(local: str | os.PathLike, uri: str) -> None:
    """One file to one object, streamed (a multipart upload is visible only once complete)."""
    fs, path = filesystem(uri)
    with open(local, "rb") as src, fs.open_output_stream(path) as f:
        while chunk := src.read(CHUNK):
            f.write(chunk)


def _excluded(rel: str, exclude: set[str] | frozenset[str]) -> bool:
    """`rel` is one of `exclude` or lies under one of them."""
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude)


def _local_files(local: Path, exclude: set[str] | frozenset[str]) -> list[str]:
    # temporaries of atomic writers (`.NAME.<owner>...tmp`, `.NAME.tmp-...`) are someone's unfinished work
    out = []
    for p in local.rglob("*"):
        rel = p.relative_to(local).as_posix()
        if _excluded(rel, exclude) or ".tmp-" in rel or p.name.endswith(".tmp") or p.is_symlink():
            continue
        if p.is_file() and p.name != MANIFEST:
            out.append(rel)
        elif p.is_dir() and not any(p.iterdir()):
            out.append(f"{rel}/{KEEP}")
    return sorted(out)


def upload_dir(local: str | os.PathLike, uri: str, skip: dict[str, dict[str, Any]] | None = None,
               exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Upload the files under `local` (but the relative paths in `exclude`) to `uri`, then the manifest of all
    of them (sha256, size), last: a reader that finds the manifest finds every file it lists. `skip`: a previous
    manifest; its files whose checksum is unchanged and whose object exists are not sent again. Returns the
    manifest's entries."""
    local = Path(local)
    remote = list_files(uri) if skip else {}
    entries: dict[str, dict[str, Any]] = {}
    for rel in _local_files(local, exclude):
        p = local / rel
        if p.name == KEEP and not p.exists():  # an empty directory
            entries[rel] = {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}
            if rel not in remote:
                put_bytes(join(uri, rel), b"")
            continue
        entries[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        if skip and skip.get(rel) == entries[rel] and remote.get(rel) == entries[rel]["size"]:
            continue
        upload_file(p, join(uri, rel))
    put_json(join(uri, MANIFEST), {"version": 1, "files": entries})
    return entries


def read_manifest(uri: str) -> dict[str, dict[str, Any]] | None:
    """The entries of the manifest at `uri` (a directory uploaded by `upload_dir`), None when there is none."""
    m = read_json(join(uri, MANIFEST))
    return None if m is None else m["files"]


def _fetch(uri: str, dest: Path, want: dict[str, Any] | None) -> None:
    """Download `uri` to `dest` through a temporary sibling; with `want`, refuse it unless it matches."""
    fs, path = filesystem(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.name == KEEP:  # stands for the empty directory just made
        return
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{owner_tag()}", suffix=".tmp")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if want is not None and h.hexdigest() != want["sha256"]:
            raise ChecksumError(f"{uri}: sha256 {h.hexdigest()[:16]}... does not match its manifest "
                                f"({want['sha256'][:16]}...): the object is corrupt or was replaced; it was not used")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(uri: str, local: str | os.PathLike) -> Path:
    """One object to `local` (replaced whole)."""
    _fetch(uri, Path(local), None)
    return Path(local)


def download_dir(uri: str, local: str | os.PathLike, exclude: set[str] | frozenset[str] = frozenset()
                 ) -> list[str]:
    """Download everything under `uri` (but `exclude`) into `local`, each file checked against `uri`'s manifest
    when it has one (files it does not list, written after it, are taken as they are). Returns the paths."""
    local = Path(local)
    manifest = read_manifest(uri) or {}
    files = [r for r in list_files(uri) if r != MANIFEST and not _excluded(r, exclude)]
    for rel in files:
        _fetch(join(uri, rel), local / rel, manifest.get(rel))
    return files


def cache_root() -> Path:
    """This node's cache: `$R1V_CACHE`, else `~/.cache/r1v`."""
    return Path(os.environ.get("R1V_CACHE") or Path.home() / ".cache" / "r1v")


def mirror_dir(uri: str) -> Path:
    """The node-local working copy of a run directory in the store."""
    scheme, path = _split(uri)
    return cache_root() / "runs" / scheme / path


def _find_manifest(uri: str) -> tuple[str, bytes]:
    """The nearest directory at or above `uri` that holds a manifest, and the manifest's bytes."""
    scheme, path = _split(uri)
    parts = path.split("/")
    for n in range(len(parts), 1, -1):
        base = f"{scheme}://{'/'.join(parts[:n])}"
        data = get_bytes(join(base, MANIFEST))
        if data is not None:
            return base, data
    raise FileNotFoundError(f"{uri}: no {MANIFEST} at or above it (was it uploaded by r1v?)")


def stage_local(src: str | os.PathLike) -> Path:
    """A node-local path to read `src` from: a plain path as it is; an object store file or directory downloaded
    once per node into the cache, every file checked against its manifest. A staged path that another node
    handed over (it is missing here) is staged here the same way."""
    if not is_uri(src):
        p = Path(src)
        m = None if p.exists() else _STAGED.search(p.as_posix())
        if m is None:
            return p
        uri = f"{m['scheme']}://{m['rest']}"
        local = stage_local(uri)
        if f"/store/{m['digest']}/" not in local.as_posix():
            raise ChecksumError(f"{src}: the store's copy ({uri}) changed since that path was staged")
        return local
    uri = str(src).rstrip("/")
    base, raw = _find_manifest(uri)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    entries: dict[str, dict[str, Any]] = json.loads(raw)["files"]
    rel = uri[len(base):].strip("/")
    scheme, base_path = _split(base)
    root = cache_root() / "store" / digest / scheme / base_path
    target = root / rel if rel else root
    wanted = {r: e for r, e in entries.items() if not rel or r == rel or r.startswith(rel + "/")}
    if not wanted:
        raise FileNotFoundError(f"{uri}: not among the files of {join(base, MANIFEST)}")
    key = hashlib.sha256(f"{digest}/{rel}".encode()).hexdigest()[:24]
    done = cache_root() / "store" / digest / ".complete" / key
    with file_lock(cache_root() / "store" / ".locks" / f"{key}.lock"):
        if not done.exists():
            for r, e in sorted(wanted.items()):
                dest = root / r
                if dest.name == KEEP:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                elif not (dest.exists() and dest.stat().st_size == e["size"] and sha256_file(dest) == e["sha256"]):
                    _fetch(join(base, r), dest, e)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(uri + "\n")
    return target
