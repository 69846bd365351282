"""Content hashes and all-or-nothing output folders."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

COMPLETE_MARKER = ".complete"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(*parts: Any) -> str:
    """Hash of JSON-serialisable parts, independent of dict order."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return sha256_bytes(blob.encode("utf-8"))


def code_version() -> str:
    """Hash of the ML core's source: a code change invalidates every cached stage."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success mark it complete and rename it to `final`.

    Readers never see a half-written `final`: it appears in one rename or not at all. If `final` already
    exists complete (another run won the race), the new copy is discarded. On error the temp folder goes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # leftover of a crash before this code existed; never complete
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(final: Path) -> None:
    """Temp folders of writers that died (SIGKILL, power loss) before renaming: their pid is gone."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*-*"):
        pid = tmp.name[len(f".tmp-{final.name}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
