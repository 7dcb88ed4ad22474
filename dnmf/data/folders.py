"""The file operations of a checkpoint folder, on a local path or on an fsspec URL.

A checkpoint (:mod:`dnmf.run.checkpoint`) needs few operations: list a folder, read and write
small objects, remove a version, and one atomic step, the switch of its pointer. They mean
different things on the two kinds of storage:

- **a local or shared file system**: the pointer is replaced by a temporary file, ``fsync``,
  ``os.replace`` and an ``fsync`` of the folder, and a finished version is ``fsync``-ed file by
  file before the switch;
- **an object store** (``s3://``, ``gs://``, ``abfs://``, ... through fsspec): a PUT of one
  object is atomic (a reader sees the old object or the new one, never a mix) and durable once
  acknowledged, so the pointer is switched by a single-object write and nothing needs an
  ``fsync``. Folders are key prefixes: there are no empty folders and no renames.

Listings of a URL are never cached (``use_listings_cache=False``): other processes (the
workers, another run) write there too. Credentials and endpoints come from the environment,
as for every fsspec URL dnmf reads (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``; see deploy/README.md).
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def normalized(path) -> str:
    """A local path made absolute; a URL without its trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names]) if is_url(root) else os.path.join(root, *names)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
    import fsspec

    try:
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except TypeError:  # a file system without a listings cache
        return fsspec.filesystem(protocol)


def filesystem(url: str):
    """(fsspec file system, path within it) of ``url``; listings never cached."""
    import fsspec

    return _filesystem(url.split("://", 1)[0]), fsspec.core.strip_protocol(url)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, key = filesystem(path)
    return fs.isfile(key)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path) and not os.path.islink(path)
    fs, key = filesystem(path)
    return fs.isdir(key)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.lexists(path)
    fs, key = filesystem(path)
    return fs.exists(key)


def listdir(path: str) -> list[str]:
    """The names in the folder ``path`` (files and sub-folders); [] when it does not exist."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, key = filesystem(path)
    try:
        entries = fs.ls(key, detail=False)
    except FileNotFoundError:
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
    return [name for name in names if name not in ("", ".", "..")]


def files_under(path: str) -> list[str] | None:
    """The files under the folder ``path``, as paths relative to it with ``/`` separators (and,
    locally, empty folders ending in ``/``, links to folders in ``@``); None when ``path`` is
    not a folder (or is a symbolic link)."""
    if not is_url(path):
        if os.path.islink(path) or not os.path.isdir(path):
            return None
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames:  # an empty folder is an entry of its own, to be judged; a link
                full = os.path.join(dirpath, name)  # to a folder is never dnmf's (its name ends in @)
                if os.path.islink(full) or not os.listdir(full):
                    rel = os.path.relpath(full, path).replace(os.sep, "/")
                    found.append(rel + ("@" if os.path.islink(full) else "/"))
            found += [os.path.relpath(os.path.join(dirpath, n), path).replace(os.sep, "/") for n in filenames]
        return found
    fs, key = filesystem(path)
    if not fs.isdir(key):
        return None
    prefix = key.rstrip("/") + "/"
    return [name[len(prefix):] for name in fs.find(key) if name.startswith(prefix)]


def remove_tree(path: str) -> None:
    """Remove the folder ``path`` and everything in it (what is gone already is ignored)."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, key = filesystem(path)
    try:
        fs.rm(key, recursive=True)
    except FileNotFoundError:
        pass


def remove_file(path: str) -> None:
    if not is_url(path):
        os.remove(path)
        return
    fs, key = filesystem(path)
    fs.rm_file(key)


def read_bytes(path: str) -> bytes:
    """The content of the file ``path``; FileNotFoundError when there is none."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, key = filesystem(path)
    return fs.cat_file(key)


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def fsync_path(path: str) -> None:
    """Flush a local file or folder to disk (nothing to do for a URL: a PUT is durable)."""
    if is_url(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder under the local ``root`` (and ``root``); nothing for a URL."""
    if is_url(root):
        return
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def replace_file(path: str, data: bytes, temp_name: str) -> None:
    """Replace the file ``path`` by ``data`` atomically: a reader sees the old content or the
    new one. Local: ``temp_name`` (a name in the same folder) written and fsynced, renamed
    over ``path``, the folder fsynced. URL: one PUT of the object."""
    if is_url(path):
        fs, key = filesystem(path)
        fs.pipe_file(key, data)
        return
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, temp_name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(folder)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create the file ``path`` holding ``data`` unless it exists; False when it does.

    Local: ``O_CREAT | O_EXCL``. URL: a conditional PUT (``If-None-Match: *`` on S3, which
    S3, GCS and Azure honour); a file system without one is refused.
    """
    if not is_url(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    fs, key = filesystem(path)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    return True


def temp_name(name: str) -> str:
    """A fresh hidden name beside ``name`` for a temporary file."""
    return f".{name}.{uuid.uuid4().hex}.tmp"
