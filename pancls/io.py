"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file, and a run killed mid-write leaves the previous version.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from pancls.errors import UserError, exception_text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    ``suffix`` keeps the extension libraries look at (``.nii.gz``, ``.png``); it defaults to the
    target's own suffixes. On an exception the temporary file is removed and nothing is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    tmp_path = None
    try:
        # The name is chosen before the file exists, so that a signal (SIGTERM -> KeyboardInterrupt) at any
        # moment after the creation finds it in tmp_path and removes it (mkstemp returns the name only after
        # creating the file: a signal in between left it behind).
        while True:
            tmp_path = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
            try:
                fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
                break
            except FileExistsError:
                continue
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


#: The names :func:`atomic_path` gives its temporary files: ``.<target name>.<mkstemp's 8 characters>.tmp<suffix>``.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file :func:`atomic_path` creates (what a killed run leaves)."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` directly in ``folder`` (a killed run's leftovers);
    returns what was removed. Only call it while no other process writes there (:func:`hold_lock`)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and is_temp_name(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def remove_stale_temps_of(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` leaves for the one target ``path`` (``.<name>.<8>.tmp...``
    beside it) when its process is killed; returns what was removed. For an output file in a folder that other
    programs share (``pancls predict --out``), where :func:`remove_stale_temps` would take theirs too."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if entry.name.startswith(f".{path.name}.") and entry.is_file() and is_temp_name(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


#: The lock file of a run folder (:func:`hold_lock`): empty; the lock is the kernel's, not the file's content.
LOCK = ".lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


class LockHeld(UserError):
    """Another process holds the lock :func:`hold_lock` asked for (one line and exit 2 on the CLI)."""


@contextlib.contextmanager
def hold_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` for the block, so that two processes never train or write the
    same run (``what``, e.g. ``"cv run RUN"``); a second process is refused at once in one line, it never waits.

    ``flock`` (the pattern of :func:`owned_temp_dir`): the kernel releases it when its process dies, so a killed
    run leaves no stale lock to clean (the empty file stays). Re-entrant within one process (a nested block for
    the same folder holds nothing more). ``folder`` must exist."""
    import fcntl

    path = Path(folder) / LOCK
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UserError(f"cannot create the lock file {LOCK} of {what} ({exception_text(exc)})", folder) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"{what} is in use by another pancls process (it holds {LOCK} there); wait for that process "
                       "to end, or stop it, then rerun", folder) from None
    except OSError as exc:  # a file system without flock (NFS mounted nolock, some Lustre): run unguarded
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise UserError(f"cannot lock {what} ({exception_text(exc)})", folder) from None
        warnings.warn(f"{folder}: the file system offers no file locks ({exception_text(exc)}); nothing stops a "
                      "second pancls process from writing this run at the same time", stacklevel=3)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)


@contextlib.contextmanager
def owned_temp_dir(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private (0700) temporary folder ``<parent>/<prefix><random>``, removed when the block ends.

    A process killed with SIGKILL cannot remove its folder (for ``pancls predict``: DICOM unpacked from a zip,
    patient data), so on entry this removes the folders of the same ``prefix`` that belong to this user and that
    no running process holds: each live folder is held by an exclusive ``flock`` on its ``.lock`` file, which the
    kernel releases when its process dies (a pid test would not survive containers sharing a temp folder). A
    folder without its lock file is left alone for a minute (its owner may be creating it). ``parent`` defaults
    to the system temp folder."""
    import fcntl
    import shutil
    import time

    parent = Path(parent or tempfile.gettempdir())
    for entry in parent.glob(f"{prefix}*"):
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                continue
            fd = os.open(entry / ".lock", os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > 60:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a running process's folder
            os.close(fd)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        os.close(fd)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def publish_temp_dir(build: Path, out: Path) -> None:
    """Move a finished :func:`owned_temp_dir` folder onto ``out`` (missing or an empty folder): its lock file
    dropped, the permissions a folder made by ``os.mkdir`` would have (not mkdtemp's 0700), one rename, so the
    result appears whole or not at all."""
    (build / ".lock").unlink(missing_ok=True)
    umask = os.umask(0o022)
    os.umask(umask)
    build.chmod(0o777 & ~umask)
    os.replace(build, out)


def writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (with parents) and check a file can be written in it; UserError naming it otherwise.

    Run before any work, so that a long run does not fail at its end on a read-only or mistyped ``--out``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} exists and is not a folder", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write into the {what}: {exc.strerror or exc}", path) from None
    _probe_write(path, f"the {what}")
    return path


def _probe_write(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only test that holds for root, read-only mounts, NFS and ACLs
    (``os.access`` answers yes to root on a read-only filesystem)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pancls-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write into {what}: {exc.strerror or exc}", folder) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays and torch tensors turned into Python numbers and lists, and
    mapping keys into strings: what :func:`json.dumps` accepts. (DICOM values have their own coercion,
    :mod:`pancls.ct.volume`, which knows pydicom's types.)"""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if callable(getattr(value, "tolist", None)):  # np.ndarray, torch.Tensor (without importing torch here)
        return json_safe(value.tolist())
    return value


def read_json(path: str | os.PathLike, what: str = "file", expect: type | None = None) -> Any:
    """The JSON content of ``path``; a missing, unreadable or invalid file, or (with ``expect``, e.g. ``dict``)
    content of another type, is a :class:`~pancls.errors.UserError` naming it (``what``: what the file is, e.g.
    "fold record"), so that a damaged run folder gives one line."""

    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"the {what} is damaged: not valid JSON ({exception_text(exc, path)})", path) from None
    except OSError as exc:
        raise UserError(f"cannot read the {what} ({exception_text(exc, path)})", path) from None
    if expect is not None and not isinstance(content, expect):
        kind = "a JSON object" if expect is dict else f"JSON of type {expect.__name__}"
        raise UserError(f"the {what} is damaged: not {kind}", path)
    return content


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` (made :func:`json_safe`) as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` (e.g. ``torch.save``, ``nib.save``) and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable_folder(folder: str | os.PathLike, what: str = "the folder") -> None:
    """Refuse, before any work, a folder that a command will write into and cannot: missing or read-only
    (``what`` names it in the message, e.g. "the output's folder")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} does not exist", folder)
    _probe_write(folder, what)


def check_creatable(path: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse, before any work and without creating anything, a folder ``path`` that cannot be made or written
    into: the folder itself when it exists, else its nearest existing parent, gets a test write (for commands
    whose refusals must leave no folder behind, such as ``pancls cv``)."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} exists and is not a folder", path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create the {what}: {existing} is not a folder", path)
    _probe_write(existing, f"the {what}" if existing == path else f"the {what}'s parent folder")


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(resolved path, size in bytes, mtime in ns)`` of ``path``: what tells a rerun that a file was replaced
    or rewritten without reading it (ingest's source fingerprints, the preprocessing cache's item keys).
    Raises OSError when the file cannot be stat'ed."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def quiet_worker() -> None:
    """Initializer of every forked worker pool (``multiprocessing.Pool``, ``ProcessPoolExecutor``): the worker
    drops the handlers it inherited from :func:`signals_unwind`. SIGTERM and SIGHUP kill it quietly again (a pool
    ends its idle workers with SIGTERM: with the inherited handler each printed a KeyboardInterrupt traceback),
    and SIGINT is ignored (Ctrl-C reaches the whole process group: the parent unwinds and stops the pool)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP (kill, Slurm's time limit, a closed terminal) raise KeyboardInterrupt in the main
    thread while the block runs, so that ``finally`` blocks run: an :func:`atomic_path` write in progress
    removes its temporary file. Used by every ``pancls`` command (``cli.main``) and by ``ingest`` as a library
    call. Outside the main thread (where signal handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
