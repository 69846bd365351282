"""Content hashes and all-or-nothing output folders."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
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


def code_version(*modules: str) -> str:
    """Hash of the ML core's source. With no arguments, all of `personatune`; with module names (e.g.
    "personatune.data"), only those modules and every `personatune` module they import, directly or not
    (`module_closure`): a stage's cache then survives edits to code it never runs."""
    root = Path(__file__).parent
    names = sorted(module_closure(*modules)) if modules else sorted(p.stem for p in root.glob("*.py"))
    h = hashlib.sha256()
    for name in names:
        path = root / f"{name}.py"
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_AST_LOCK = threading.Lock()


def module_closure(*modules: str) -> set[str]:
    """The `personatune` modules (file stems) that the given modules import, transitively, found by parsing
    every import statement of their source, those inside functions too. `__init__` (which runs on any import
    of the package) and what it imports are always included."""
    import ast

    root = Path(__file__).parent
    package = root.name
    todo = ["__init__"] + [m.removeprefix(f"{package}.") for m in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = root / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"{package}.{name} is not a module of {root}")
        seen.add(name)
        with _AST_LOCK:  # ast.parse from two threads at once raised "SystemError: AST constructor recursion
            tree = ast.parse(path.read_text(encoding="utf-8"))  # depth mismatch" here (CPython 3.11.7, gh-106905)
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from .x import y
                    base = f"{package}.{base}" if base else package
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            for dotted in found:
                parts = dotted.split(".")
                if parts[0] == package and len(parts) > 1 and (root / f"{parts[1]}.py").is_file():
                    todo.append(parts[1])
    return seen


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
