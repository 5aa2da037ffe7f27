"""File helpers shared by the KB, checkpoint and metrics writers: the one sha256 hasher, the one
JSON/JSONL reader and writer, the one file lock and the one atomic directory writer.

JSON and JSONL
    `loads_strict` parses JSON refusing what Python's `json` accepts but JSON does not mean:
    NaN/Infinity literals and duplicate object keys; nesting too deep for the parser is a
    ValueError, not a RecursionError. `dumps_line` writes one record as one line: only ``\\n``
    ends a line (JSON escapes every ``\\n`` inside strings; U+2028, U+2029, U+0085 and other
    characters that `str.splitlines` treats as line ends stay raw inside their string), and
    `jsonl_lines` / `read_jsonl` split with the same rule.

Locks
    `file_lock(path)` holds an exclusive `flock` on ``path`` (created when missing). It is
    re-entrant within a thread (a nested `file_lock` on the same path is free), released on
    exit and by the OS when the process dies. ``blocking=False`` raises `LockedError` naming
    what holds it instead of waiting.

Atomic directories
    `atomic_directory(final)` yields an empty temp directory ``.NAME.tmp-ID`` next to
    ``final``; on normal exit every file in it and the directory are fsynced and it replaces
    ``final`` under the lock ``.NAME.lock``: ``final`` is renamed to ``.NAME.old-ID`` (same ID),
    the temp directory to ``final``, then the old copy is deleted, with the parent fsynced after
    each rename. An exception inside the block deletes the temp directory and leaves ``final``
    untouched. A process killed at any point leaves ``final`` complete, or, between the two
    renames, missing with both ``.NAME.old-ID`` and a complete ``.NAME.tmp-ID``:
    `recover_directory(final)` (called by every reader and writer before use) finishes that swap
    (the new copy was complete before the first rename) or, with only ``.NAME.old-ID`` left,
    restores it, and deletes stale ``.NAME.tmp-*`` / ``.NAME.old-*`` left by killed writers.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator

# ------------------------------------------------------------------------------------ hashing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- JSON / JSONL


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are refused)")


def _unique_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in a JSON object")
        seen[key] = value
    return seen


def loads_strict(text: str, *, allow_nan: bool = False):
    """json.loads that refuses NaN/Infinity (unless allow_nan), duplicate keys and over-deep nesting
    with a ValueError (json.JSONDecodeError, a ValueError, for malformed JSON)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps_line(record, *, allow_nan: bool = False) -> str:
    """One JSONL line (ending with its single ``\\n``); NaN/inf are refused unless allow_nan (metrics)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=allow_nan) + "\n"


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split at ``\\n`` only (never at U+2028, U+2029, U+0085, \\v, \\f...),
    a ``\\r`` before the ``\\n`` dropped; no final empty line for text ending with ``\\n``."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_jsonl(path: str | Path, *, allow_nan: bool = False, torn_tail: bool = False) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSONL file, parsed with `loads_strict`;
    a malformed line is a ValueError naming the file and line. torn_tail=True drops a last line
    without its ``\\n`` (an append cut short by a crash) instead of parsing it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = jsonl_lines(text)
    if torn_tail and text and not text.endswith("\n"):
        lines = lines[:-1]
    return list(parse_jsonl(lines, path, allow_nan=allow_nan))


def parse_jsonl(lines: Iterable[str], name, *, allow_nan: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, value) of every non-blank line, parsed with `loads_strict` as it is reached;
    a malformed line is a ValueError naming `name` (a file) and the line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = loads_strict(line, allow_nan=allow_nan)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:
            raise ValueError(f"{name}:{lineno}: {e}") from None
        yield lineno, value


def write_jsonl(path: str | Path, records, *, append: bool = False, allow_nan: bool = False) -> None:
    """Write records, one `dumps_line` each: the whole file atomically (temp file, fsync, rename),
    or appended (append=True, flushed, not fsynced: metrics every step)."""
    path = Path(path)
    lines = "".join(dumps_line(r, allow_nan=allow_nan) for r in records)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines)
        return
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_finite_tree(value, where: str, depth: int = 0) -> None:
    """ValueError naming `where` when a nested dict/list holds NaN/inf or is nested over 100 deep."""
    if depth > 100:
        raise ValueError(f"{where}: nested more than 100 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    if isinstance(value, dict):
        for v in value.values():
            check_finite_tree(v, where, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_finite_tree(v, where, depth + 1)


def check_writable_file(path: str | Path, what: str = "output file") -> Path:
    """ValueError unless `path` can be written as a file (checked before long work, not after)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file path")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {what} {path}: permission denied")
    return path


# --------------------------------------------------------------------------------------- locks


class LockedError(ValueError):
    """A lock (KB, checkpoint directory, training out_dir) is held by another process."""


_held: dict[tuple, list] = {}  # (thread, lock path) -> [fd, depth]
_held_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True, what: str | None = None) -> Iterator[None]:
    """Exclusive flock on `path` for the block (re-entrant in one thread). blocking=False raises
    LockedError naming `what` (default: the path) when another process holds it."""
    path = Path(path).absolute()
    key = (threading.get_ident(), str(path))  # re-entrant per thread; other threads queue like processes
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"cannot create lock file {path}: {e.strerror} (is {path.parent} writable?)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockedError(f"{what or path} is in use by another process (lock {path} is held); "
                              "wait for it to finish or use another directory") from None
        raise
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            done = _held[key][1] == 0
            if done:
                del _held[key]
        if done:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# --------------------------------------------------------------------------- atomic directories


def fsync_path(path: Path) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and root itself), deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def lock_path(final: Path) -> Path:
    """The lock file guarding directory `final`: ``.NAME.lock`` next to it."""
    return final.parent / f".{final.name}.lock"


def _leftovers(final: Path, kind: str) -> dict[str, Path]:
    """{ID: path} of ``.NAME.<kind>-ID`` entries next to `final`."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.{kind}-([0-9a-f]+)$")
    if not final.parent.is_dir():
        return {}
    return {m.group(1): p for p in final.parent.iterdir() if (m := pattern.match(p.name))}


def recover_directory(final: str | Path) -> list[str]:
    """Finish or undo a swap of `final` interrupted by a crash and delete stale temp copies;
    returns one line per action taken (empty when nothing was left over). Cheap and lock-free
    when there is nothing to do; otherwise runs under the directory's lock."""
    final = Path(final).absolute()
    if not _leftovers(final, "tmp") and not _leftovers(final, "old"):
        return []
    try:
        lock = file_lock(lock_path(final), what=f"directory {final}")
        lock.__enter__()
    except ValueError:
        if final.exists():
            return []  # read-only parent: nothing can be repaired, and final is intact
        raise ValueError(f"{final} is missing and its interrupted swap cannot be repaired "
                         f"(cannot lock {lock_path(final)})") from None
    try:
        actions = []
        tmps, olds = _leftovers(final, "tmp"), _leftovers(final, "old")
        if not final.exists() and olds:
            ident, old = sorted(olds.items())[0]
            if ident in tmps:  # killed between the two renames: the new copy was complete
                os.rename(tmps.pop(ident), final)
                actions.append(f"finished the interrupted swap of {final} (new copy moved into place)")
            else:
                os.rename(old, final)
                del olds[ident]
                actions.append(f"restored {final} from {old.name}")
            fsync_path(final.parent)
        for stale in list(tmps.values()) + list(olds.values()):
            if stale.exists():
                shutil.rmtree(stale, ignore_errors=True)
                actions.append(f"deleted stale {stale.name}")
        return actions
    finally:
        lock.__exit__(None, None, None)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory next to `final`; on normal exit it atomically replaces
    `final` (see the module docstring). The whole block runs under ``.NAME.lock``."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(final), what=f"directory {final}"):
        recover_directory(final)
        ident = uuid.uuid4().hex[:12]
        tmp = final.with_name(f".{final.name}.tmp-{ident}")
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            old = final.with_name(f".{final.name}.old-{ident}")
            os.rename(final, old)
            fsync_path(final.parent)
            os.rename(tmp, final)
            fsync_path(final.parent)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
            fsync_path(final.parent)
