"""Writes that are all or nothing: a crash leaves the old file (or no file), never half a new one.

Every file and directory another process may read while it is written goes through here:
JSON and JSONL results, registry aliases, and finished models (``replace_dir``: written as a
sibling temporary directory, then renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def utc_now(timespec: str = "seconds") -> str:
    """ISO-8601 UTC time with a ``Z`` (``timespec``: ``seconds`` or ``milliseconds``)."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_jsonl_atomic(path: Path | str, rows: Iterable[Any]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def create_file_atomic(path: Path | str, data: bytes) -> bool:
    """Write ``data`` to ``path`` only if no file is there: never overwrites. Returns True when
    written, False when ``path`` already holds exactly ``data`` (a repeated write, e.g. after a
    crash); FileExistsError when it holds anything else."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if the name is taken
        except FileExistsError:
            if path.read_bytes() == data:
                return False
            raise
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_dir(target: Path | str, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` fills a fresh sibling directory, which then replaces ``target`` whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target.parent)
    return target
