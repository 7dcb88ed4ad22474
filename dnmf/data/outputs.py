"""Where dnmf may write: one guard for every output path, and the atomic directory writer.

Nothing the user owns is ever modified or deleted by an output path. :func:`check_output`
refuses, before anything is written, an output that

* is empty (an unset shell variable), or is the current folder or a parent of it;
* is, lies inside, or holds (is a parent of) any path the command reads: its input matrix,
  the result it transforms, a checkpoint (compared as resolved real paths, so symlinks and
  ``..`` do not get around it; URLs are compared as strings);
* lies inside an existing Zarr store or checkpoint, whoever's it is;
* exists, unless ``overwrite`` is given and the path is provably dnmf's own: an earlier
  result, a Zarr array dnmf wrote (it carries the :data:`MARKER` attribute), or an empty
  folder. A checkpoint is never replaced.

Every directory dnmf writes goes to a hidden sibling first and is renamed into place only
when complete (:func:`atomic_directory`), so a failed or interrupted write leaves the target
as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..errors import ParameterError, StoreError, expected
from . import folders

MARKER = "dnmf"
"""The attribute of a Zarr array dnmf wrote: ``{"written_by": FUNCTION}``."""

KINDS = ("store", "log", "folder")

ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")
"""The files that make a folder a Zarr store (format 3, and format 2's array and group)."""


def mark_written(node, written_by: str) -> None:
    """Record on a Zarr array or group that dnmf wrote it, so ``overwrite`` may replace it later."""
    node.attrs[MARKER] = {"written_by": written_by}


def written_by_dnmf(path) -> bool:
    """Whether ``path`` is provably dnmf's own: an empty folder, a result, or a marked Zarr array.

    A checkpoint is never dnmf's to replace: it is what a fit resumes from.
    """
    import zarr

    from ..run.checkpoint import has_checkpoint

    path = os.fspath(path)
    if os.path.isdir(path) and not os.listdir(path):
        return True
    if has_checkpoint(path):
        return False
    try:
        attrs = zarr.open(store=path, mode="r").attrs
    except Exception:  # not Zarr at all
        return False
    return "dnmf_result" in attrs or MARKER in attrs


def _is_url(path: str) -> bool:
    return "://" in path


def _url_exists(url: str) -> bool:
    """Whether ``url`` exists, as far as can be told before the command starts: a store that
    cannot be reached yet (no credentials, no network) is checked again when it is written
    (:func:`object_store_directory`), which reports what is wrong."""
    try:
        return folders.exists(url)
    except Exception:  # noqa: BLE001 - any error of the store's client library
        return False


def _real(path: str) -> str:
    """The resolved real path (a URL as it is, without a trailing slash)."""
    return path.rstrip("/") if _is_url(path) else os.path.realpath(path)


def _contains(folder: str, path: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (both resolved; never when they are equal)."""
    return path != folder and path.startswith(folder.rstrip("/" + os.sep) + ("/" if _is_url(folder) else os.sep))


def _relation(out: str, other: str) -> str | None:
    """How the resolved ``out`` stands to the resolved ``other``: 'is', 'lies inside', 'holds' or None."""
    if out == other:
        return "is"
    if _contains(other, out):
        return "lies inside"
    if _contains(out, other):
        return "holds"
    return None


def _enclosing_store(path: str) -> str | None:
    """The nearest folder above the resolved ``path`` that is a Zarr store or a checkpoint, if any."""
    from ..run.checkpoint import has_checkpoint

    for folder in Path(path).parents:
        if has_checkpoint(folder) or any((folder / name).exists() for name in ZARR_METADATA):
            return str(folder)
    return None


def _is_json_lines(path: str) -> bool:
    """Whether the file at ``path`` is empty or starts with a JSON object line (a dnmf log)."""
    with open(path, encoding="utf-8", errors="replace") as file:
        first = file.readline()
    if not first:
        return True
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def check_output(
    path,
    *,
    protected: Mapping[str, object] | None = None,
    overwrite: bool = False,
    kind: str = "store",
    label: str = "output",
    owned: Callable[[str], bool] = written_by_dnmf,
) -> None:
    """Refuse an output path that could modify or delete anything the user owns.

    Call it for every output of a command, with every path the command reads, before
    anything is written.

    Parameters
    ----------
    path : str or Path
        The output: a local path or a URL.
    protected : mapping of str to path, optional
        What the command reads, by role (``{"input": ..., "checkpoint": ...}``); None values
        are skipped. The output may not be, lie inside, or hold any of them.
    overwrite : bool
        For ``kind="store"``: an existing ``path`` may be replaced when ``owned`` says it is
        dnmf's own. Without it, an existing ``path`` is refused.
    kind : {"store", "log", "folder"}
        ``"store"``: a file or directory written whole (a result, an array); ``"log"``: a
        file appended to, which may exist when it is a JSON-lines log; ``"folder"``: a folder
        that named files are written into, which may exist.
    label : str
        How the message names the output (``"--out"``, ``"DST"``, ...).
    owned : callable, default :func:`written_by_dnmf`
        Whether an existing ``path`` is dnmf's own, so that ``overwrite`` may replace it.

    Raises
    ------
    StoreError
        One sentence naming the path, what is wrong and what to do.
    """
    if kind not in KINDS:
        raise ParameterError(expected(f"kind one of {KINDS}", kind))
    text = os.fspath(path)
    if not text.strip():
        raise StoreError(f"The {label} path is empty ({text!r}), perhaps an unset shell variable; give the path to write.")
    out, local = _real(text), not _is_url(text)
    if local and (out == (cwd := os.path.realpath(os.getcwd())) or _contains(out, cwd)):
        raise StoreError(f"The {label} path {text!r} is the current folder or holds it; give a new path to write.")
    for role, other in (protected or {}).items():
        if other is None or not os.fspath(other).strip():
            continue
        relation = _relation(out, _real(os.fspath(other)))
        if relation is not None:
            raise StoreError(
                f"The {label} path {text!r} {relation} the {role} {os.fspath(other)!r}, and dnmf never writes "
                "over, into or around what a command uses; choose a path beside it."
            )
    if local and (store := _enclosing_store(out)) is not None:
        raise StoreError(
            f"The {label} path {text!r} lies inside {store!r}, a Zarr store or checkpoint, and dnmf never writes "
            "into one; choose a path beside it."
        )
    if not local:
        if kind == "store" and _url_exists(text):
            if not overwrite:
                raise StoreError(f"{text!r} already exists; choose another output path or pass --overwrite.")
            if not owned(text):
                raise StoreError(
                    f"{text!r} exists and is not something dnmf wrote (an earlier result or array), so --overwrite "
                    "will not replace it; move it away yourself or choose another output path."
                )
        return
    if not os.path.lexists(text):
        return
    if kind == "log" and not (os.path.isfile(text) and _is_json_lines(text)):
        raise StoreError(f"The {label} path {text!r} exists and is not a JSON-lines log; choose a new file for the log.")
    if kind == "store" and not overwrite:
        raise StoreError(f"{text!r} already exists; choose another output path or pass --overwrite.")
    if kind == "store" and not owned(text):
        raise StoreError(
            f"{text!r} exists and is not something dnmf wrote (an earlier result or array, or an empty folder), "
            "so --overwrite will not replace it; move it away yourself or choose another output path."
        )


@contextlib.contextmanager
def atomic_directory(
    path,
    overwrite: bool = False,
    *,
    protected: Mapping[str, object] | None = None,
    owned: Callable[[str], bool] = written_by_dnmf,
) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``path`` to write into; rename it to ``path`` on success.

    ``path`` is checked first by :func:`check_output` (with ``protected``, ``overwrite`` and
    ``owned``). On an exception the sibling is removed and ``path`` (if it existed) is
    untouched. With ``overwrite``, an existing ``path`` is replaced only after the new one is
    complete.
    """
    check_output(path, protected=protected, overwrite=overwrite, owned=owned)
    path = Path(path).absolute()
    if not path.parent.is_dir():
        raise StoreError(f"Cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist.")
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if os.path.lexists(path):
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def object_store_directory(
    url: str,
    overwrite: bool = False,
    *,
    protected: Mapping[str, object] | None = None,
    written_by: str = "save_result",
) -> Iterator[str]:
    """:func:`atomic_directory` for an fsspec URL (``s3://bucket/result.zarr``), where nothing
    can be renamed: yield ``url`` itself, a Zarr group already marked as dnmf's.

    ``url`` is checked by :func:`check_output` (with ``protected``); an existing ``url`` is
    refused unless ``overwrite`` is given and it is dnmf's own (:func:`written_by_dnmf`, a
    result cut short included: the group carries :data:`MARKER` from its first write), and is
    then deleted first. Write the attribute that makes the group complete (a result's
    ``dnmf_result``) last: until then no reader takes it for a finished result. On an
    exception what was written is removed.
    """
    import zarr

    check_output(url, protected=protected, overwrite=overwrite)
    if folders.exists(url):
        if not overwrite:
            raise StoreError(f"{url!r} already exists; choose another output path or pass --overwrite.")
        if not written_by_dnmf(url):
            raise StoreError(
                f"{url!r} exists and is not something dnmf wrote (an earlier result or array), so --overwrite "
                "will not replace it; move it away yourself or choose another output path."
            )
        folders.remove_tree(url)
    mark_written(zarr.open_group(url, mode="w"), written_by)
    try:
        yield url
    except BaseException:
        folders.remove_tree(url)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
