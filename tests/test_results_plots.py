"""Results on disk (save/load, atomic writes), plots, and the progress callbacks."""

from __future__ import annotations

import io
import json
import os

import dask.array as da
import numpy as np
import pytest
import zarr
from conftest import planted_parts

import dnmf
from dnmf.data import results, zarrio
from dnmf.errors import ParameterError, StoreError
from dnmf.plots import plot_convergence, plot_parts, plot_w_heatmap
from dnmf.run.progress import JsonLog, ProgressBar

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    V, _, H_true = planted_parts(n=240, p=40)
    path = tmp_path_factory.mktemp("v") / "V.zarr"
    zarr.create_array(store=str(path), shape=V.shape, chunks=(60, 40), dtype=V.dtype)[...] = V
    model = dnmf.NMF(3, solver="hals", max_iter=40, tol=0, random_state=0)
    W = model.fit_transform(str(path))
    return model, W, V, H_true, path


def test_save_and_load_result_round_trip(tmp_path, fitted):
    model, W, V, H_true, path = fitted
    assert isinstance(W, da.Array)
    out = results.save_result(tmp_path / "r.zarr", model, W, input_path=str(path))
    res = results.load_result(out)
    np.testing.assert_array_equal(res.W.compute(), W.compute())
    np.testing.assert_array_equal(res.H, model.components_)
    group = zarr.open_group(str(out), mode="r")
    assert group["W"].chunks == (60, 3)  # written chunk by chunk in W's own row blocks
    assert type(group["W"].compressors[0]).__name__ == "BloscCodec"
    assert res.stop_reason == "max_iter" and res.n_iter == 40 and res.attrs["input_path"] == str(path)
    assert res.attrs["config"]["n_components"] == 3 and "callbacks" not in res.attrs["config"]
    np.testing.assert_allclose(res.relative_error, np.linalg.norm(V - W.compute() @ model.components_) / np.linalg.norm(V), rtol=1e-6)
    # The model rebuilt from a result transforms new rows with the stored H.
    W_new = dnmf.NMF.from_result(res).transform(V[:50])
    assert W_new.shape == (50, 3) and np.linalg.norm(V[:50] - W_new @ res.H) / np.linalg.norm(V[:50]) < 0.05


def test_a_failed_save_leaves_the_old_result(tmp_path, fitted, monkeypatch):
    model, W, *_ = fitted
    out = results.save_result(tmp_path / "r.zarr", model, W)
    before = sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file())

    def broken(group, name, X, row_chunk=None):
        raise OSError("disk full")

    monkeypatch.setattr(results, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        results.save_result(out, model, W, overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert os.listdir(tmp_path) == ["r.zarr"]
    with pytest.raises(StoreError, match="already exists"):
        results.save_result(out, model, W)


def test_load_result_rejects_what_is_not_a_result(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        results.load_result(tmp_path / "none.zarr")
    zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(2, 2), dtype="f8")
    with pytest.raises(StoreError, match="not a dnmf result"):
        results.load_result(tmp_path / "a.zarr")


def test_json_safe():
    assert results.json_safe({"a": np.float32(1.5), "b": (np.int64(2), float("nan")), "c": np.bool_(True)}) == {
        "a": 1.5, "b": [2, None], "c": True
    }


def test_json_safe_can_keep_non_finite_floats():
    kept = zarrio.json_safe({"a": (np.float32("inf"), float("nan")), 3: object}, keep_nonfinite=True)
    assert kept["a"][0] == float("inf") and np.isnan(kept["a"][1]) and kept["3"] == repr(object)


def test_plots_write_pngs(tmp_path, fitted):
    model, W, _, H_true, _ = fitted
    for path in (
        plot_convergence(model.history_, tmp_path / "c.png"),
        plot_parts(model.components_, tmp_path / "p.png"),
        plot_parts(np.vstack([H_true, H_true]), tmp_path / "img.png", image_shape=(5, 8)),
        plot_w_heatmap(W, tmp_path / "w.png", max_rows=100),
        plot_w_heatmap(W.compute(), tmp_path / "w2.png"),
    ):
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    with pytest.raises(ParameterError, match="40 pixels"):
        plot_parts(H_true, tmp_path / "bad.png", image_shape=(6, 6))
    with pytest.raises(ParameterError, match="empty"):
        plot_convergence([], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_progress_bar_and_json_log_follow_the_fit(tmp_path, capsys):
    V, _, _ = planted_parts(n=120, p=40)

    stream = io.StringIO()
    bar, log = ProgressBar(15, file=stream), JsonLog(tmp_path / "log.jsonl")
    model = dnmf.NMF(3, max_iter=15, tol=0, random_state=0, callbacks=[bar, log])
    model.fit(V)
    bar.close()
    log.close()
    assert bar._bar.n == 15 and "15/15" in stream.getvalue() and "objective=" in stream.getvalue()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["objective"] for row in rows] == [row["objective"] for row in model.history_]
