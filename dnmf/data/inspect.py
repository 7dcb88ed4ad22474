"""What ``dnmf info`` says about a path: a dnmf result, a Zarr array, or a matrix file."""

from __future__ import annotations

import os

from .convert import detect_format, human_bytes, scan_source, size_on_disk, split_dataset
from ..errors import StoreError


def describe(path, dataset: str | None = None, scan: bool = True, layer: str | None = None) -> dict:
    """An ordered dict of facts about ``path`` (values are short strings or numbers); ``layer``
    describes that layer of an AnnData store instead of its X."""
    from .results import is_result

    src, inline = split_dataset(os.fspath(path))
    if "://" not in src and not os.path.exists(src):
        raise StoreError(f"Nothing at {src!r}: the path does not exist.")
    if is_result(src):
        return describe_result(src)
    fmt = detect_format(src)
    if fmt == "zarr" or (fmt == "h5ad" and dataset is None and inline is None):
        return describe_store(src, scan, layer)
    return describe_file(path, dataset, scan)


def describe_result(path) -> dict:
    from .results import load_result

    res = load_result(path)
    config, history = res.config, res.history
    facts = {
        "kind": "dnmf result",
        "path": str(path),
        "rank": res.H.shape[0],
        "W": f"{res.W.shape[0]} x {res.W.shape[1]} {res.W.dtype}",
        "H": f"{res.H.shape[0]} x {res.H.shape[1]} {res.H.dtype}",
        "solver": config.get("solver"),
        "beta_loss": config.get("beta_loss"),
        "init": res.attrs.get("init"),
        "seed": res.attrs.get("seed"),
        "iterations": res.n_iter,
        "stop_reason": res.stop_reason,
        "reconstruction_err": _fmt(res.reconstruction_err),
    }
    if res.relative_error is not None:
        facts["relative_error"] = _fmt(res.relative_error)
    if history:
        facts["objective"] = _fmt(history[-1].get("objective"))
        facts["seconds"] = f"{sum(row.get('seconds') or 0 for row in history):.1f}"
    facts["input"] = res.attrs.get("input_path")
    facts["created"] = res.attrs.get("created")
    facts["versions"] = ", ".join(f"{k} {v}" for k, v in (res.attrs.get("versions") or {}).items())
    facts["size_on_disk"] = _size(path)
    return facts


def describe_store(path, scan: bool, layer: str | None = None) -> dict:
    """A Zarr array, a sparse Zarr store, an AnnData store (.zarr, .h5ad): the matrix dnmf
    would factor, whether it is sparse on disk, and (``scan``) one pass over its values."""
    import zarr

    from .ondisk import CSC, DiskMatrix
    from .store import open_matrix, resolve_input, scan_matrix

    node, _ = resolve_input(str(path), layer)
    if isinstance(node, zarr.Array):
        facts = {
            "kind": "Zarr array" if str(node.path) in ("", "/") else "AnnData store (dense)",
            "path": str(path),
            "matrix": f"/{node.path}" if str(node.path) not in ("", "/") else None,
            "shape": " x ".join(map(str, node.shape)),
            "dtype": str(node.dtype),
            "sparse_on_disk": "no (dense array)",
            "chunks": " x ".join(map(str, node.chunks)),
            "compressors": ", ".join(type(c).__name__ for c in (node.compressors or ())) or "none",
            "size_on_disk": _size(path),
        }
        facts = {k: v for k, v in facts.items() if v is not None}
    else:
        assert isinstance(node, DiskMatrix)
        anndata = bool(node.group)
        n, p = node.shape
        facts = {
            "kind": ("AnnData store" if anndata else "sparse Zarr store") if node.backend == "zarr" else "AnnData .h5ad file",
            "path": str(path),
            "matrix": f"/{node.group}" if node.group else None,
            "shape": f"{n} x {p}",
            "dtype": str(node.dtype),
            "sparse_on_disk": f"yes ({node.encoding.upper()})" if node.sparse else "no (dense array)",
            "stored_entries": f"{node.nnz} ({100 * node.density:.3g}% of entries)",
            "size_on_disk": _size(path),
        }
        facts = {k: v for k, v in facts.items() if v is not None}
        if node.encoding == CSC:
            facts["note"] = "stored by columns: dnmf convert it once to CSR before fitting"
            scan = False
    if scan:
        facts.update(_scan_facts(scan_matrix(open_matrix(node))))
    return facts


def describe_file(path, dataset, scan: bool) -> dict:
    src, _ = split_dataset(os.fspath(path))
    facts = {"kind": f"{detect_format(src)} file", "path": str(path), "size_on_disk": _size(src)}
    if scan:
        stats, shape, dtype, _ = scan_source(path, dataset)
        facts.update({"shape": f"{shape[0]} x {shape[1]}", "dtype": str(dtype)})
        facts.update(_scan_facts(stats))
    return facts


def _scan_facts(stats) -> dict:
    n_cells = stats.shape[0] * stats.shape[1]
    facts = {
        "nnz": f"{stats.nnz} ({100 * stats.nnz / n_cells:.3g}% of entries)",
        "density": f"{stats.nnz / n_cells:.4g}",
        "negative": _bad(stats.n_negative, stats.first_negative),
        "nan_or_inf": _bad(stats.n_nonfinite, stats.first_nonfinite),
        "sum": _fmt(stats.v_sum),
        "frobenius_norm": _fmt(stats.v_sq**0.5),
    }
    facts["nmf_ready"] = "yes" if not (stats.n_negative or stats.n_nonfinite) and stats.v_sum > 0 else "no"
    return facts


def _bad(count: int, first) -> str:
    return "0" if not count else f"{count} (first at row, column {tuple(int(i) for i in first)})"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _size(path) -> str:
    return human_bytes(size_on_disk(path))
