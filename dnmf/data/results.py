"""A fitted factorization on disk: a Zarr group with W, H and what produced them.

Layout of a result ``RESULT.zarr``::

    W        (n_samples, n_components)  written block by block from the workers
    H        (n_components, n_features)
    attrs    dnmf_result (format version), config, history, stop_reason, n_iter,
             reconstruction_err, data_norm, seed, init, input_path, versions, created

A result is written through :func:`dnmf.data.outputs.atomic_directory`: to a hidden sibling
first, renamed into place only when complete, and never over anything that is not dnmf's own.
On an object store (an fsspec URL) it is written in place
(:func:`dnmf.data.outputs.object_store_directory`), its ``dnmf_result`` attribute last, so a
result cut short is never read as one.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from ..errors import StoreError, expected, no_such_path
from .outputs import atomic_directory, mark_written, object_store_directory
from .zarrio import json_safe, library_versions, write_array

RESULT_FORMAT = 1


def model_config(model) -> dict:
    """The estimator's parameters, JSON-safe; callbacks (run-time only) are left out."""
    params = dict(model.get_params())
    params.pop("callbacks", None)
    return json_safe(params)


def save_result(path, model, W, input_path=None, overwrite: bool = False) -> Path | str:
    """Write a fitted model's W and H and its record to the Zarr group ``path``.

    Parameters
    ----------
    path : str or Path
        The result to create (a directory, by convention ``*.zarr``).
    model : dnmf.NMF
        A fitted estimator (``components_``, ``history_``, ...).
    W : ndarray or dask array of shape (n_samples, n_components)
        What ``fit_transform`` returned. A dask W is written chunk by chunk, never gathered.
    input_path : str, optional
        Where V came from, recorded for ``dnmf info`` and resume; ``path`` may not be, lie
        inside or hold it.
    overwrite : bool
        Replace an existing ``path`` that dnmf wrote (an earlier result or array, or an empty
        folder), only once the new result is complete; see :func:`dnmf.data.outputs.check_output`.
    """
    import zarr

    H = np.asarray(model.components_)
    if W.ndim != 2 or W.shape[1] != H.shape[0]:
        raise StoreError(expected(f"W with {H.shape[0]} columns, as H has rows", f"shape {W.shape}"))
    url = "://" in str(path)
    if url:  # an object store: no rename; written in place, "dnmf_result" last
        target = object_store_directory(str(path), overwrite, protected={"input": input_path})
    else:
        target = atomic_directory(path, overwrite, protected={"input": input_path})
    with target as tmp:
        group = zarr.open_group(str(tmp), mode="a")
        write_array(group, "W", W)
        write_array(group, "H", H)
        data_norm = getattr(model, "data_norm_", None)
        group.attrs.update(
            json_safe(
                {
                    "dnmf_result": RESULT_FORMAT,
                    "config": model_config(model),
                    "history": list(model.history_),
                    "stop_reason": model.stop_reason_,
                    "n_iter": model.n_iter_,
                    "n_components": model.n_components_,
                    "reconstruction_err": model.reconstruction_err_,
                    "data_norm": data_norm,
                    "seed": getattr(model, "seed_", None),
                    "init": getattr(model, "init_", None),
                    "input_path": None if input_path is None else str(input_path),
                    "versions": library_versions(),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
            )
        )
    return Path(path)


@dataclass(frozen=True)
class Result:
    """A result read back by :func:`load_result`.

    W : dask array (n_samples, n_components), lazy over the stored chunks.
    H : ndarray (n_components, n_features).
    attrs : everything else that was recorded (see the module docstring).
    """

    path: str
    W: da.Array
    H: np.ndarray
    attrs: dict

    @property
    def config(self) -> dict:
        return self.attrs.get("config", {})

    @property
    def history(self) -> list[dict]:
        return self.attrs.get("history", [])

    @property
    def stop_reason(self) -> str | None:
        return self.attrs.get("stop_reason")

    @property
    def n_iter(self) -> int:
        return int(self.attrs.get("n_iter") or 0)

    @property
    def reconstruction_err(self) -> float | None:
        return self.attrs.get("reconstruction_err")

    @property
    def relative_error(self) -> float | None:
        """‖V − WH‖ / ‖V‖ for the Frobenius loss when ‖V‖ was recorded, else None."""
        norm, err = self.attrs.get("data_norm"), self.reconstruction_err
        beta = self.config.get("beta_loss", "frobenius")
        if not norm or err is None or beta not in ("frobenius", 2, 2.0):
            return None
        return err / norm


def is_result(path) -> bool:
    """Whether ``path`` is a Zarr group written by :func:`save_result`."""
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception:  # not Zarr at all
        return False
    return isinstance(node, zarr.Group) and "dnmf_result" in node.attrs


def load_result(path) -> Result:
    """Open a result written by :func:`save_result` (W lazily, H in memory)."""
    import zarr

    if not Path(path).exists() and "://" not in str(path):
        raise StoreError(no_such_path("dnmf result", str(path)))
    if not is_result(path):
        raise StoreError(f"{str(path)!r} is not a dnmf result (a Zarr group written by `dnmf fit`).")
    group = zarr.open_group(str(path), mode="r")
    return Result(str(path), da.from_zarr(group["W"]), np.asarray(group["H"][...]), dict(group.attrs))


def save_array(path, X, overwrite: bool = False) -> Path:
    """Write X (numpy or dask, 2-D) as a new Zarr array at ``path``, chunk by chunk for dask.

    Parameters
    ----------
    path : str or Path
        The array to create; it carries the :data:`~dnmf.data.outputs.MARKER` attribute.
    X : ndarray or dask array of shape (n, p)
        What to write.
    overwrite : bool
        Replace an existing ``path`` that dnmf wrote, only once the new array is complete.
    """
    with atomic_directory(path, overwrite) as tmp:
        mark_written(write_array(str(tmp), None, X), "save_array")
    return Path(path)


# ---------------------------------------------------------------------------
# A fit as a new AnnData: obsm["X_nmf"] = W, varm["NMF_components"] = Hᵀ

ANNDATA_W, ANNDATA_H = "X_nmf", "NMF_components"


def save_anndata(path, model, W, like=None, overwrite: bool = False) -> Path:
    """Write a fit as a new AnnData (``.h5ad``, or an AnnData ``.zarr`` store) at ``path``.

    The new AnnData holds no X: ``obsm["X_nmf"]`` is W (n_samples, n_components), written
    block by block for a dask W; ``varm["NMF_components"]`` is Hᵀ (n_features,
    n_components); ``uns["dnmf"]`` the fit's record. Its ``obs`` and ``var`` are those of
    ``like`` (the input: an AnnData object, or the path of a ``.h5ad`` file or AnnData
    ``.zarr`` store, read and never written) when given, so it lines up with the input cell
    by cell and gene by gene.

    ``path`` is checked like every output (:func:`dnmf.data.outputs.check_output`): it may not
    be, lie inside or hold the input, and an existing one is replaced only with ``overwrite``
    when dnmf wrote it. It is written to a hidden sibling, renamed into place when complete.
    """
    like_path = _like_path(like)
    record = {
        "config": model_config(model), "n_iter": model.n_iter_, "stop_reason": model.stop_reason_,
        "reconstruction_err": model.reconstruction_err_, "seed": getattr(model, "seed_", None),
        "input_path": None if like_path is None else str(like_path), "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_anndata(path, W, model.components_, like=like, uns={"record": _json_text(record)},
                         overwrite=overwrite)


def write_anndata(path, W, H, like=None, uns: dict | None = None, overwrite: bool = False,
                  protected: dict | None = None) -> Path:
    """Write W and H as a new AnnData with no X at ``path`` (``.h5ad`` or ``.zarr``).

    ``obsm["X_nmf"]`` = W (n_samples, K; numpy, or dask written block by block),
    ``varm["NMF_components"]`` = Hᵀ (n_features, K), ``uns["dnmf"]`` = ``uns`` (values
    AnnData can store) with ``written_by = "dnmf"``, which marks the file as dnmf's own.
    ``obs`` / ``var`` come from ``like`` (see :func:`anndata_frames`), numbered when None.
    ``path`` is checked like every output, never the input ``like`` nor anything in
    ``protected`` (role: path); it is written to a hidden sibling and renamed into place when
    complete, replacing an earlier one only with ``overwrite`` and only when dnmf wrote it.
    """
    import anndata

    H = np.asarray(H)
    if W.ndim != 2 or W.shape[1] != H.shape[0]:
        raise StoreError(expected(f"W with {H.shape[0]} columns, as H has rows", f"shape {W.shape}"))
    text = str(path)
    if not text.endswith((".h5ad", ".zarr")):
        raise StoreError(expected("an AnnData output path ending in .h5ad or .zarr", text))
    like_path = _like_path(like)
    obs, var = anndata_frames(like, W.shape[0], H.shape[1])
    adata = anndata.AnnData(
        obs=obs, var=var, obsm={ANNDATA_W: W}, varm={ANNDATA_H: H.T.copy()},
        uns={"dnmf": {**(uns or {}), "written_by": "dnmf"}},
    )
    protect = dict(protected or {})
    if like_path is not None:
        protect["input" if protect.get("input") in (None, like_path) else "AnnData input"] = like_path
    with atomic_directory(text, overwrite, protected=protect, owned=anndata_written_by_dnmf) as tmp:
        if text.endswith(".h5ad"):
            adata.write_h5ad(tmp)
        else:
            adata.write_zarr(tmp)
    return Path(text)


def _like_path(like):
    """The file an AnnData ``like`` was read from (a path, a backed object), else None."""
    if isinstance(like, (str, Path)):
        return like
    if isinstance(like, tuple):
        return None
    return getattr(like, "filename", None)


def _json_text(record: dict) -> str:
    import json

    return json.dumps(json_safe(record))


def anndata_frames(like, n: int, p: int):
    """obs and var (pandas DataFrames) of ``like``: an AnnData object (copied), the path of a
    ``.h5ad`` file or AnnData ``.zarr`` store (only obs and var are read, never X), an
    ``(obs, var)`` pair, or None for plain numbered ones; their lengths must be n and p."""
    import pandas as pd

    if like is None:
        return pd.DataFrame(index=[str(i) for i in range(n)]), pd.DataFrame(index=[str(j) for j in range(p)])
    if isinstance(like, (str, Path)):
        from anndata.io import read_elem  # only obs and var: X is never read

        where = str(like)
        if where.endswith(".h5ad"):
            import h5py

            with h5py.File(where, "r") as f:
                obs, var = read_elem(f["obs"]), read_elem(f["var"])
        else:
            import zarr

            group = zarr.open_group(where, mode="r")
            obs, var = read_elem(group["obs"]), read_elem(group["var"])
    elif isinstance(like, tuple):
        obs, var = like
    else:
        obs, var = like.obs.copy(), like.var.copy()
    if (len(obs), len(var)) != (n, p):
        raise StoreError(expected(f"an AnnData of {n} x {p} like the fit", f"{len(obs)} x {len(var)}"))
    return obs, var


def anndata_written_by_dnmf(path) -> bool:
    """Whether the AnnData at ``path`` is one :func:`write_anndata` wrote (so --overwrite may replace it)."""
    try:
        if str(path).endswith(".h5ad"):
            import h5py

            with h5py.File(str(path), "r") as f:
                node = f.get("uns/dnmf/written_by")
                return node is not None and node[()] in (b"dnmf", "dnmf")
        import zarr

        return zarr.open_group(str(path), mode="r")["uns/dnmf/written_by"][()] == "dnmf"
    except Exception:
        return False
