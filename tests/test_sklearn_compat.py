"""dnmf.NMF as a drop-in for scikit-learn's NMF: its estimator checks, warnings, errors and attributes."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF as SkNMF
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import check_estimator

import dnmf
from dnmf.errors import DnmfError, InvalidMatrixError, ParameterError
from dnmf.settings import DEFAULTS


def V(n=40, p=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 3)) @ rng.random((3, p)) + 0.01


def quiet(model, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_transform(X, **kw)


def failed_checks(estimator) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    assert len(results) >= 45
    return {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}


# ---------------------------------------------------------------------------
# scikit-learn's estimator checks

# The only checks dnmf.NMF() (MU) fails, each with the reason; scikit-learn's own NMF() fails them
# too (asserted below).
EXPECTED_FAILURES_AT_DEFAULTS = {
    "check_transformer_general": (
        "fit_transform(X) must equal transform(X) to 0.01; at max_iter=200 the fit stops before W is "
        "the exact least-squares solution given H (a rank-3 fit of a 30 x 3 matrix, which converges "
        "slowly), so a fresh solve for W lands elsewhere. scikit-learn's NMF() fails it as well; "
        "its own tests pass it max_iter=500 with its CD solver, and dnmf passes it with "
        "solver='hals' or 'bpp'."
    ),
    "check_transformer_data_not_an_array": "The same comparison on array-likes that are not arrays.",
}


@pytest.mark.parametrize("solver", ["hals", "bpp"])
def test_check_estimator_passes_every_check(solver):
    assert failed_checks(dnmf.NMF(solver=solver)) == {}


def test_check_estimator_at_defaults_fails_only_what_sklearns_nmf_fails():
    ours = failed_checks(dnmf.NMF())
    assert set(ours) <= set(EXPECTED_FAILURES_AT_DEFAULTS), {k: str(v)[:200] for k, v in ours.items()}
    theirs = failed_checks(SkNMF())
    assert set(ours) <= set(theirs)
    for exception in ours.values():
        assert "fit_transform and transform outcomes not consistent" in str(exception)


def test_tags():
    tags = dnmf.NMF().__sklearn_tags__()
    assert tags.input_tags.positive_only and tags.input_tags.sparse
    assert tags.transformer_tags.preserves_dtype == ["float64", "float32"]


# ---------------------------------------------------------------------------
# Attributes and parameters


def test_n_components_auto_takes_the_rank_of_the_custom_start():
    X = V()
    rng = np.random.default_rng(1)
    W0, H0 = rng.random((40, 4)), rng.random((4, 12))
    model = dnmf.NMF("auto", init="custom", max_iter=5)
    quiet(model, X, W=W0, H=H0)
    assert model.n_components_ == 4 and model.components_.shape == (4, 12)
    auto = dnmf.NMF("auto", init="random", random_state=0, max_iter=5)
    quiet(auto, X)
    assert auto.n_components_ == 12  # without a start: n_features, as in scikit-learn
    W, H, _ = dnmf.non_negative_factorization(X, H=H0, n_components="auto", update_H=False, max_iter=5)
    assert W.shape == (40, 4)


def test_feature_names_in_and_get_feature_names_out():
    pd = pytest.importorskip("pandas")
    X = pd.DataFrame(V(), columns=[f"gene{i}" for i in range(12)])
    model = dnmf.NMF(3, init="random", random_state=0, max_iter=5)
    quiet(model, X)
    assert list(model.feature_names_in_) == list(X.columns)
    assert list(model.get_feature_names_out()) == ["nmf0", "nmf1", "nmf2"]
    with pytest.warns(UserWarning, match="feature names"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.transform(X.to_numpy())
    plain = dnmf.NMF(2, init="random", random_state=0, max_iter=5)
    quiet(plain, X.to_numpy())
    assert not hasattr(plain, "feature_names_in_")


def test_verbose_reports_iterations_on_stderr(capsys):
    model = dnmf.NMF(3, init="random", random_state=0, max_iter=20, tol=0, tol_x=0, verbose=1)
    quiet(model, V())
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("NMF iteration")]
    assert [line.split(":")[0] for line in lines] == ["NMF iteration 1", "NMF iteration 10", "NMF iteration 20"]
    assert captured.out == ""
    quiet(dnmf.NMF(3, init="random", random_state=0, max_iter=3, tol=0, tol_x=0, verbose=2), V())
    assert len([x for x in capsys.readouterr().err.splitlines() if x.startswith("NMF iteration")]) == 3
    with pytest.raises(ParameterError, match="verbose"):
        dnmf.NMF(2, verbose=-1).fit(V())


def test_rank_above_min_n_p_is_allowed_with_a_random_init():
    X = V(n=10, p=6)
    model = dnmf.NMF(8, init="random", random_state=0, max_iter=30)
    W = quiet(model, X)
    assert W.shape == (10, 8) and model.components_.shape == (8, 6) and W.min() >= 0
    assert dnmf.NMF(8, random_state=0, max_iter=3).fit(X).init_ == "random"  # the default init then
    with pytest.raises(ParameterError, match=r"init = 'nndsvd' can only be used when n_components <= min"):
        dnmf.NMF(8, init="nndsvd").fit(X)


# ---------------------------------------------------------------------------
# Warnings


def test_w_and_h_with_another_init_warn_as_sklearn_does():
    X = V()
    W0, H0 = np.ones((40, 2)), np.ones((2, 12))
    with pytest.warns(RuntimeWarning, match=r"When init!='custom', provided W or H are ignored"):
        quiet(dnmf.NMF(2, init="random", max_iter=3), X, W=W0, H=H0)


def test_max_iter_reached_warns_even_at_one_iteration():
    with pytest.warns(ConvergenceWarning, match="Maximum number of iterations 1 reached"):
        dnmf.NMF(2, init="random", random_state=0, max_iter=1).fit(V())


# ---------------------------------------------------------------------------
# Errors and accepted inputs


def test_w_or_h_of_another_dtype_is_a_type_error():
    X = V()
    W0, H0 = np.ones((40, 2)), np.ones((2, 12))
    with pytest.raises(TypeError, match=r"H and W should have the same dtype as X. Got H.dtype = float32"):
        dnmf.NMF(2, init="custom").fit(X, W=W0, H=H0.astype(np.float32))
    with pytest.raises(DnmfError, match="float64"):
        dnmf.NMF(2, init="custom").fit(X.astype(np.float32), W=W0, H=H0)
    with pytest.raises(TypeError, match="same dtype as X"):
        dnmf.non_negative_factorization(X, H=H0.astype(np.float32), n_components=2, update_H=False)
    quiet(dnmf.NMF(2, init="custom", max_iter=2), X.astype(np.float32), W=W0.astype(np.float32), H=H0.astype(np.float32))


def test_object_arrays_of_numbers_are_accepted():
    X = V()
    kw = dict(init="random", random_state=0, max_iter=5)
    a, b = dnmf.NMF(3, **kw), dnmf.NMF(3, **kw)
    W_a, W_b = quiet(a, X), quiet(b, X.astype(object))
    assert np.array_equal(W_a, W_b) and np.array_equal(a.components_, b.components_)
    W_list = quiet(dnmf.NMF(3, **kw), X.tolist())
    assert np.array_equal(W_list, W_a)
    bad = X.astype(object)
    bad[0, 0] = {"foo": "bar"}
    with pytest.raises(TypeError, match="argument must be a string.* number"):
        dnmf.NMF(3).fit(bad)
    with pytest.raises(InvalidMatrixError, match="Expected a matrix of numbers"):
        dnmf.NMF(3).fit(bad)


def test_messages_start_with_sklearns_wording_and_keep_the_position():
    X = V()
    X[3, 4] = -1.0
    with pytest.raises(InvalidMatrixError, match=r"^Negative values in data passed to NMF \(input X\): .*first at row, column \(3, 4\)"):
        dnmf.NMF(2).fit(X)
    with pytest.raises(InvalidMatrixError, match=r"Negative values in data passed to NMF.*first at row, column \(3, 4\)"):
        dnmf.NMF(2).fit(sp.csr_matrix(X))
    with pytest.raises(InvalidMatrixError, match=r"0 feature\(s\) \(shape=\(12, 0\)\) while a minimum of 1 is required"):
        dnmf.NMF(2).fit(np.ones((12, 0)))
    with pytest.raises(InvalidMatrixError, match=r"0 sample\(s\) \(shape=\(0, 3\)\)"):
        dnmf.NMF(2).fit(np.ones((0, 3)))
    with pytest.raises(InvalidMatrixError, match="Reshape your data"):
        dnmf.NMF(2).fit(np.ones(5))
    with pytest.raises(InvalidMatrixError, match="^Complex data not supported"):
        dnmf.NMF(2).fit(np.ones((5, 3), dtype=complex))
    model = dnmf.NMF(2, init="random", max_iter=3)
    quiet(model, V())
    with pytest.raises(ParameterError, match="X has 13 features, but NMF is expecting 12 features as input"):
        model.transform(np.ones((4, 13)))


# ---------------------------------------------------------------------------
# non_negative_factorization: every parameter of the estimator, the same code path


def test_the_function_takes_every_parameter_of_the_estimator():
    function = set(inspect.signature(dnmf.non_negative_factorization).parameters)
    estimator = set(inspect.signature(dnmf.NMF).parameters)
    assert estimator == set(DEFAULTS)
    assert function - {"X", "W", "H", "update_H"} == estimator
    for name, parameter in inspect.signature(dnmf.NMF).parameters.items():
        assert inspect.signature(dnmf.non_negative_factorization).parameters[name].default == parameter.default, name


@pytest.mark.parametrize(
    "params",
    [dict(solver="hals", inner_sweeps=1), dict(solver="hals", inner_sweeps=4), dict(solver="bpp", alpha_W=0.01, l1_ratio=0.5),
     dict(solver="mu", beta_loss="kullback-leibler", alpha_W=0.02, alpha_H=0.0, objective_every=3, chunks=10)],
)
def test_the_function_equals_the_estimator(params):
    X = V()
    common = dict(init="random", random_state=0, max_iter=15, tol=0, tol_x=0)
    model = dnmf.NMF(3, **common, **params)
    W_est = quiet(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W, H, n_iter = dnmf.non_negative_factorization(X, n_components=3, **common, **params)
    assert np.array_equal(W, W_est) and np.array_equal(H, model.components_) and n_iter == model.n_iter_ == 15


def test_restarts_take_n_components_auto():
    model = dnmf.NMF("auto", n_runs=2, init="random", random_state=0, max_iter=5)
    quiet(model, V())
    assert model.n_components_ == 12 and len(model.run_losses_) == 2
