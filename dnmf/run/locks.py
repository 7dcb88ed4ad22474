"""Exclusive locks on the folders a fit writes (its checkpoint, a user-given spill folder).

The lock of ``FOLDER`` is the file ``FOLDER.lock`` beside it, created with
``O_CREAT | O_EXCL`` (so exactly one process can create it) and holding JSON that names its
holder: host, pid, when the process started and when it took the lock, and a random token.
The file lies outside the folder so that it can be taken before the folder exists and is never
mistaken for the folder's contents.

A process killed while holding a lock leaves the file behind. A later run on the same host
sees that the holder is gone (no process with that pid, or one started at another time: the
pid was reused) and takes the lock over: it renames the stale file to a name of its own, an
atomic step only one contender wins, checks that what it moved is the stale lock it read, and
creates its own. A lock of another host is not taken over: its holder's liveness cannot be checked
from here, so the error names the host and pid and says how to remove the lock. One exception:
a lock held by an earlier run of the same Slurm batch job (the same ``SLURM_JOB_ID``, a lower
``SLURM_RESTART_COUNT``), which a requeued job may meet on another node after its previous run
was killed: Slurm runs one instance of a job at a time, so that holder is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import psutil

from ..errors import LockedError
from ..data import folders

SUFFIX = ".lock"
ATTEMPTS = 10
UNREADABLE_GRACE = 1.0  # seconds a just-created lock may still be empty (created, not yet written)


def lock_path(folder: str | os.PathLike) -> str:
    """The lock file of ``folder``: ``FOLDER.lock`` beside it."""
    return os.path.abspath(os.fspath(folder)).rstrip(os.sep) + SUFFIX


def holder_record(pid: int | None = None) -> dict:
    """What a lock file holds for process ``pid`` (default: this one) on this host.

    Parameters
    ----------
    pid : int, optional
        The holder's process id; by default the calling process.

    Returns
    -------
    dict
        ``host``, ``pid``, ``process_started`` (the process's start, seconds since the epoch, to
        tell a reused pid), ``locked`` (when the lock was taken) and a random ``token``.
    """
    pid = os.getpid() if pid is None else int(pid)
    record = {
        "host": socket.gethostname(),
        "pid": pid,
        "process_started": psutil.Process(pid).create_time(),
        "locked": time.time(),
        "token": uuid.uuid4().hex,
    }
    job = batch_job()
    if job is not None:
        record["batch_job"] = job
    return record


def batch_job() -> dict | None:
    """This process's Slurm job and run (``SLURM_JOB_ID``, ``SLURM_RESTART_COUNT``), if any."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        run = 0
    return {"system": "slurm", "id": job_id, "run": run}


def _earlier_run_of_this_job(holder: dict) -> bool:
    """Whether ``holder`` is an earlier run of this process's batch job (requeued since)."""
    mine, theirs = batch_job(), holder.get("batch_job")
    if mine is None or not isinstance(theirs, dict):
        return False
    same_job = theirs.get("system") == mine["system"] and str(theirs.get("id")) == mine["id"]
    return same_job and isinstance(theirs.get("run"), int) and theirs["run"] < mine["run"]


def _alive(holder: dict) -> bool:
    """Whether the process a lock of this host names still runs (not a zombie, not a reused pid)."""
    try:
        process = psutil.Process(int(holder["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - float(holder["process_started"])) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists, and may be the holder
        return True


class FolderLock:
    """An exclusive, process-level lock on a folder; a context manager.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder to lock (it need not exist).
    what : str
        What the folder is, for messages ("checkpoint folder", "spill folder").

    Raises
    ------
    LockedError
        From :meth:`acquire` (and ``with``) when another live process holds the lock, or a
        process of another host, or the lock file cannot be read.
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = os.path.abspath(os.fspath(folder))
        self.what = what
        self.path = lock_path(folder)
        self._token: str | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one of this host; raise :class:`LockedError` if held."""
        for _ in range(ATTEMPTS):
            if self._create():
                return
            holder = self._holder()
            if holder is None:  # released (or taken over) meanwhile: try again
                continue
            here = holder.get("host") == socket.gethostname()
            stale = (here and not _alive(holder)) or _earlier_run_of_this_job(holder)
            if not stale:
                raise LockedError(self._refusal(holder))
            self._take_over(holder)
        raise LockedError(
            f"The {self.what} {self.folder!r} is contended: its lock {self.path!r} changed hands "
            f"{ATTEMPTS} times while this run tried to take it. Try again."
        )

    def release(self) -> None:
        """Remove the lock file if this object holds it (and it is still this object's)."""
        token, self._token = self._token, None
        if token is not None and (self._read_record() or {}).get("token") == token:
            self._remove()

    def _read_record(self) -> dict | None:
        """The lock's record: None when it is gone, {} when it holds no (complete) record."""
        return _read(self.path)

    def _remove(self) -> None:
        os.remove(self.path)

    def _create(self) -> bool:
        """Create the lock file with this process's record; False when it exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        record = holder_record()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self._token = record["token"]
        return True

    def _holder(self) -> dict | None:
        """The record of the lock file (None once it is gone), waiting briefly for a lock that
        was just created and is not yet written."""
        deadline = time.monotonic() + UNREADABLE_GRACE
        while True:
            holder = self._read_record()
            if holder != {}:
                return holder
            if time.monotonic() > deadline:
                raise LockedError(
                    f"The {self.what} {self.folder!r} is locked by {self.path!r}, which does not name its "
                    "holder. If no dnmf run uses the folder, delete that file."
                )
            time.sleep(0.05)

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock ``stale``, unless another process replaced it meanwhile."""
        moved = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:  # another run took it over first
            return
        if (_read(moved) or {}).get("token") != stale["token"]:
            # Another run took the stale lock over between our read and our rename: give its
            # lock back (unless a third one has created the file since).
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        os.remove(moved)

    def _refusal(self, holder: dict) -> str:
        """The message of a refused lock."""
        host, pid = holder.get("host"), holder.get("pid")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("locked", 0))))
        where = f"{self.what} {self.folder!r}"
        if host != socket.gethostname():
            return (
                f"The {where} is locked by a dnmf run on host {host!r} (pid {pid}, since {since}). If that run "
                f"is no longer running, delete its lock file {self.path!r} and try again."
            )
        if pid == os.getpid():
            return (
                f"The {where} is in use by an earlier fit in this process (since {since}), e.g. one whose W "
                "still reads its spills. Delete that estimator or W first, or use another folder."
            )
        return (
            f"The {where} is in use by another dnmf run (host {host!r}, pid {pid}, since {since}). Wait "
            "for it to finish, or use another folder."
        )


class ObjectLock(FolderLock):
    """The lock of a folder given as an fsspec URL (a checkpoint on an object store).

    The lock is the object ``URL.lock``, created by a conditional write that fails when it
    exists (``If-None-Match: *``: atomic on S3, GCS and Azure), holding the same record as a
    :class:`FolderLock`'s file. A stale lock of this host (its process gone) is taken over: it is
    deleted if it still holds the record read (an object store has no atomic rename, so two
    runs taking the same stale lock over at the same instant could both delete it; only one
    of them can then create the new one). A lock of another host is refused, naming it: delete
    the object ``URL.lock`` when no run uses the folder.
    """

    def __init__(self, folder: str, what: str):
        self.folder = os.fspath(folder).rstrip("/")
        self.what = what
        self.path = self.folder + SUFFIX
        self._token = None

    def _create(self) -> bool:
        record = holder_record()
        if not folders.create_exclusive(self.path, json.dumps(record).encode()):
            return False
        self._token = record["token"]
        return True

    def _read_record(self) -> dict | None:
        try:
            text = folders.read_bytes(self.path).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        return _parse(text)

    def _remove(self) -> None:
        try:
            folders.remove_file(self.path)
        except FileNotFoundError:
            pass

    def _take_over(self, stale: dict) -> None:
        if (self._read_record() or {}).get("token") == stale["token"]:
            self._remove()


def _read(path: str) -> dict | None:
    """A lock file's record: None when the file is gone, {} when it holds no (complete) record."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return _parse(text)


def _parse(text: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    complete = isinstance(record, dict) and record.keys() >= {"host", "pid", "process_started", "token"}
    return record if complete else {}
