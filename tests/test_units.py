"""Issue 14, cases 5 and 7: a fit's result does not depend on V's units, and float32 fits
stop where float64 fits of the same data stop.

Case 5: MU's ε (1e-10) was absolute, so V × 1e-9 ended with W ≡ 0 ("converged", relative
error 1.0) and KL / IS failed at V × 1e-12; NNDSVDa filled zeros with mean(V), which does not
scale like W and H. Case 7: the float32 Frobenius objective from the Gram identity is rounding
noise near a good fit, and the stop rule fired on it.
"""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from dnmf import NMF

SOLVER_LOSS = [
    ("mu", "frobenius"), ("mu", "kullback-leibler"), ("mu", "itakura-saito"), ("hals", "frobenius"), ("bpp", "frobenius"),
]


def planted(seed=0, n=120, p=200, r=5):
    rng = np.random.default_rng(seed)
    return rng.random((n, r)) @ rng.random((r, p)) + 0.01 * rng.random((n, p))


def fit(V, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = NMF(5, random_state=0, **params)
        W = model.fit_transform(V)
    return model, W


def relative_error(V, W, H):
    V = V.astype(np.float64)
    return np.linalg.norm(V - W.astype(np.float64) @ H.astype(np.float64)) / np.linalg.norm(V)


@pytest.mark.parametrize("dtype, exponents", [(np.float64, [-30, -17, -9, 9, 17, 30]), (np.float32, [-15, -9, -4, 4, 9, 15])])
@pytest.mark.parametrize("solver, loss", SOLVER_LOSS)
def test_relative_error_does_not_depend_on_units(dtype, exponents, solver, loss):
    """The same relative error (within 1%) and the same number of iterations for V × 10^k,
    with the default start (NNDSVDa) and the default stop rule."""
    V = planted().astype(dtype)
    params = dict(solver=solver, beta_loss=loss, max_iter=60)
    unit, W = fit(V, **params)
    reference = relative_error(V, W, unit.components_)
    assert reference < 0.1
    for k in exponents:
        scaled = (planted() * 10.0**k).astype(dtype)
        model, W = fit(scaled, **params)
        assert np.all(np.isfinite(W)) and W.any(), k
        assert relative_error(scaled, W, model.components_) == pytest.approx(reference, rel=0.01), k
        assert model.n_iter_ == unit.n_iter_, k


@pytest.mark.parametrize("init", ["nndsvda", "nndsvdar", "random"])
@pytest.mark.parametrize("solver, loss", SOLVER_LOSS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_power_of_four_scales_the_fit_exactly(dtype, solver, loss, init):
    """V × 4^j gives W × 2^j and H × 2^j bit for bit: ε, the start's fills and thresholds all
    work in V's units (powers of two, so exact). IS raises WH to the power -2, which the math
    library rounds to within an ulp but not always exactly, so there to rounding."""
    V = planted().astype(dtype)
    params = dict(solver=solver, beta_loss=loss, init=init, max_iter=15, tol=0, tol_x=0)
    unit, W = fit(V, **params)
    for j in (-9, 7):
        factor = dtype(np.ldexp(1.0, 2 * j))
        model, W_scaled = fit(V * factor, **params)
        root = dtype(np.ldexp(1.0, j))
        if loss == "itakura-saito":
            rtol = 1e-9 if dtype == np.float64 else 1e-3
            np.testing.assert_allclose(W_scaled, W * root, rtol=rtol, atol=0)
            np.testing.assert_allclose(model.components_, unit.components_ * root, rtol=rtol, atol=0)
            continue
        assert np.array_equal(W_scaled, W * root), j
        assert np.array_equal(model.components_, unit.components_ * root), j


def test_tiny_data_is_fitted_not_zeroed():
    """The issue's case: rank 5, 200 x 500, times 1e-9 ended with W ≡ 0 and relative error 1.0
    after 7 iterations ("converged"); scikit-learn reaches 0.064."""
    V = planted(n=200, p=500) * 1e-9
    model, W = fit(V, solver="mu", max_iter=200)
    assert relative_error(V, W, model.components_) < 0.064
    assert model.n_iter_ > 7


@pytest.mark.parametrize("solver, loss", [("mu", "frobenius"), ("mu", "kullback-leibler"), ("hals", "frobenius"), ("bpp", "frobenius")])
@pytest.mark.parametrize("seed", [0, 2])
def test_float32_stops_where_float64_stops(solver, loss, seed):
    """Case 7: the float32 fit of the same data runs as long as the float64 fit (before the fix
    float32 HALS stopped at iterations 53-64 where float64 ran to 177). The iterates differ by
    float32's rounding, so where the stop rule's decrease crosses tol within that rounding the
    two may stop one iteration apart."""
    V = planted(seed, n=200, p=300)
    params = dict(solver=solver, beta_loss=loss, init="random", max_iter=400)
    f64, _ = fit(V, **params)
    f32, _ = fit(V.astype(np.float32), **params)
    assert abs(f32.n_iter_ - f64.n_iter_) <= 1, (f32.n_iter_, f64.n_iter_)


def test_float32_objective_is_the_residual_near_a_good_fit():
    """The recorded float32 objective near a good fit is ½‖V − WH‖² to float32 accuracy, not the
    Gram identity's rounding noise."""
    V = planted(1, n=200, p=300).astype(np.float32)
    model, W = fit(V, solver="hals", init="random", max_iter=100, tol=1e-4, tol_x=1e-3)
    true = 0.5 * np.linalg.norm(V.astype(np.float64) - W.astype(np.float64) @ model.components_.astype(np.float64)) ** 2
    assert model.history_[-1]["objective"] == pytest.approx(true, rel=1e-4)
    decreases = [r["rel_decrease"] for r in model.history_[1:]]
    assert min(decreases) >= -1e-6  # HALS is monotone: no noise-made increases
