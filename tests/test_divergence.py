"""Issue 14, cases 6, 8 and 13: no wrong answer is reported as a fit, bad starts and values are refused."""

import os
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf import checkpoint
from dnmf.cli import main
from dnmf.errors import DivergenceError, InvalidMatrixError, ParameterError


def lowrank(n=60, p=40, r=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.random((n, r)) @ rng.random((r, p)) + 0.01).astype(dtype)


def with_zero_row_and_column():
    V = lowrank()
    V[3, :] = 0
    V[:, 5] = 0
    return V


def fit(V, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return dnmf.NMF(**{"n_components": 5, "max_iter": 30, "tol": 0, "tol_x": 0, "random_state": 0, **kw}).fit(V)


def test_eps_zero_with_a_zero_row_and_column_stops_with_one_clear_error():
    with pytest.raises(DivergenceError, match=r"diverged at iteration \d+.*eps=0"):
        fit(with_zero_row_and_column(), eps=0, init="random")


def test_float32_beyond_its_range_stops_instead_of_reporting_nan():
    with pytest.raises(DivergenceError, match="diverged"):
        fit(lowrank(dtype=np.float32) * np.float32(1e30), init="random")


def test_a_custom_start_that_overflows_is_refused_at_the_start():
    V = lowrank()
    rng = np.random.default_rng(1)
    W0, H0 = rng.random((60, 5)), rng.random((5, 40)) * 1e300
    with pytest.raises(DivergenceError, match="diverged at the start"):
        dnmf.NMF(5, init="custom").fit(V, W=W0, H=H0)


def test_a_divergence_keeps_the_last_good_checkpoint_and_writes_no_result(tmp_path):
    V = with_zero_row_and_column()
    ck = str(tmp_path / "ck")
    with pytest.raises(DivergenceError):
        fit(V, eps=0, init="random", checkpoint=ck, checkpoint_every=1)
    snapshot = checkpoint.load(ck)
    assert np.isfinite(snapshot.W.compute()).all() and np.isfinite(snapshot.H).all()
    assert all(np.isfinite(record.objective) for record in snapshot.history)
    # The command line: one line, exit status 1, no result written.
    np.save(tmp_path / "V.npy", V)
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(
        main, ["fit", str(tmp_path / "V.npy"), "-r", "5", "-o", str(out), "--eps", "0", "--init", "random",
               "--max-iter", "30", "--tol-x", "0", "--scheduler", "threads", "-q"],
    )
    assert result.exit_code == 1 and "diverged" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.startswith(".r.zarr")]


@pytest.mark.parametrize("which", ["W", "H"])
def test_an_all_zero_custom_factor_is_refused(which):
    V = lowrank()
    W0, H0 = np.full((60, 3), 0.5), np.full((3, 40), 0.5)
    start = {"W": W0, "H": H0, which: np.zeros_like(W0 if which == "W" else H0)}
    with pytest.raises(InvalidMatrixError, match=f"starting {which} is all zeros"):
        dnmf.NMF(3, init="custom").fit(V, **start)


def test_w_given_as_a_list_is_read_as_an_array():
    V = lowrank()
    W0, H0 = np.full((60, 3), 0.5), np.full((3, 40), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = dnmf.NMF(3, init="custom", max_iter=3).fit(V, W=W0.tolist(), H=H0.tolist())
        b = dnmf.NMF(3, init="custom", max_iter=3).fit(V, W=W0, H=H0)
    assert np.array_equal(a.components_, b.components_)


def test_w_and_h_with_another_init_are_ignored_with_a_warning():
    V = lowrank()
    with pytest.warns(RuntimeWarning, match="init='custom'"):
        dnmf.NMF(3, init="random", max_iter=2).fit(V, W=np.ones((60, 3)), H=np.ones((3, 40)))


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("random_state", -1, "random_state an int from 0"),
        ("eps", float("inf"), "eps a finite"),
        ("chunks", 2.5, "chunks"),
        ("column_chunks", 0, "positive number of columns"),
    ],
)
def test_values_that_used_to_fail_late_or_pass_silently_are_refused(name, value, match):
    with pytest.raises(ParameterError, match=match):
        dnmf.NMF(2, **{name: value}).fit(lowrank())


def test_the_jobqueue_driver_serves_its_dashboard_on_this_machine_only():
    # Issue 14, case 14: the dashboard (which can run code on the cluster) listens on loopback
    # unless the user asks for every interface.
    import importlib.util
    import sys
    from pathlib import Path

    deploy = Path(__file__).parent.parent / "deploy"
    sys.path.insert(0, str(deploy))
    try:
        spec = importlib.util.spec_from_file_location("jobqueue_driver", deploy / "jobqueue_driver.py")
        driver = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(driver)
    finally:
        sys.path.remove(str(deploy))
    args = driver.build_parser().parse_args(["V.zarr", "out.zarr", "--rank", "3"])
    assert args.dashboard_address.split(":")[0] == "127.0.0.1"


def test_a_damaged_chunk_of_v_is_named_with_the_remedy(tmp_path):
    # Issue 14, case 12: a corrupt chunk file gives one error naming the array, the block and
    # what to do, not a codec traceback.
    import zarr

    from dnmf.errors import StoreError

    path = tmp_path / "V.zarr"
    zarr.create_array(store=str(path), data=lowrank(80, 40), chunks=(20, 40))
    chunk = path / "c" / "1" / "0"
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + b"not zstd at all" * 4)
    with pytest.raises(StoreError, match=r"Cannot read rows 20-40, columns 0-40 of the Zarr array .*V.zarr.*restore"):
        dnmf.NMF(2, max_iter=2).fit(str(path))
