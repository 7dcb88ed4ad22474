"""Bad input: one clear error naming the problem."""

import numpy as np
import pytest

import dnmf
from dnmf.errors import DnmfError


def good():
    return np.random.default_rng(0).random((20, 10))


def test_negative_entries_counted_and_located():
    V = good()
    V[3, 4] = -1
    V[7, 1] = -2
    with pytest.raises(DnmfError, match=r"2 negative entries \(first at row, column \(3, 4\)\)"):
        dnmf.NMF(2).fit(V)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_entries(bad):
    V = good()
    V[5, 2] = bad
    with pytest.raises(DnmfError, match=r"1 NaN or infinite entries \(first at row, column \(5, 2\)\)"):
        dnmf.NMF(2).fit(V)


def test_not_2d():
    with pytest.raises(DnmfError, match="Expected a 2-D matrix"):
        dnmf.NMF(2).fit(np.ones(5))


@pytest.mark.parametrize("rank", [0, -1, "two"])
def test_bad_rank(rank):
    with pytest.raises(DnmfError, match="n_components"):
        dnmf.NMF(rank).fit(good())


def test_rank_above_min_n_p_needs_an_init_other_than_nndsvd():
    # As in scikit-learn: allowed (a random start by default), except with an SVD-based init.
    with pytest.raises(DnmfError, match="n_components <= min"):
        dnmf.NMF(11, init="nndsvda").fit(good())


def test_hals_with_kl():
    with pytest.raises(DnmfError, match="solver='hals' minimizes the Frobenius loss only"):
        dnmf.NMF(2, solver="hals", beta_loss="kullback-leibler").fit(good())


def test_itakura_saito_with_zeros():
    V = good()
    V[0, 0] = 0
    with pytest.raises(DnmfError, match="1 zero entries"):
        dnmf.NMF(2, beta_loss="itakura-saito").fit(V)


def test_unknown_solver_and_loss():
    with pytest.raises(DnmfError, match="solver in"):
        dnmf.NMF(2, solver="als").fit(good())
    with pytest.raises(DnmfError, match="beta_loss in"):
        dnmf.NMF(2, beta_loss="poisson").fit(good())


def test_missing_zarr(tmp_path):
    with pytest.raises(DnmfError, match="No Zarr array at"):
        dnmf.NMF(2).fit(str(tmp_path / "nope.zarr"))


def test_custom_init_shapes():
    with pytest.raises(DnmfError, match=r"Expected H of shape \(2, 10\)"):
        dnmf.NMF(2, init="custom").fit(good(), W=np.ones((20, 2)), H=np.ones((3, 10)))


def test_input_not_modified():
    V = good()
    copy = V.copy()
    dnmf.NMF(2, max_iter=3).fit(V)
    np.testing.assert_array_equal(V, copy)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_custom_start_not_modified_rank_one(solver):
    # With r = 1, W.T is contiguous: an in-place sweep on a view would write into the user's W.
    V = good()
    W0, H0 = np.full((20, 1), 0.5), np.full((1, 10), 0.5)
    W_copy, H_copy = W0.copy(), H0.copy()
    runs = [dnmf.NMF(1, solver=solver, init="custom", max_iter=20, tol=0, tol_x=0).fit(V, W=W0, H=H0).components_ for _ in range(2)]
    np.testing.assert_array_equal(W0, W_copy)
    np.testing.assert_array_equal(H0, H_copy)
    np.testing.assert_array_equal(runs[0], runs[1])
