"""Input CSVs where teams keep them: a local path, a Hugging Face dataset repo or object storage, through fsspec.

    data/quotes.csv                                         a local file (read in place, as always)
    hf://datasets/<owner>/<name>/quotes.csv                 the file on the repo's main branch
    hf://datasets/<owner>/<name>@<revision>/quotes.csv      a branch, tag or commit sha: HfFileSystem's syntax (the
                                                            revision follows the repo name; one with a '/' is
                                                            URL-encoded: @refs%2Fpr%2F1)
    s3://<bucket>/<key>.csv[?versionId=<id>]                s3fs's syntax for one version of a versioned bucket
    gs://..., az://...                                      any fsspec protocol whose package is installed (gcsfs,
                                                            adlfs); not tested here

`describe(url)` reads metadata only: which revision the URL resolves to (hf: the commit sha; s3: the VersionId,
empty on an unversioned bucket), the file's content id (hf: its git blob sha, or LFS sha256; s3 and others: the
ETag) and a `pinned` URL naming exactly that version. The watcher compares content ids, so an unchanged file
costs one or two small requests and no download.

`fetch(url, cache_root)` downloads once into `<cache_root>/<key>/`, `key` hashing the location (URL without
revision) and the content id: a new commit that leaves the CSV alone, or a second run, is a cache hit with no
download. Each folder holds the file and `source.json` (url, pinned url, revision, content id, sha256).

Errors are `DataSourceError`s that name the URL and what failed: not found, no permission, no network (or
HF_HUB_OFFLINE=1). A token never appears in them: messages are scrubbed and raised outside the client's
exception, whose chain holds the request and its headers.
"""
from __future__ import annotations

import errno
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from personatune.files import atomic_dir, is_complete, sha256_file, stable_hash

URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://")
SOURCE_JSON = "source.json"


def is_remote(path: str | Path) -> bool:
    """A URL (`hf://`, `s3://`, ...) rather than a local path."""
    return bool(URL.match(str(path)))


class DataSourceError(RuntimeError):
    """A remote CSV could not be read. `reason`: 'not found', 'no permission', 'no network' or 'failed'."""

    def __init__(self, url: str, reason: str, detail: str = ""):
        self.url, self.reason = url, reason
        super().__init__(f"{url}: {reason}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class Remote:
    url: str          # as given
    pinned: str       # the URL of exactly this version (hf: @<commit sha>; s3: ?versionId=...)
    location: str     # the URL without any revision: what the file is, whatever its version
    revision: str     # hf: commit sha; s3: VersionId ('' on an unversioned bucket); others: generation/version or ''
    content_id: str   # hf: git blob sha (LFS: sha256); s3 and others: ETag
    size: int
    dataset: str = ""  # hf dataset repos: "<owner>/<name>" (model card `datasets:` metadata)


# --- metadata -------------------------------------------------------------------------------------------------
def describe(url: str, token: str | None = None) -> Remote:
    """What `url` resolves to now, from metadata only (no download). Raises DataSourceError."""
    return _guarded(url, token, lambda: _describe(url, token))


def _describe(url: str, token: str | None) -> Remote:
    scheme = URL.match(url).group("scheme")
    if scheme == "hf":
        return _describe_hf(url, token)
    if scheme in ("s3", "s3a"):
        return _describe_s3(url)
    return _describe_fsspec(url)


def _hf(token: str | None):
    import os

    from huggingface_hub import HfApi, HfFileSystem, constants

    # HF_ENDPOINT as it is now (huggingface_hub reads it once at import). Not personatune.hub's helper: config
    # imports this module, and the stage cache keys hash what config imports (tests/test_caching.py)
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    # skip_instance_cache: fsspec caches instances and their listings; the watcher must see the repo as it is now
    fs = HfFileSystem(endpoint=endpoint, token=token, skip_instance_cache=True)
    return fs, HfApi(endpoint=endpoint, token=token, library_name="personatune")


def _describe_hf(url: str, token: str | None) -> Remote:
    from huggingface_hub import constants

    fs, api = _hf(token)
    resolved = fs.resolve_path(url)  # repo and revision exist (else FileNotFoundError)
    if not resolved.path_in_repo:
        raise FileNotFoundError(f"{url} names a repo, not a file in it")
    commit = api.repo_info(resolved.repo_id, repo_type=resolved.repo_type, revision=resolved.revision).sha
    prefix = constants.REPO_TYPES_URL_PREFIXES.get(resolved.repo_type, "")
    pinned = f"hf://{prefix}{resolved.repo_id}@{commit}/{resolved.path_in_repo}"
    parent = pinned.rsplit("/", 1)[0]
    entries = {e["name"]: e for e in fs.ls(parent, detail=True)}  # the tree listing: blob ids, no content
    entry = entries.get(pinned.removeprefix("hf://"))
    if entry is None or entry["type"] != "file":
        raise FileNotFoundError(f"no file {resolved.path_in_repo!r} at revision {resolved.revision!r}")
    content_id = (entry.get("lfs") or {}).get("sha256") or entry["blob_id"]
    return Remote(url=url, pinned=pinned, location=f"hf://{prefix}{resolved.repo_id}/{resolved.path_in_repo}",
                  revision=commit, content_id=content_id, size=int(entry["size"]),
                  dataset=resolved.repo_id if resolved.repo_type == "dataset" else "")


def _s3():
    import s3fs

    # version_aware: `?versionId=` in a URL reads that version; AWS_ENDPOINT_URL, the AWS_* keys, ~/.aws or the
    # pod's role (IRSA) configure it, as for any boto client
    return s3fs.S3FileSystem(version_aware=True, skip_instance_cache=True)


def _describe_s3(url: str) -> Remote:
    fs = _s3()
    info = fs.info(url)
    if info.get("type") != "file":
        raise FileNotFoundError(f"{url} is not an object")
    location = "s3://" + url.split("://", 1)[1].split("?", 1)[0]
    version = str(info.get("VersionId") or "")
    version = "" if version == "null" else version  # objects written before versioning was enabled
    return Remote(url=url, pinned=f"{location}?versionId={version}" if version else location, location=location,
                  revision=version, content_id=str(info.get("ETag", "")).strip('"'), size=int(info.get("size", 0)))


def _describe_fsspec(url: str) -> Remote:
    """gs://, az:// and the rest: the ETag (or md5) is the content id; the URL is used as given."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    content_id = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5") or "").strip('"')
    if not content_id:
        content_id = stable_hash(info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
    revision = str(info.get("generation") or info.get("version_id") or "")
    return Remote(url=url, pinned=url, location=url, revision=revision, content_id=content_id,
                  size=int(info.get("size") or 0))


# --- download cache -------------------------------------------------------------------------------------------
def data_cache(output_dir: str | Path) -> Path:
    """Where a run (and the watcher looking at its outputs) keeps downloaded CSVs: part of the stage cache."""
    return Path(output_dir) / ".cache" / "data"


def cache_folder(remote: Remote, cache_root: str | Path) -> Path:
    return Path(cache_root) / stable_hash(remote.location, remote.content_id)[:24]


def cached_sha256(remote: Remote, cache_root: str | Path) -> str | None:
    """The sha256 of this exact content if it was downloaded before (no network), else None."""
    folder = cache_folder(remote, cache_root)
    if not is_complete(folder):
        return None
    return json.loads((folder / SOURCE_JSON).read_text())["sha256"]


def fetch(url: str, cache_root: str | Path, token: str | None = None) -> dict:
    """Download `url` into the cache (once per content) and return its local `path`, `sha256`, whether it was
    `cached`, and the `source` provenance: url, pinned, revision, content_id, dataset."""
    remote = describe(url, token)
    folder = cache_folder(remote, cache_root)
    name = Path(remote.location.split("://", 1)[1]).name or "data.csv"
    cached = is_complete(folder)
    if not cached:
        with atomic_dir(folder) as tmp:
            _guarded(url, token, lambda: _download(remote, tmp / name, token))
            digest = sha256_file(tmp / name)
            (tmp / SOURCE_JSON).write_text(json.dumps({**asdict(remote), "sha256": digest}, indent=2) + "\n")
    digest = json.loads((folder / SOURCE_JSON).read_text())["sha256"]
    source = {k: v for k, v in asdict(remote).items() if k != "size"}
    return {"path": str(folder / name), "sha256": digest, "cached": cached, "source": source}


def _download(remote: Remote, target: Path, token: str | None) -> None:
    scheme = URL.match(remote.pinned).group("scheme")
    if scheme == "hf":
        fs, _ = _hf(token)
    elif scheme in ("s3", "s3a"):
        fs = _s3()
    else:
        import fsspec

        fs = fsspec.core.url_to_fs(remote.pinned)[0]
    fs.get_file(remote.pinned, str(target))
    if scheme == "hf":  # the Hub names content by hash: check what arrived is what the listing announced
        data = target.read_bytes()
        got = {hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), hashlib.sha256(data).hexdigest()}
        if remote.content_id not in got:
            raise OSError(errno.EIO, f"downloaded content does not match blob {remote.content_id[:12]}")


# --- errors ---------------------------------------------------------------------------------------------------
def _guarded(url: str, token: str | None, call):
    """Run `call`; turn what the clients raise into a DataSourceError naming `url`, raised outside the client's
    exception (so no traceback chain reaches the request headers) and scrubbed of `token`."""
    try:
        return call()
    except DataSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below, never swallowed
        reason, detail = _classify(url, e)
    raise DataSourceError(url, reason, detail.replace(token, "***") if token else detail)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _classify(url: str, exc: BaseException) -> tuple[str, str]:
    names = {type(e).__name__ for e in _chain(exc)}
    statuses = {getattr(getattr(e, "response", None), "status_code", None) for e in _chain(exc)}
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "OfflineModeIsEnabled" in names:
        return ("no network", "HF_HUB_OFFLINE=1 is set; set it to 0 to reach the Hub")
    if statuses & {401, 403} or "PermissionError" in names or names & {"AccessDenied", "InvalidAccessKeyId"}:
        return ("no permission", "check the token or credentials (HF_TOKEN, the 'hf-token' "
                               "Secret block, AWS_* keys) and that they may read this repo or bucket")
    if any(n in names for n in ("ConnectError", "ConnectionError", "ConnectTimeout", "EndpointConnectionError",
                                "ClientConnectorError", "ConnectionRefusedError", "ServerDisconnectedError",
                                "ReadTimeout", "TimeoutError")):
        return ("no network", f"could not connect: {type(exc).__name__}")
    if names & {"FileNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
                "NoSuchKey", "NoSuchBucket"} or 404 in statuses:
        return ("not found", "no such repo, revision or file (a private repo also looks "
                               "missing to a token that cannot read it)" if url.startswith("hf://") else
                               "no such bucket or object")
    if isinstance(exc, ImportError):
        return ("failed", f"{exc}; install the fsspec extra for this protocol (s3fs, gcsfs, adlfs)")
    return ("failed", f"{type(exc).__name__}: {first}")
