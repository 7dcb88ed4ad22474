"""Per-block math of NMF: numpy/scipy in, numpy out. Never imports dask.

V is split into row blocks ``V_b`` (all columns), or on a grid into chunks ``V_ij``; W into
the matching row blocks ``W_b``. Every function here works on one block and returns small
numpy results that the graph layers (:mod:`dnmf.solvers`, :mod:`dnmf.grid`, :mod:`dnmf.init`,
:mod:`dnmf.store`, :mod:`dnmf.missing`) sum in fixed-order trees.

Modules, each one idea:

- :mod:`.beta`: the β-divergence: β, the update :class:`Rule` (which says what β means
  for the kernels), the divergence of a block and the objective;
- :mod:`.products`: the products of a block of V with the factors (the :class:`Partials`
  of the H update and the objective, the products of the W update);
- :mod:`.updates`: the update rules (MU, HALS, BPP) of W and of H;
- :mod:`.step`: one iteration's work on a row block, reading V_b once;
- :mod:`.grid`: the same on the chunks of a 2-D grid of V;
- :mod:`.scans`: validation and the sums of V;
- :mod:`.starts`: random starts, the range finder and NNDSVD;
- :mod:`.masked`: the masked objective (missing entries);
- :mod:`.nnls`: non-negative least squares by block principal pivoting.

The names below are those the rest of dnmf uses; the modules hold the rest.
"""

from __future__ import annotations

from .beta import (
    FROBENIUS,
    ITAKURA_SAITO,
    KULLBACK_LEIBLER,
    Rule,
    objective_from_sums,
    penalties,
)
from .grid import (
    FactorSums,
    WProducts,
    add_factor_sums,
    add_w_products,
    chunk_h_partials,
    chunk_w_products,
    column_objective_term,
    grid_update_h,
    grid_update_w,
)
from .products import Partials, add_partials, gram, l1_norm, objective
from .scans import BlockStats, add_stats, block_stats
from .starts import (
    block_times,
    block_transpose_times,
    fill_zeros,
    nndsvd_w_block,
    random_cols,
    random_rows,
)
from .step import initial_partials_block, step_block
from .updates import update_h

__all__ = [
    "FROBENIUS",
    "ITAKURA_SAITO",
    "KULLBACK_LEIBLER",
    "BlockStats",
    "FactorSums",
    "Partials",
    "Rule",
    "WProducts",
    "add_factor_sums",
    "add_partials",
    "add_stats",
    "add_w_products",
    "block_stats",
    "block_times",
    "block_transpose_times",
    "chunk_h_partials",
    "chunk_w_products",
    "column_objective_term",
    "fill_zeros",
    "gram",
    "grid_update_h",
    "grid_update_w",
    "initial_partials_block",
    "l1_norm",
    "nndsvd_w_block",
    "objective",
    "objective_from_sums",
    "penalties",
    "random_cols",
    "random_rows",
    "step_block",
    "update_h",
]
