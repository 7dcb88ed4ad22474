"""The compiled loops behind :mod:`dnmf.kernels.sparse_kl` (numba).

Kept apart so that importing the kernels does not import numba and llvmlite (~60 MB in
every worker process): only a fit with KL on sparse blocks loads this module.

Each non-zero costs a dot product of two rank-r rows (W_i · Hᵀ_c) and an update of a rank-r
row by a multiple of another. Written as loops over k, numba compiles both to scalar code:
its vectorizer cannot reorder the dot product's sum, and it leaves straight-line code alone
(numba turns LLVM's SLP vectorizer off by default). So the two row operations are written
here in LLVM's vector type directly, eight lanes at a time (:func:`_lane_dot`,
:func:`_lane_axpy`), with the rank as a compile-time constant (``numba.literally``: one
compiled kernel per rank, cached on disk like the others, and called through :func:`call`).

The dot product's order is fixed and written out: lane l sums the products of columns
l, l + 8, l + 16, ... in order, and the eight lanes are then added as a tree (l + l+4, then
+2, then +1). Columns past the last whole eight count as zeros, exactly as if the rows were
padded. So the value depends on the two rows alone: not on the machine's vector width, the
threads or the kernel asking. An update adds q·x to each column on its own (a multiply, then
an add; never fused), as scalar code would.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_JIT = dict(nopython=True, nogil=True, cache=True, fastmath=False, boundscheck=False)

LANES = 8
_I32 = ir.IntType(32)


def _row_pointer(context, builder, arraytype, array, row):
    """A pointer to ``array[row, 0]`` (a C-contiguous 2-D array)."""
    view = context.make_array(arraytype)(context, builder, array)
    zero = context.get_constant(types.intp, 0)
    return cgutils.get_item_pointer(context, builder, arraytype, view, [row, zero], wraparound=False)


def _lanes(builder, pointer, start, count, vector, align):
    """The vector of ``pointer[start:start + count]``, zeros past ``count``."""
    if count == LANES:
        at = builder.gep(pointer, [ir.Constant(ir.IntType(64), start)])
        return builder.load(builder.bitcast(at, vector.as_pointer()), align=align)
    out = ir.Constant(vector, [0.0] * LANES)
    for lane in range(count):
        value = builder.load(builder.gep(pointer, [ir.Constant(ir.IntType(64), start + lane)]), align=align)
        out = builder.insert_element(out, value, ir.Constant(_I32, lane))
    return out


def _chunks(width: int):
    """(start, count) of the lane groups covering ``width`` columns: whole eights, then the rest."""
    return [(start, min(LANES, width - start)) for start in range(0, width, LANES)]


def _rows_of(*arrays) -> bool:
    """Whether the row operations take these array types: 2-D, C-contiguous (a row's columns
    follow each other), one dtype."""
    return all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == arrays[0].dtype for a in arrays)


def _halves(builder, value, width):
    lanes = ir.VectorType(_I32, width // 2)
    low = builder.shuffle_vector(value, value, ir.Constant(lanes, list(range(width // 2))))
    high = builder.shuffle_vector(value, value, ir.Constant(lanes, list(range(width // 2, width))))
    return low, high


@intrinsic
def _lane_dot(typingctx, A, i, B, c, width):
    """Σ_k A[i, k] B[c, k] over the first ``width`` (a literal) columns, in the fixed order above."""
    if not isinstance(width, types.IntegerLiteral) or not _rows_of(A, B):
        return None
    n = width.literal_value
    sig = A.dtype(A, types.intp, B, types.intp, width)

    def codegen(context, builder, sig, args):
        a, i, b, c, _ = args
        vector = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
        align = sig.args[0].dtype.bitwidth // 8
        row_a = _row_pointer(context, builder, sig.args[0], a, i)
        row_b = _row_pointer(context, builder, sig.args[2], b, c)
        total = None
        for start, count in _chunks(n):
            product = builder.fmul(_lanes(builder, row_a, start, count, vector, align),
                                   _lanes(builder, row_b, start, count, vector, align))
            total = product if total is None else builder.fadd(total, product)
        if total is None:
            return context.get_constant(sig.return_type, 0)
        width_now = LANES
        while width_now > 1:
            low, high = _halves(builder, total, width_now)
            total = builder.fadd(low, high)
            width_now //= 2
        return builder.extract_element(total, ir.Constant(_I32, 0))

    return sig, codegen


@intrinsic
def _lane_axpy(typingctx, Y, y, q, X, x, width):
    """Y[y, k] += q · X[x, k] for the first ``width`` (a literal) columns, eight lanes at a
    time: Y's rows are padded to whole eights, and X's columns past ``width`` count as zeros."""
    if not isinstance(width, types.IntegerLiteral) or not _rows_of(Y, X):
        return None
    n = width.literal_value
    sig = types.void(Y, types.intp, Y.dtype, X, types.intp, width)

    def codegen(context, builder, sig, args):
        y_array, y, q, x_array, x, _ = args
        dtype = context.get_value_type(sig.args[0].dtype)
        vector = ir.VectorType(dtype, LANES)
        align = sig.args[0].dtype.bitwidth // 8
        row_y = _row_pointer(context, builder, sig.args[0], y_array, y)
        row_x = _row_pointer(context, builder, sig.args[3], x_array, x)
        scale = builder.insert_element(ir.Constant(vector, ir.Undefined), q, ir.Constant(_I32, 0))
        scale = builder.shuffle_vector(scale, scale, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
        for start, count in _chunks(n):
            at = builder.bitcast(builder.gep(row_y, [ir.Constant(ir.IntType(64), start)]), vector.as_pointer())
            added = builder.fadd(builder.load(at, align=align),
                                 builder.fmul(scale, _lanes(builder, row_x, start, count, vector, align)))
            builder.store(added, at, align=align)
        return context.get_dummy_value()

    return sig, codegen


def _pairs(builder, a, b, lanes):
    """The lanes ``lanes`` of a and b side by side (b's numbered from LANES on)."""
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


@intrinsic
def _lane_ratios(typingctx, A, i, B, indices, data, j, eps, dots, ratios, width):
    """The dot products of A[i] with B[indices[j + m]], m = 0..7, into ``dots[:8]``, and
    data[j + m] / (dot + eps) into ``ratios[:8]``, for the first ``width`` (a literal) columns.

    Each dot product is :func:`_lane_dot`'s, to the bit: its lanes hold the same products,
    added in the same order. What differs is that the eight trees are summed together, each
    level one add of two rows' lanes side by side (3 adds where 8 rows one by one take 24,
    with as many shuffles), and the eight divisions are one vector division."""
    arrays = (A, B, indices, data, dots, ratios)
    if (not isinstance(width, types.IntegerLiteral) or not _rows_of(A, B)
            or not all(isinstance(a, types.Array) and a.ndim == 1 for a in arrays[2:])
            or not isinstance(indices.dtype, types.Integer)
            or any(a.dtype != A.dtype for a in (data, dots, ratios))):
        return None
    n = width.literal_value
    sig = types.void(A, types.intp, B, indices, data, types.intp, A.dtype, dots, ratios, width)

    def codegen(context, builder, sig, args):
        a, i, b, idx, values, j, eps_value, dots_out, ratios_out, _ = args
        vector = ir.VectorType(context.get_value_type(sig.args[0].dtype), LANES)
        align = sig.args[0].dtype.bitwidth // 8

        def at(arraytype, array, index):
            view = context.make_array(arraytype)(context, builder, array)
            return cgutils.get_item_pointer(context, builder, arraytype, view, [index], wraparound=False)

        row_a = _row_pointer(context, builder, sig.args[0], a, i)
        groups = [(_lanes(builder, row_a, start, count, vector, align), start, count) for start, count in _chunks(n)]
        first = at(sig.args[3], idx, j)
        sums = []
        for m in range(LANES):
            c = context.cast(builder, builder.load(builder.gep(first, [ir.Constant(ir.IntType(64), m)])),
                             sig.args[3].dtype, types.intp)
            row_b = _row_pointer(context, builder, sig.args[2], b, c)
            total = None
            for lanes_a, start, count in groups:
                product = builder.fmul(lanes_a, _lanes(builder, row_b, start, count, vector, align))
                total = product if total is None else builder.fadd(total, product)
            sums.append(total if total is not None else ir.Constant(vector, [0.0] * LANES))
        # _lane_dot's tree, two rows per add: x[l] + x[l + 4], then + 2, then + 1.
        level = [builder.fadd(_pairs(builder, sums[2 * m], sums[2 * m + 1], [0, 1, 2, 3, 8, 9, 10, 11]),
                              _pairs(builder, sums[2 * m], sums[2 * m + 1], [4, 5, 6, 7, 12, 13, 14, 15]))
                 for m in range(4)]
        level = [builder.fadd(_pairs(builder, level[2 * m], level[2 * m + 1], [0, 1, 4, 5, 8, 9, 12, 13]),
                              _pairs(builder, level[2 * m], level[2 * m + 1], [2, 3, 6, 7, 10, 11, 14, 15]))
                 for m in range(2)]
        total = builder.fadd(_pairs(builder, level[0], level[1], [0, 2, 4, 6, 8, 10, 12, 14]),
                             _pairs(builder, level[0], level[1], [1, 3, 5, 7, 9, 11, 13, 15]))
        numerators = builder.load(builder.bitcast(at(sig.args[4], values, j), vector.as_pointer()), align=align)
        splat = builder.insert_element(ir.Constant(vector, ir.Undefined), eps_value, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
        ratio = builder.fdiv(numerators, builder.fadd(total, splat))
        zero = context.get_constant(types.intp, 0)
        for arraytype, array, value in ((sig.args[7], dots_out, total), (sig.args[8], ratios_out, ratio)):
            builder.store(value, builder.bitcast(at(arraytype, array, zero), vector.as_pointer()), align=align)
        return context.get_dummy_value()

    return sig, codegen


@numba.jit(**_JIT)
def _wh_values(indptr, indices, W, Ht, rank):  # pragma: no cover - compiled
    numba.literally(rank)
    out = np.empty(indices.shape[0], dtype=W.dtype)
    for i in range(W.shape[0]):
        for j in range(indptr[i], indptr[i + 1]):
            out[j] = _lane_dot(W, i, Ht, indices[j], rank)
    return out


@numba.jit(**_JIT)
def _times_ht(indptr, indices, data, Ht, rank):  # pragma: no cover - compiled
    """V Hᵀ, (n, r) in the first r columns of an (n, whole eights) array: each value times its
    column's Hᵀ row added into its row at once, in the order and with the operations of
    scipy's V Hᵀ (a multiply, then an add, per column), so the bits are scipy's."""
    numba.literally(rank)
    out = np.zeros((indptr.shape[0] - 1, -(-rank // LANES) * LANES), dtype=Ht.dtype)
    for i in range(out.shape[0]):
        for j in range(indptr[i], indptr[i + 1]):
            _lane_axpy(out, i, data[j], Ht, indices[j], rank)
    return out


@numba.jit(**_JIT)
def _t_times_w(indptr, indices, data, W, p, rank):  # pragma: no cover - compiled
    """Vᵀ W, (p, r) in the first r columns of a (p, whole eights) array: each value times its
    row's W row added into its column's row at once, in the order and with the operations of
    scipy's Vᵀ W on V's CSR arrays (its CSC kernel), so the bits are scipy's."""
    numba.literally(rank)
    out_t = np.zeros((p, -(-rank // LANES) * LANES), dtype=W.dtype)
    for i in range(W.shape[0]):
        for j in range(indptr[i], indptr[i + 1]):
            _lane_axpy(out_t, indices[j], data[j], W, i, rank)
    return out_t


@numba.jit(**_JIT)
def _ratio_times_ht(indptr, indices, data, W, Ht, eps, rank):  # pragma: no cover - compiled
    """(V / (WH + ε)) Hᵀ, (n, r) in the first r columns of an (n, whole eights) array: each
    row's ratios added into the row at once, in the order scipy's product V Hᵀ adds a CSR
    block's values. The rows are whole eights wide so that they are read and written as
    vectors. A row's ratios are formed eight at a time (:func:`_lane_ratios`), the last few
    one by one: the same bits."""
    numba.literally(rank)
    out = np.zeros((W.shape[0], -(-rank // LANES) * LANES), dtype=W.dtype)
    dots = np.empty(LANES, dtype=W.dtype)
    ratios = np.empty(LANES, dtype=W.dtype)
    for i in range(W.shape[0]):
        _add_row_ratios(indptr, indices, data, W, Ht, eps, i, out, i, dots, ratios, rank)
    return out


@numba.jit(**_JIT)
def _add_row_ratios(indptr, indices, data, W, Ht, eps, i, out, row, dots, ratios, rank):  # pragma: no cover - compiled
    """Row i's share of (V / (WH + ε)) Hᵀ added into ``out[row]``: its ratios eight at a time
    (:func:`_lane_ratios`, ``dots`` and ``ratios`` its scratch), the last few one by one."""
    j, end = indptr[i], indptr[i + 1]
    while j + LANES <= end:
        _lane_ratios(W, i, Ht, indices, data, j, eps, dots, ratios, rank)
        for m in range(LANES):
            _lane_axpy(out, row, ratios[m], Ht, indices[j + m], rank)
        j += LANES
    for k in range(j, end):
        c = indices[k]
        _lane_axpy(out, row, data[k] / (_lane_dot(W, i, Ht, c, rank) + eps), Ht, c, rank)


@numba.jit(**_JIT)
def _wt_ratio(indptr, indices, data, W, Ht, scale, eps, update, W_new, wh_out, out_t, rank):  # pragma: no cover - compiled
    """Wᵀ (V / (W_new H + ε)) transposed, (p, r) in the first r columns of ``out_t`` (p, whole
    eights), added there: each ratio added into its column's sums at once, in the order
    scipy's product Vᵀ W adds a CSR block's values (so rows given in runs, one call each, add
    up to the same bits). With ``wh_out`` of length nnz (else 0), W_new H is written there
    too, for the loss. Ratios eight at a time, as in :func:`_ratio_times_ht`.

    Without ``update``, W_new is W (pass W itself). With it, this is a KL MU step, row by row:
    the row's ratios at W's row give its numerator (V / (WH + ε)) Hᵀ, then
    ``W_new[i] = (numerator / scale[i]) · W[i]`` (``scale``: the MU denominator plus ε, as
    :func:`dnmf.kernels.updates.mu_update` forms it), then the row's ratios at W_new's row are
    added as above, while the Hᵀ rows of its columns are still in cache. Each half is the same
    bits as its own kernel: the sums go in the same order."""
    numba.literally(rank)
    keep = wh_out.shape[0] > 0
    acc = np.zeros((1, -(-rank // LANES) * LANES), dtype=W.dtype)
    dots = np.empty(LANES, dtype=W.dtype)
    ratios = np.empty(LANES, dtype=W.dtype)
    for i in range(W.shape[0]):
        start, end = indptr[i], indptr[i + 1]
        if update:
            acc[0, :] = 0
            _add_row_ratios(indptr, indices, data, W, Ht, eps, i, acc, 0, dots, ratios, rank)
            for k in range(rank):
                W_new[i, k] = (acc[0, k] / scale[i, k]) * W[i, k]
        j = start
        while j + LANES <= end:
            _lane_ratios(W_new, i, Ht, indices, data, j, eps, dots, ratios, rank)
            for m in range(LANES):
                if keep:
                    wh_out[j + m] = dots[m]
                _lane_axpy(out_t, indices[j + m], ratios[m], W_new, i, rank)
            j += LANES
        for k in range(j, end):
            c = indices[k]
            s = _lane_dot(W_new, i, Ht, c, rank)
            if keep:
                wh_out[k] = s
            _lane_axpy(out_t, c, data[k] / (s + eps), W_new, i, rank)


# A kernel called with the rank as a plain int goes through numba's literal dispatch on every
# call: ~8 ms of Python holding the GIL here, 20 times per iteration of a 10-block fit, which
# stalled the other thread's reads of a streamed V (MU-KL read 858 ms of blocks per iteration
# against 243 for HALS). The compiled kernel for each signature is kept and called directly.
_ENTRIES: dict = {}


def call(kernel, *args):
    """``kernel(*args)``, its last argument (the rank) a compile-time constant: compiled (or
    loaded from numba's cache) on first use, then called straight."""
    signature = tuple(numba.typeof(a) for a in args[:-1]) + (types.literal(args[-1]),)
    entry = _ENTRIES.get((kernel, signature))
    if entry is None:
        # Compiled for that signature (or loaded from numba's cache) at once, without first
        # typing the rank as an int and being told to start again with it as a constant.
        kernel.compile(signature)
        entry = _ENTRIES[kernel, signature] = kernel.overloads[signature].entry_point
    return entry(*args)
