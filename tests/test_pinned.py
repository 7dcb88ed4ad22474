"""W and H of a handful of fits, pinned bit for bit.

The fits below were recorded (``python tests/test_pinned.py --record``) before dnmf's code was
reshaped into layers; every refactoring since must leave them bitwise unchanged. The recorded
arrays sit in ``data/pinned_fits.npz`` beside their SHA-256 hashes: on the machine and library
versions they were recorded with the hashes must match exactly; elsewhere (another BLAS, another
CPU) the arrays must agree to rounding.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

import dnmf

DATA = Path(__file__).parent / "data"
ARRAYS = DATA / "pinned_fits.npz"
HASHES = DATA / "pinned_fits.json"


def _matrix(n=90, p=50, r=4, seed=7, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.random((n, r)) @ rng.random((r, p)) + 0.05 * rng.random((n, p))).astype(dtype)


def _sparse(n=120, p=60, density=0.15, seed=3):
    rng = np.random.default_rng(seed)
    X = sp.random(n, p, density=density, random_state=rng, format="csr")
    X.data = np.ceil(X.data * 5)
    return X


def _with_nans(seed=5):
    V = _matrix(seed=seed)
    rng = np.random.default_rng(seed)
    V[rng.random(V.shape) < 0.1] = np.nan
    return V


def _fit(X, **kw):
    kw = {"max_iter": 12, "tol": 0, "tol_x": 0, "random_state": 11, **kw}
    model = dnmf.NMF(kw.pop("n_components", 4), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    return np.asarray(W), np.asarray(model.components_)


def _transform():
    V = _matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = dnmf.NMF(4, solver="hals", max_iter=10, tol=0, tol_x=0, random_state=2).fit(V)
        W = model.transform(_matrix(n=30, seed=8))
    return np.asarray(W), np.asarray(model.components_)


def _distributed():
    from dnmf.cluster import connect

    with connect("local", n_workers=2, threads_per_worker=1, memory_limit="1GiB"):
        mu = _fit(_matrix(n=400, p=60), chunks=50, reroot_every=3)
        grid = _fit(_matrix(n=200, p=300), solver="hals", chunks=50, column_chunks=100, reroot_every=4)
    return mu, grid


FITS = {
    "mu_local": lambda: _fit(_matrix()),
    "mu_graph": lambda: _fit(_matrix(), local=False, chunks=20),
    "mu_float32": lambda: _fit(_matrix(dtype=np.float32), chunks=30, local=False),
    "kl_nndsvda": lambda: _fit(_matrix(), beta_loss="kullback-leibler", init="nndsvda", chunks=25),
    "is_random": lambda: _fit(_matrix() + 0.1, beta_loss="itakura-saito", init="random", local=False),
    "beta_1_5_every_3": lambda: _fit(_matrix(), beta_loss=1.5, objective_every=3, chunks=30),
    "hals_auto": lambda: _fit(_matrix(), solver="hals", init="nndsvd", chunks=25),
    "hals_one_sweep": lambda: _fit(_matrix(), solver="hals", inner_sweeps=1, local=False),
    "bpp": lambda: _fit(_matrix(), solver="bpp", init="nndsvdar", chunks=40),
    "masked_mu": lambda: _fit(_with_nans(), missing="nan", chunks=30),
    "masked_hals": lambda: _fit(_with_nans(), solver="hals", missing="nan", chunks=30),
    "masked_kl": lambda: _fit(_with_nans(), beta_loss="kullback-leibler", missing="nan"),
    "grid_mu": lambda: _fit(_matrix(n=60, p=120), chunks=20, column_chunks=50),
    "grid_kl": lambda: _fit(_matrix(n=60, p=120), beta_loss="kullback-leibler", chunks=20, column_chunks=50),
    "grid_bpp": lambda: _fit(_matrix(n=60, p=120), solver="bpp", chunks=20, column_chunks=50),
    "sparse_mu": lambda: _fit(_sparse(), chunks=30),
    "sparse_kl": lambda: _fit(_sparse(), beta_loss="kullback-leibler", init="random", chunks=30, local=False),
    "sparse_hals": lambda: _fit(_sparse(), solver="hals", chunks=40),
    "restarts": lambda: _fit(_matrix(), init="random", n_runs=3, max_iter=6),
    "transform": _transform,
}


def _platform() -> dict:
    import scipy
    import threadpoolctl

    blas = [
        {key: info.get(key) for key in ("internal_api", "version", "architecture")}
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "blas": blas,
    }


def _sha(X: np.ndarray) -> str:
    X = np.ascontiguousarray(X)
    return hashlib.sha256(X.dtype.str.encode() + str(X.shape).encode() + X.tobytes()).hexdigest()


def _run_all() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    results = {name: make() for name, make in FITS.items()}
    mu, grid = _distributed()
    results["distributed_mu_reroot"], results["distributed_grid_hals"] = mu, grid
    return results


def record() -> None:
    results = _run_all()
    DATA.mkdir(exist_ok=True)
    arrays = {f"{name}/{part}": X for name, (W, H) in results.items() for part, X in (("W", W), ("H", H))}
    np.savez_compressed(ARRAYS, **arrays)
    HASHES.write_text(
        json.dumps(
            {"platform": _platform(), "hashes": {key: _sha(X) for key, X in arrays.items()}}, indent=1, sort_keys=True
        )
        + "\n"
    )


# How far a pinned fit may move on another platform: its BLAS picks other kernels, which add
# the products' terms in another order. The roundings that differ grow over the fits' 12
# iterations; in float32, to 7.9e-5 of an entry (mu_float32 where OpenBLAS runs its Haswell
# kernels, against the SkylakeX kernels it was recorded with).
ROUNDING = {np.float64: 1e-6, np.float32: 5e-4}


@pytest.fixture(scope="module")
def pinned():
    return json.loads(HASHES.read_text()), np.load(ARRAYS)


def _check(name: str, W: np.ndarray, H: np.ndarray, pinned) -> None:
    meta, arrays = pinned
    same_platform = meta["platform"] == _platform()
    for part, X in (("W", W), ("H", H)):
        key = f"{name}/{part}"
        want = arrays[key]
        assert X.dtype == want.dtype and X.shape == want.shape, key
        if same_platform:
            assert _sha(X) == meta["hashes"][key], f"{key} changed"
        else:
            rtol = ROUNDING[X.dtype.type]
            np.testing.assert_allclose(X, want, rtol=rtol, atol=1e-3 * rtol * float(np.abs(want).max()), err_msg=key)


@pytest.mark.parametrize("name", sorted(FITS))
def test_fit_is_bitwise_as_pinned(name, pinned):
    _check(name, *FITS[name](), pinned)


def test_distributed_fits_are_bitwise_as_pinned(pinned):
    (mu_W, mu_H), (grid_W, grid_H) = _distributed()
    _check("distributed_mu_reroot", mu_W, mu_H, pinned)
    _check("distributed_grid_hals", grid_W, grid_H, pinned)


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        record()
    else:
        sys.exit("usage: python tests/test_pinned.py --record")
