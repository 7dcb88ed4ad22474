"""``dnmf info``, ``dnmf convert`` and ``dnmf plot``: describe, convert and draw the files
dnmf reads and writes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from ..errors import DnmfError

PLOT_NAMES = ("convergence.png", "parts.png", "w_heatmap.png")


@click.command()
@click.argument("path", type=click.Path())
@click.option("--dataset", default=None, help="Dataset inside an HDF5 file.")
@click.option("--layer", default=None, help="Layer of an AnnData store (.h5ad or .zarr) instead of X.")
@click.option("--no-scan", is_flag=True, help="Skip the pass over a matrix's values (nnz, negative, NaN).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(path, dataset, layer, no_scan, as_json):
    """Describe a matrix (shape, dtype, chunks, size, whether it is sparse on disk, density, bad
    entries) or a dnmf result."""
    from ..data.inspect import describe

    facts = describe(path, dataset=dataset, scan=not no_scan, layer=layer)
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        click.echo(f"{key:<{width}}  {value}")


@click.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST.zarr", type=click.Path())
@click.option("--chunks", type=int, default=None, help="Rows per Zarr chunk (default: ~64 MiB, at least 4 chunks).")
@click.option("--dataset", default=None, help="Dataset inside an HDF5 file (or SRC.h5:/dataset), or member of an .npz.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it is an array or result dnmf wrote.")
@click.option("--dense/--sparse", "dense", default=None,
              help="Write a dense Zarr array, or a sparse store (AnnData's CSR encoding). Default: sparse "
              "for sparse sources (.npz, coordinate .mtx, CSR/CSC groups), dense otherwise.")
@click.option("--compress/--no-compress", "compressed", default=True, show_default=True,
              help="Blosc (LZ4HC) chunks, or raw ones: larger on disk, but read without decoding (a pass over a "
              "sparse store in about half the time).")
def convert(src, dst, chunks, dataset, quiet, overwrite, dense, compressed):
    """Write SRC (.npy, .npz, .mtx(.gz), .csv/.tsv, HDF5, 10x .h5, .h5ad, an AnnData .zarr's
    sparse matrix) as a Zarr store DST that dnmf reads by row blocks: a row-chunked array, or a
    sparse store for sparse sources.

    Streamed by row blocks; Matrix Market coordinate files and CSC matrices are gathered by
    rows out of core.
    """
    from tqdm.auto import tqdm

    from ..data import convert as conv

    bars = []

    def progress(rows: int) -> None:
        if not bars:  # drawn at the first block, so an early error shows no bar
            bars.append(tqdm(desc="convert", unit="rows", disable=quiet, file=sys.stderr))
        bars[0].update(rows)

    started = time.perf_counter()
    try:
        facts = conv.convert(src, dst, chunks=chunks, dataset=dataset, overwrite=overwrite, progress=progress,
                             dense=dense, compressed=compressed)
    finally:
        for bar in bars:
            bar.close()
    n, p = facts["shape"]
    note = f" ({facts['note']})" if facts["note"] else ""
    layout = f"sparse, {facts['nnz']} entries" if facts.get("sparse") else f"chunks {facts['chunks'][0]} rows"
    click.echo(f"{n} x {p} {facts['dtype']}, {layout}, {time.perf_counter() - started:.1f} s -> {dst}{note}")


@click.command()
@click.argument("result", type=click.Path())
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the PNGs (default: RESULT's name with -plots).")
@click.option("--image-shape", default=None, metavar="HxW", help="Show the parts as HxW images, e.g. 8x8.")
@click.option("--max-rows", type=click.IntRange(min=1), default=400, help="Rows of W sampled for the heatmap.")
@click.option("--overwrite", is_flag=True, help="Replace PNGs that exist.")
def plot(result, out_dir, image_shape, max_rows, overwrite):
    """Write PNGs of a result: convergence, the parts (rows of H), a sample of W."""
    from ..data.outputs import check_output
    from ..data.results import load_result
    from ..plots import parse_image_shape

    shape = parse_image_shape(image_shape) if image_shape else None
    out_dir = Path(out_dir) if out_dir is not None else Path(str(result).rstrip("/").removesuffix(".zarr") + "-plots")
    check_output(out_dir, protected={"result": result}, kind="folder", label="--out-dir")
    res = load_result(result)
    paths = write_plots(res.history, res.H, res.W, out_dir, shape, max_rows, overwrite)
    for p in paths:
        click.echo(str(p))


def write_plots(history, H, W, out_dir: Path, image_shape, max_rows: int, overwrite: bool) -> list[Path]:
    """convergence.png, parts.png and w_heatmap.png in ``out_dir``; existing ones only with overwrite."""
    from ..plots import plot_convergence, plot_parts, plot_w_heatmap

    existing = [n for n in PLOT_NAMES if (out_dir / n).exists()]
    if existing and not overwrite:
        raise DnmfError(f"{existing[0]!r} already exists in {str(out_dir)!r}; choose another --out-dir or pass --overwrite.")
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = (
        lambda p: plot_convergence(history, p),
        lambda p: plot_parts(H, p, image_shape=image_shape),
        lambda p: plot_w_heatmap(W, p, max_rows=max_rows),
    )
    written = []
    for name, draw in zip(PLOT_NAMES, drawers):
        tmp = out_dir / f".{name}.tmp.png"
        try:
            draw(tmp)
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(out_dir / name)
    return written
