"""Output folders that either hold a complete result or do not exist.

`OutputFolder` checks the destination before any work starts, hands out a temporary folder
`.NAME.partial-XXXX` beside it, and renames that into place only when everything is written:

- an explicit `--out` that exists and is not empty is refused unless `force`; with `force` it is
  replaced only if it is a djinnsim output (`OUTPUT_MARKERS`), never an arbitrary folder;
- a default destination (`results/<name>/<UTC second>`) that another run took first, even in the
  same second, becomes `<stamp>-2`, `-3`...: the rename itself decides (it fails on a non-empty
  folder), so two runs never mix their files;
- on an error, SIGINT or SIGTERM the temporary folder is removed, and so are the parents this run
  created for it (`results/<name>/` of a first run) while they are empty; a folder that existed
  before is never removed; only a SIGKILL or a power cut can leave a temporary folder, and its
  dotted `.partial-` name says it is not a result;
- the commit and the clean-up run with SIGINT and SIGTERM blocked, so a signal cannot stop them
  half way (it is delivered right after);
- a full disk, a read-only file system, a permission or a name too long is one line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from djinnsim.errors import DjinnsimError

from .safeyaml import describe_path, strict_json

# A folder holding one of these was written by djinnsim (run, search, validate): --force may replace it.
OUTPUT_MARKERS = ("summary.json", "search.json", "validation.json", "provenance.json")
PARTIAL_TAG = ".partial-"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def safe_name(text: str, fallback: str = "scenario") -> str:
    """`text` as one plain path component (a results folder named after a file): characters other
    than letters, digits and `_ + - .` become `_`, no leading dot, no `..`, at most 100 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]", "_", text).replace("..", "_").lstrip(".")[:100]
    return cleaned or fallback


def os_error_line(exc: OSError, doing: str) -> str:
    """An OSError as one line: what was being done, where, and the system's reason."""
    where = f" {describe_path(exc.filename)}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (disk full)"
    return f"cannot {doing}{where}: {reason}"


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on exit) while a short step must not be cut in two."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        # A signal another thread took raises in this one at any later step, this call included: the
        # mask is restored whatever lands, or the process would hold SIGINT back for good (and pass
        # the blocked mask on to every process it starts); what landed is raised after.
        landed: BaseException | None = None
        for _ in range(100):
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                break
            except BaseException as exc:  # noqa: BLE001 - re-raised once the mask is back
                landed = landed or exc
        if landed is not None:
            raise landed


def _absolute(path: Path, option: str) -> Path:
    text = str(path)
    if "\x00" in text:
        raise DjinnsimError(f"{option} {describe_path(path)}: a path cannot hold a NUL byte")
    if not text.strip():
        raise DjinnsimError(f"{option} is empty")
    return Path(os.path.abspath(path))


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


class OutputFolder:
    """`with OutputFolder(out, default) as staging:` write into `staging`; `.path` is where the
    complete folder ends up (known once the block has finished)."""

    def __init__(self, out: Path | None, default: Path, *, force: bool = False, option: str = "--out") -> None:
        self.explicit = out is not None
        self.option = option
        self.force = force
        self.path = _absolute(Path(out) if out is not None else Path(default), option)
        self._staging: Path | None = None
        self._made: list[Path] = []  # the destination's parents this run created, outermost first
        try:
            self._check()
        except OSError as exc:
            raise DjinnsimError(os_error_line(exc, f"use {option}")) from None

    def _check(self) -> None:
        path, option = self.path, self.option
        if path.parent == path:
            raise DjinnsimError(f"{option} {describe_path(path)} is a file system root; name a folder in it")
        cwd = Path.cwd().resolve()
        if self.explicit and path.exists():
            if not path.is_dir():
                raise DjinnsimError(f"{option} {describe_path(path)} exists and is not a folder")
            if path.resolve() in (cwd, *cwd.parents):
                raise DjinnsimError(f"{option} {describe_path(path)} holds the current folder; name another")
            if not _is_empty_dir(path):
                if not self.force:
                    raise DjinnsimError(f"{option} {describe_path(path)} is not empty; give --force to replace it")
                if not any((path / marker).is_file() for marker in OUTPUT_MARKERS):
                    raise DjinnsimError(f"{option} {describe_path(path)} is not empty and holds no djinnsim "
                                        "output; not replacing it, even with --force")

    def __enter__(self) -> Path:
        try:
            with signals_deferred():
                self._make_staging()
        except BaseException as exc:  # a signal (held back above, or taken by another thread) lands here too
            self._discard()
            if isinstance(exc, OSError):
                raise DjinnsimError(os_error_line(exc, "create the output folder")) from None
            raise
        assert self._staging is not None
        return self._staging

    # Each folder is recorded before it is made, so a KeyboardInterrupt between any two steps leaves
    # nothing unrecorded (the signal mask does not hold back a signal that another thread takes).

    def _make_staging(self, attempts: int = 100) -> None:
        """The staging folder `.NAME.partial-XXXXXXXX` and the destination's missing parents."""
        for attempt in range(attempts):
            self._make_parents()
            self._staging = self.path.parent / f".{self.path.name[:100]}{PARTIAL_TAG}{secrets.token_hex(4)}"
            try:
                self._staging.mkdir()  # 0o777 less the umask, as any folder the user makes
                return
            except (FileExistsError, FileNotFoundError):  # that name is taken; or another run, failing, removed
                self._staging = None                         # the parent it had made just as this one came
                if attempt == attempts - 1:
                    raise

    def _make_parents(self) -> None:
        """mkdir -p the destination's parent; what this call makes is in `_made`, outermost first."""
        missing = []
        for folder in (self.path.parent, *self.path.parent.parents):
            if folder.is_dir():
                break
            missing.append(folder)
        for folder in reversed(missing):
            self._made.append(folder)
            try:
                folder.mkdir()
            except FileExistsError:
                self._made.pop()  # another run made it: not this one's to remove
                if not folder.is_dir():
                    raise

    def _discard(self) -> None:
        """Remove the staging folder and the parents this run made, innermost first, while they are
        empty (another run may be writing into one; a folder that existed before is never touched).

        A signal cannot cut it in two: one that another thread took (a native thread of a library,
        which the signal mask of `signals_deferred` does not cover) raises in this thread at any
        later step, so a KeyboardInterrupt landing here is held until every step is done, then
        raised (each step is repeatable: a folder leaves the list only once it is gone)."""
        interrupted: BaseException | None = None
        for _ in range(1000):  # a bound, not a retry policy: each pass ends a step or the list
            try:
                if self._staging is not None:
                    shutil.rmtree(self._staging, ignore_errors=True)
                    self._staging = None
                if not self._made:
                    break
                try:
                    self._made[-1].rmdir()
                except FileNotFoundError:
                    pass
                except OSError:  # not empty: another run's, or the user's, files are in it
                    self._made.clear()
                    break
                self._made.pop()
            except BaseException as exc:  # noqa: BLE001 - held, and raised once the folders are gone
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

    def __exit__(self, exc_type, exc, tb) -> bool:
        staging = self._staging
        assert staging is not None
        with signals_deferred():
            if exc_type is None:
                try:
                    self.path = self._commit(staging)
                    return False
                except BaseException as error:
                    self._discard()
                    if isinstance(error, OSError):
                        raise DjinnsimError(os_error_line(error, "write the results")) from None
                    raise
            self._discard()
        if isinstance(exc, OSError):
            raise DjinnsimError(os_error_line(exc, "write the results")) from None
        return False

    def _commit(self, staging: Path) -> Path:
        if not self.explicit:
            return _rename_unique(staging, self.path)
        target = self.path
        if target.is_dir() and not _is_empty_dir(target):
            if not self.force:  # appeared while this run worked
                raise DjinnsimError(f"{self.option} {describe_path(target)} was filled by something else while "
                                    f"this ran; the results were not written")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name[:100]}.old-", dir=target.parent))
            os.rename(target, old / "previous")
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
            return target
        os.rename(staging, target)  # onto nothing, or onto an empty folder
        return target


def _rename_unique(staging: Path, target: Path, attempts: int = 1000) -> Path:
    """Rename `staging` to `target`, or `target-2`, `-3`... when another run holds the name."""
    for attempt in range(1, attempts + 1):
        candidate = target if attempt == 1 else target.with_name(f"{target.name}-{attempt}")
        try:
            os.rename(staging, candidate)
            return candidate
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
    raise DjinnsimError(f"{attempts} folders named {describe_path(target)}-N exist already; clean up results/")


def write_text(path: Path, text: str) -> Path:
    """Write a text file; a failure (disk full, permissions) is one line."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise DjinnsimError(os_error_line(exc, "write")) from None
    return path


def null_non_finite(value: Any) -> Any:
    """`value` with every NaN and infinity, at any depth, replaced by None (JSON null): for files
    where a figure that does not exist is data (an interval of identical samples, an error against
    a zero mean), not a bug to refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: null_non_finite(child) for key, child in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_non_finite(child) for child in value]
    return value


def write_json(path: Path, document: Any, **dumps: Any) -> Path:
    """Write `document` as standard JSON (no NaN or Infinity: null_non_finite) to a temporary file
    beside `path`, renamed over it when complete, so a reader never finds half a file; `dumps` go
    to json.dumps (indent, separators, sort_keys). A failure is one line."""
    try:  # most documents hold no NaN or infinity: encoded as they are, without a converted copy
        text = json.dumps(document, allow_nan=False, **dumps) + "\n"
    except ValueError:
        text = strict_json(null_non_finite(document), **dumps) + "\n"
    return write_text_whole(path, text)


def write_text_whole(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, renamed over it when complete (a reader
    never finds half a file). A failure is one line."""
    staging = path.with_name(f".{path.name}{PARTIAL_TAG}{os.getpid()}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise DjinnsimError(os_error_line(exc, "write")) from None
    return path
