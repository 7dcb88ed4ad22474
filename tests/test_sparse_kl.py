"""The compiled sparse KL kernels (dnmf.kernels.sparse_kl) against plain numpy / scipy."""

import numpy as np
import pytest
import scipy.sparse as sp

from dnmf.kernels import sparse_kl


# Ranks below, at, between and past the kernels' eight lanes: 7 is a short group alone, 10 one
# whole group and a short one, 17 two whole groups and one column.
RANKS = [7, 8, 10, 17]


def _block(dtype, seed=0, r=7):
    """A CSR block whose rows hold 0 to 19 stored entries, of rank r: the kernels take a row's
    entries eight at a time, then the rest one by one."""
    rng = np.random.default_rng(seed)
    n, p = 40, 30
    rows = [np.sort(rng.choice(p, size=i % 20, replace=False)) for i in range(n)]
    indptr = np.cumsum([0] + [len(c) for c in rows])
    indices = np.concatenate(rows)
    data = (rng.random(indices.size) + 0.1).astype(dtype)
    V = sp.csr_matrix((data, indices, indptr), shape=(n, p))
    W = (rng.random((n, r)) + 0.05).astype(dtype)
    H = (rng.random((r, p)) + 0.05).astype(dtype)
    return V, W, H


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wh_at_nonzeros_is_the_dense_product_there(dtype, r):
    V, W, H = _block(dtype, r=r)
    rows = np.repeat(np.arange(V.shape[0]), np.diff(V.indptr))
    want = (W.astype(np.float64) @ H.astype(np.float64))[rows, V.indices]
    got = sparse_kl.wh_at_nonzeros(V, W, H)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kl_products_match_dense_formulas(dtype, r):
    V, W, H = _block(dtype, r=r)
    eps = 1e-3
    dense = V.toarray().astype(np.float64)
    WH = W.astype(np.float64) @ H.astype(np.float64)
    ratio = np.where(dense > 0, dense / (WH + eps), 0.0)
    tol = dict(rtol=50 * np.finfo(dtype).eps, atol=0)
    np.testing.assert_allclose(sparse_kl.ratio_times_ht(V, W, H, eps), ratio @ H.T.astype(np.float64), **tol)
    numer, runs = sparse_kl.wt_ratio(V, W, H, eps)
    assert numer.shape == H.shape and numer.dtype == dtype and numer.flags.c_contiguous and runs == []
    np.testing.assert_allclose(numer, W.T.astype(np.float64) @ ratio, **tol)


@pytest.mark.parametrize("entries", [1, 7, 40, 10**6])
def test_wt_ratio_by_runs_of_rows_gives_the_same_bits_and_wh_run_by_run(entries):
    """The rows in runs of about ``entries`` non-zeros (1: about a row per run): the same sums,
    and each run's values of V and WH, in order, covering every non-zero once."""
    V, W, H = _block(np.float32, seed=7, r=10)
    whole, _ = sparse_kl.wt_ratio(V, W, H, 1e-3)
    numer, runs = sparse_kl.wt_ratio(V, W, H, 1e-3, per_run=lambda v, wh: (v.copy(), wh.copy()), run_entries=entries)
    assert numer.tobytes() == whole.tobytes()
    assert (len(runs) == 1) == (entries >= V.nnz)
    assert np.concatenate([v for v, _ in runs]).tobytes() == V.data.tobytes()
    assert np.concatenate([wh for _, wh in runs]).tobytes() == sparse_kl.wh_at_nonzeros(V, W, H).tobytes()


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_products_add_in_scipys_order(dtype, r):
    """Bitwise what scipy's V Hᵀ and Vᵀ W give on the ratios: the same sums in the same order."""
    V, W, H = _block(dtype, seed=3, r=r)
    eps = dtype(1e-3)
    R = V.copy()
    R.data = V.data / (sparse_kl.wh_at_nonzeros(V, W, H) + eps)
    numer, _ = sparse_kl.wt_ratio(V, W, H, eps)
    assert numer.tobytes() == np.asarray((R.T @ W).T).tobytes()
    assert sparse_kl.ratio_times_ht(V, W, H, eps).tobytes() == np.asarray(R @ np.ascontiguousarray(H.T)).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_dot_products_have_one_order_whatever_the_rank_s_padding(dtype):
    """W_i · Hᵀ_c is summed in a fixed order: the same bits when W and H are padded with zero
    columns to any width (the kernels' lanes hold the same values, zeros past the rank), and
    the same bits from every kernel. Summed one column after another it differs."""
    V, W, H = _block(dtype, seed=5, r=10)
    wh = sparse_kl.wh_at_nonzeros(V, W, H)
    for width in (16, 19, 24):
        Wp = np.zeros((W.shape[0], width), dtype)
        Wp[:, :10] = W
        Hp = np.zeros((width, H.shape[1]), dtype)
        Hp[:10] = H
        assert sparse_kl.wh_at_nonzeros(V, Wp, Hp).tobytes() == wh.tobytes()
    runs = sparse_kl.wt_ratio(V, W, H, 1e-3, per_run=lambda v, wh: wh.copy())[1]
    assert np.concatenate(runs).tobytes() == wh.tobytes()
    rows = np.repeat(np.arange(V.shape[0]), np.diff(V.indptr))
    in_order = np.zeros(V.nnz, dtype)
    for k in range(10):
        in_order += W[rows, k] * H[k, V.indices]
    assert not np.array_equal(in_order, wh)


def test_views_of_a_larger_matrix_are_read_in_place():
    """A block whose arrays are slices of a bigger CSR (dnmf's in-memory row blocks)."""
    V, W, H = _block(np.float64)
    lo, hi = 10, 30
    start, stop = V.indptr[lo], V.indptr[hi]
    view = sp.csr_matrix((hi - lo, V.shape[1]))
    view.data, view.indices, view.indptr = V.data[start:stop], V.indices[start:stop], V.indptr[lo : hi + 1] - start
    assert np.shares_memory(view.data, V.data)
    got = sparse_kl.ratio_times_ht(view, W[lo:hi], H, 1e-3)
    want = sparse_kl.ratio_times_ht(V[lo:hi], W[lo:hi], H, 1e-3)
    assert got.tobytes() == want.tobytes()


def test_in_memory_csr_blocks_view_v_and_fits_leave_it_unchanged():
    """dnmf's row blocks of a CSR V share its arrays (no copy of V per pass), and no fit,
    of any loss, writes to them."""
    import dnmf
    from dnmf.data.store import open_matrix

    rng = np.random.default_rng(4)
    V = sp.random(300, 80, density=0.1, format="csr", random_state=5, dtype=np.float64)
    V.data += 0.1
    before = (V.data.tobytes(), V.indices.tobytes(), V.indptr.tobytes())
    matrix = open_matrix(V, chunks=64)
    graph = dict(matrix.data.__dask_graph__())
    blocks = [graph[row[0]] for row in matrix.data.__dask_keys__()]
    assert len(blocks) == 5
    assert all(np.shares_memory(b.data, V.data) and np.shares_memory(b.indices, V.indices) for b in blocks)
    assert sp.vstack(blocks).toarray().tobytes() == V.toarray().tobytes()
    for beta in ("frobenius", "kullback-leibler", 1.5):
        dnmf.NMF(4, beta_loss=beta, max_iter=5, chunks=64, random_state=int(rng.integers(100))).fit(V)
    dnmf.NMF(4, solver="hals", max_iter=5, chunks=64).fit(V)
    assert (V.data.tobytes(), V.indices.tobytes(), V.indptr.tobytes()) == before


def test_w_transpose_v_of_an_in_memory_row_block_reads_it_in_place():
    """Wᵀ V_b of a CSR row block whose arrays are views into V's (dnmf's in-memory blocks):
    scipy's values bit for bit, without the copy of the block that ``V_b.T`` makes of views
    (scipy prunes arrays much smaller than their base)."""
    import tracemalloc

    from dnmf.kernels.products import dot_t

    V = sp.random(40000, 50, density=0.2, format="csr", random_state=1, dtype=np.float64)
    lo, hi = 5000, 15000  # a quarter of V
    start, stop = V.indptr[lo], V.indptr[hi]
    block = sp.csr_matrix((hi - lo, V.shape[1]))
    block.data, block.indices, block.indptr = V.data[start:stop], V.indices[start:stop], V.indptr[lo : hi + 1] - start
    W = np.random.default_rng(2).random((hi - lo, 5))
    want = np.ascontiguousarray(np.asarray((block.T @ W).T))
    tracemalloc.start()
    try:
        got = dot_t(W, block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.ascontiguousarray(got).tobytes() == want.tobytes()
    assert peak < block.data.nbytes / 4, (peak, block.data.nbytes)


@pytest.mark.parametrize("r", [1, *RANKS, 33])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_plain_products_are_scipys_bit_for_bit(dtype, r):
    """sparse_kl.times_ht and t_times_w against scipy's V Hᵀ and (Vᵀ W)ᵀ: the same bits, for
    rows with no, one and many entries, columns out of order and repeated, 32- and 64-bit
    indices, and a view of a row range of a larger matrix."""
    from dnmf.kernels.products import _sparse_dot_t

    V, W, H = _block(dtype, seed=11, r=r)
    V.indices[V.indptr[5] : V.indptr[6]] = V.indices[V.indptr[5] : V.indptr[6]][::-1]  # out of order
    V.indices[V.indptr[9] + 1] = V.indices[V.indptr[9]]  # a repeated column
    assert not V.has_sorted_indices
    wide = sp.csr_matrix((V.data, V.indices.astype(np.int64), V.indptr.astype(np.int64)), shape=V.shape)
    lo, hi = 7, 31
    view = sp.csr_matrix((hi - lo, V.shape[1]), dtype=dtype)
    view.data, view.indices = V.data[V.indptr[lo] : V.indptr[hi]], V.indices[V.indptr[lo] : V.indptr[hi]]
    view.indptr = V.indptr[lo : hi + 1] - V.indptr[lo]
    for block in (V, wide, view):
        got = sparse_kl.times_ht(block, H)
        assert got.shape == (block.shape[0], r) and got.dtype == dtype and got.flags.c_contiguous
        assert got.tobytes() == np.asarray(block @ H.T).tobytes()
        W_b = W[lo:hi] if block is view else W
        got = sparse_kl.t_times_w(block, W_b)
        assert got.shape == (r, V.shape[1]) and got.dtype == dtype and got.T.flags.c_contiguous
        assert got.tobytes() == np.asarray((block.T @ W_b).T).tobytes() == _sparse_dot_t(W_b, block).tobytes()


def test_large_csr_blocks_take_the_compiled_products_in_fits_with_the_same_bits(monkeypatch):
    """Blocks of COMPILED_MIN_NNZ non-zeros and more get V Hᵀ (and in float32 Wᵀ V) from the
    compiled kernels (a HALS and an MU fit, in memory and by row blocks), smaller ones from
    scipy; either way the fit's bits are the same."""
    import dnmf
    from dnmf.kernels import products

    V = sp.random(600, 90, density=0.2, format="csr", random_state=3, dtype=np.float32)
    V.data += 0.1
    H = np.ones((4, 90), np.float32)

    def stored(nnz, dtype=np.float32):  # a one-row CSR block of nnz stored entries
        return sp.csr_matrix((np.ones(nnz, dtype), np.zeros(nnz, np.int32), [0, nnz]), shape=(1, 90))

    assert products._compiled_dot_ht(stored(products.COMPILED_MIN_NNZ), H)
    assert not products._compiled_dot_ht(stored(products.COMPILED_MIN_NNZ - 1), H)
    assert not products._compiled_dot_ht(V, H)  # too few non-zeros
    assert not products._compiled_dot_ht(stored(products.COMPILED_MIN_NNZ), H.astype(np.float64))  # not V's dtype
    W = np.ones((1, 4), np.float32)
    assert products._compiled_dot_t(stored(products.COMPILED_MIN_NNZ), W)
    assert not products._compiled_dot_t(stored(products.COMPILED_MIN_NNZ - 1), W)
    big64 = stored(products.COMPILED_MIN_NNZ, np.float64)
    assert products._compiled_dot_ht(big64, H.astype(np.float64)) and not products._compiled_dot_t(big64, W.astype(np.float64))
    calls = []

    def counted(name):
        compiled = getattr(products, name)

        def call(*args):
            calls.append(name)
            return compiled(*args)

        return call

    for name in ("times_ht", "t_times_w"):
        monkeypatch.setattr(products, name, counted(name))
    for params in (dict(solver="hals"), dict(solver="mu")):
        fit = dict(init="random", random_state=1, max_iter=6, tol=0, tol_x=0, chunks=200, **params)
        scipys = dnmf.NMF(4, **fit).fit(V)
        assert calls == []
        with monkeypatch.context() as m:
            m.setattr(products, "COMPILED_MIN_NNZ", 1)
            ours = dnmf.NMF(4, **fit).fit(V)
        # every block's two products, every iteration
        assert calls.count("times_ht") >= 6 * 3 and calls.count("t_times_w") >= 6 * 3, params
        calls.clear()
        assert ours.components_.tobytes() == scipys.components_.tobytes(), params


@pytest.mark.parametrize("r", [7, 10, 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("penalties", [(0.0, 0.0), (0.1, 0.0), (0.05, 0.2)])
@pytest.mark.parametrize("loss", ["none", "loss", "exact"])
def test_a_kl_mu_step_in_one_pass_is_the_two_half_passes_bit_for_bit(dtype, r, penalties, loss, monkeypatch):
    """step_block's one pass over a CSR block (the W update row by row between its two
    halves) against the update from w_products, then block_partials: the same W, the same
    partials, with and without the loss, run by run (runs of about 23 non-zeros here)."""
    from dnmf.kernels import products, step
    from dnmf.kernels.beta import Rule
    from dnmf.kernels.updates import update_w

    V, W, H = _block(dtype, seed=11, r=r)
    rule = Rule(solver="mu", beta=1.0, eps=1e-6, l1_w=penalties[0], l2_w=penalties[1])
    with_loss, exact = loss != "none", loss == "exact"
    monkeypatch.setattr(products, "KL_TILE_ENTRIES", 23)
    calls = []
    monkeypatch.setattr(products, "mu_step", lambda *a, **k: calls.append(1) or sparse_kl.mu_step(*a, **k))
    W_new, partials = step.step_block(V, W, H, H @ H.T, rule, with_loss=with_loss, exact=exact)
    assert calls, "the one-pass step was not taken"
    want_W = update_w(V, W, H, H @ H.T, rule)
    want = products.block_partials(V, want_W, H, rule, with_loss, exact)
    assert W_new.dtype == dtype and W_new.tobytes() == want_W.tobytes()
    assert partials.numer.tobytes() == want.numer.tobytes()
    assert partials.denom.tobytes() == want.denom.tobytes()
    assert partials.loss == want.loss and (partials.loss != 0.0) == with_loss
