"""The dnmf command line, driven through click's CliRunner and as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.cli import main
from dnmf.data.results import load_result

from conftest import best_cosines, one_line_error, planted_parts, tree_digest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--scheduler", "threads", "--quiet"]


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_subprocess(*args: str, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "dnmf", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def parts_zarr(tmp_path_factory):
    V, _, H_true = planted_parts(n=400, p=40)
    path = tmp_path_factory.mktemp("data") / "V.zarr"
    zarr.create_array(store=str(path), shape=V.shape, chunks=(100, 40), dtype=V.dtype)[...] = V
    return path, V, H_true


def test_fit_info_plot_transform(tmp_path, parts_zarr):
    path, V, H_true = parts_zarr
    out = tmp_path / "res.zarr"
    log = tmp_path / "log.jsonl"
    fit = run_cli("fit", path, "--rank", 3, "--out", out, "--solver", "hals", "--max-iter", 60, "--seed", 2,
                  "--log-json", log, *FAST)
    assert fit.exit_code == 0, fit.output + fit.stderr
    assert "rank 3:" in fit.stdout and "relative error" in fit.stdout

    # The CLI runs the library's fit: same settings, same factors, bit for bit.
    model = dnmf.NMF(3, solver="hals", max_iter=60, random_state=2)
    with pytest.warns(ConvergenceWarning):
        W = model.fit_transform(str(path))
    res = load_result(out)
    np.testing.assert_array_equal(res.H, model.components_)
    np.testing.assert_array_equal(res.W.compute(), W.compute())
    assert res.attrs["config"]["solver"] == "hals" and res.attrs["input_path"] == str(path)
    timeless = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert timeless(res.history) == timeless(model.history_) and res.n_iter == model.n_iter_
    assert set(res.attrs["versions"]) == {"dnmf", "dask", "zarr", "numpy"}
    assert best_cosines(res.H, H_true).min() > 0.98
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["iteration"] for row in rows] == list(range(1, model.n_iter_ + 1))

    info = run_cli("info", out)
    assert info.exit_code == 0 and "dnmf result" in info.stdout and "stop_reason" in info.stdout
    facts = json.loads(run_cli("info", out, "--json").stdout)
    assert facts["iterations"] == model.n_iter_ and facts["rank"] == 3 and facts["stop_reason"] == "max_iter"
    assert float(facts["relative_error"]) == pytest.approx(res.relative_error, rel=1e-4)  # printed to 5 digits
    info = run_cli("info", path, "--json")
    facts = json.loads(info.stdout)
    assert facts["shape"] == "400 x 40" and facts["negative"] == "0" and facts["nmf_ready"] == "yes"

    plot = run_cli("plot", out, "--out-dir", tmp_path / "plots")
    assert plot.exit_code == 0, plot.stderr
    for name in ("convergence.png", "parts.png", "w_heatmap.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("plot", out, "--out-dir", tmp_path / "plots")
    assert again.exit_code == 1 and "--overwrite" in one_line_error(again.stderr)

    tr = run_cli("transform", out, path, "--out", tmp_path / "W.zarr", *FAST)
    assert tr.exit_code == 0, tr.stderr
    W_new = zarr.open_array(str(tmp_path / "W.zarr"), mode="r")[...]
    assert W_new.shape == (400, 3) and W_new.min() >= 0
    rel = np.linalg.norm(V - W_new @ res.H) / np.linalg.norm(V)
    assert rel < 1.05 * res.relative_error + 1e-3


def test_fit_on_a_grid_of_chunks(tmp_path, parts_zarr):
    path, V, H_true = parts_zarr
    out = tmp_path / "res.zarr"
    fit = run_cli("fit", path, "--rank", 3, "--out", out, "--max-iter", 30, "--column-chunks", 10, *FAST)
    assert fit.exit_code == 0, fit.output + fit.stderr
    res = load_result(out)
    model = dnmf.NMF(3, max_iter=30, random_state=0, column_chunks=10)
    with pytest.warns(ConvergenceWarning):
        model.fit(str(path))
    assert model.fit_info_["layout"] == "grid" and model.fit_info_["column_blocks"] == 4
    np.testing.assert_array_equal(res.H, model.components_)
    bad = run_cli("fit", path, "--rank", 3, "--out", tmp_path / "x.zarr", "--column-chunks", "wide", *FAST)
    assert bad.exit_code == 2 and "positive number of columns" in bad.output


def test_fit_reads_other_formats_through_a_temporary_zarr(tmp_path):
    V, _, _ = planted_parts(n=120, p=40)
    np.save(tmp_path / "V.npy", V)
    fit = run_cli("fit", tmp_path / "V.npy", "-r", 3, "-o", tmp_path / "r.zarr", "--max-iter", 5, *FAST)
    assert fit.exit_code == 0, fit.stderr
    assert load_result(tmp_path / "r.zarr").attrs["input_path"] == str(tmp_path / "V.npy")
    assert sorted(os.listdir(tmp_path)) == ["V.npy", "r.zarr"]


def test_convert_command_round_trip(tmp_path):
    X = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.save(tmp_path / "X.npy", X)
    result = run_cli("convert", tmp_path / "X.npy", tmp_path / "X.zarr", "--chunks", 5, "--quiet")
    assert result.exit_code == 0 and "12 x 5 float32" in result.stdout
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "X.zarr"), mode="r")[...], X)


def bad_matrix(tmp_path: Path, value: float) -> Path:
    V = np.ones((20, 6))
    V[3, 4] = value
    np.save(tmp_path / "bad.npy", V)
    return tmp_path / "bad.npy"


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda t: ["fit", t / "missing.zarr", "-r", 2, "-o", t / "o.zarr"], "does not exist"),
        (lambda t: ["fit", t / "V.xyz", "-r", 2, "-o", t / "o.zarr"], "Cannot tell the format"),
        (lambda t: ["fit", t / "junk.npy", "-r", 2, "-o", t / "o.zarr"], "not a readable .npy"),
        (lambda t: ["fit", bad_matrix(t, -1.0), "-r", 2, "-o", t / "o.zarr"], "1 negative entries"),
        (lambda t: ["fit", bad_matrix(t, np.nan), "-r", 2, "-o", t / "o.zarr"], "NaN or infinite"),
        (lambda t: ["fit", t / "V.npy", "-r", 0, "-o", t / "o.zarr"], "--rank/-r a positive integer"),
        (lambda t: ["fit", t / "V.npy", "-r", 9, "-o", t / "o.zarr", "--init", "nndsvd"], "Choose a rank between 1 and 6"),
        (lambda t: ["fit", t / "V.npy", "-r", 2, "-o", t / "o.zarr", "--beta-loss", "bogus"], "--beta-loss"),
        (lambda t: ["fit", t / "V.npy", "-r", 2, "-o", t / "o.zarr", "--solver", "hals", "--beta-loss",
                    "kullback-leibler"], "Frobenius loss only"),
        (lambda t: ["fit", t / "V.npy", "-r", 2, "-o", t / "o.zarr", "--scheduler", "local", "--memory-limit",
                    "lots"], "memory_limit"),
        (lambda t: ["info", t / "nowhere"], "does not exist"),
        (lambda t: ["plot", t / "V.npy"], "not a dnmf result"),
        (lambda t: ["transform", t / "V.npy", t / "V.npy", "-o", t / "W.zarr"], "not a dnmf result"),
        (lambda t: ["convert", t / "V.npy", t / "existing.zarr"], "already exists"),
        (lambda t: ["fit", t / "V.npy", "-r", 2, "-o", t / "existing.zarr"], "already exists"),
        (lambda t: ["plot", t / "existing.zarr", "--image-shape", "3x"], "image shape"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_files_alone(tmp_path, make_args, message):
    np.save(tmp_path / "V.npy", np.random.default_rng(0).random((20, 6)))
    (tmp_path / "V.xyz").write_text("1 2 3")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    existing = tmp_path / "existing.zarr"
    fit = run_cli("fit", tmp_path / "V.npy", "-r", 2, "-o", existing, "--max-iter", 3, *FAST)
    assert fit.exit_code == 0, fit.stderr
    args = make_args(tmp_path)
    before = {p.name: tree_digest(p) for p in tmp_path.iterdir()}

    extra = [] if args[0] in ("info", "plot", "convert") else ["--quiet"] if "--scheduler" in args else FAST
    result = run_cli(*args, *extra)

    assert result.exit_code == 1
    assert message in one_line_error(result.stderr)
    assert {p.name: tree_digest(p) for p in tmp_path.iterdir()} == before


def test_info_reports_bad_entries_of_a_file(tmp_path):
    V = np.ones((20, 6))
    V[3, 4], V[7, 1] = -1.0, np.nan
    np.save(tmp_path / "bad.npy", V)
    facts = json.loads(run_cli("info", tmp_path / "bad.npy", "--json").stdout)
    assert facts["negative"] == "1 (first at row, column (3, 4))"
    assert facts["nan_or_inf"] == "1 (first at row, column (7, 1))"
    assert facts["nmf_ready"] == "no" and facts["shape"] == "20 x 6"


def test_unreachable_scheduler(tmp_path):
    import dask

    np.save(tmp_path / "V.npy", np.ones((10, 4)))
    with dask.config.set({"dnmf.connect-timeout": "0.5s"}):
        result = run_cli("fit", tmp_path / "V.npy", "-r", 2, "-o", tmp_path / "o.zarr", "--scheduler",
                         "tcp://127.0.0.1:9", "--quiet")
    assert result.exit_code == 1 and "Cannot reach a Dask scheduler" in one_line_error(result.stderr)
    assert os.listdir(tmp_path) == ["V.npy"]


def test_overwrite_replaces_only_after_success(tmp_path):
    V, _, _ = planted_parts(n=60, p=40)
    np.save(tmp_path / "V.npy", V)
    out = tmp_path / "r.zarr"
    assert run_cli("fit", tmp_path / "V.npy", "-r", 2, "-o", out, "--max-iter", 3, *FAST).exit_code == 0
    before = tree_digest(out)
    bad = run_cli("fit", bad_matrix(tmp_path, -2.0), "-r", 2, "-o", out, "--overwrite", *FAST)
    assert bad.exit_code == 1 and tree_digest(out) == before
    good = run_cli("fit", tmp_path / "V.npy", "-r", 3, "-o", out, "--overwrite", "--max-iter", 3, *FAST)
    assert good.exit_code == 0 and load_result(out).H.shape == (3, 40)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "info", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and isinstance(result.exception, dnmf.DnmfError)


def test_resume_continues_a_checkpointed_fit(tmp_path, parts_zarr):
    path, _, _ = parts_zarr
    first = run_cli("fit", path, "-r", 3, "-o", tmp_path / "a.zarr", "--max-iter", 4, "--checkpoint",
                    tmp_path / "ckpt", "--checkpoint-every", 1, *FAST)
    assert first.exit_code == 0, first.stderr
    more = run_cli("resume", tmp_path / "ckpt", "-o", tmp_path / "b.zarr", "--max-iter", 8, *FAST)
    assert more.exit_code == 0, more.stderr
    resumed = load_result(tmp_path / "b.zarr")
    assert resumed.n_iter == 8
    straight = run_cli("fit", path, "-r", 3, "-o", tmp_path / "c.zarr", "--max-iter", 8, *FAST)
    assert straight.exit_code == 0, straight.stderr
    np.testing.assert_array_equal(resumed.H, load_result(tmp_path / "c.zarr").H)


def test_subprocess_help_and_error_exit_codes(tmp_path):
    help_run = run_subprocess("-h")
    assert help_run.returncode == 0
    for command in ("fit", "resume", "transform", "info", "convert", "plot", "demo"):
        assert command in help_run.stdout
    missing = run_subprocess("fit", tmp_path / "none.zarr", "-r", 2, "-o", tmp_path / "o.zarr")
    assert missing.returncode == 1
    assert "does not exist" in one_line_error(missing.stderr)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_subprocess_fit_and_demo_on_a_local_cluster(tmp_path, parts_zarr):
    path, _, _ = parts_zarr
    fit = run_subprocess("fit", path, "-r", 3, "-o", tmp_path / "r.zarr", "--scheduler", "threads", "--max-iter", 10,
                         "--tol", 0, "--solver", "hals")
    assert fit.returncode == 0, fit.stderr
    assert "10/10" in fit.stderr and "objective=" in fit.stderr  # the progress bar
    assert load_result(tmp_path / "r.zarr").n_iter == 10

    # The demo starts a LocalCluster of 2 workers on 127.0.0.1 and prints its dashboard.
    demo = run_subprocess("demo", "--n-samples", 1200, "--n-features", 120, "--parts", 4, "--max-iter", 20,
                          "--out-dir", tmp_path / "demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "dashboard: http://127.0.0.1:" in demo.stderr
    cosines = [float(line.rsplit("(", 1)[1].rstrip(")")) for line in demo.stdout.splitlines() if "-> H row" in line]
    assert len(cosines) == 4 and min(cosines) > 0.95
    assert sorted(os.listdir(tmp_path / "demo")) == ["convergence.png", "parts.png", "result.zarr", "w_heatmap.png"]
    rerun = run_subprocess("demo", "--out-dir", tmp_path / "demo", cwd=tmp_path)
    assert rerun.returncode == 1 and "--overwrite" in one_line_error(rerun.stderr)


def test_rank_is_a_subcommand():
    result = CliRunner().invoke(main, ["rank", "--help"])
    assert result.exit_code == 0 and "Survey the ranks" in result.output
