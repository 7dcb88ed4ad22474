"""A consensus run that tests/test_consensus.py starts in a subprocess and SIGKILLs mid-rank.

Usage: python consensus_child.py V_PATH WORKDIR
"""

from __future__ import annotations

import sys

import numpy as np

import dnmf

RANKS = [4, 6]
SETTINGS = dict(n_replicates=10, max_iter=100, tol=1e-4, random_state=0, chunks=200, max_concurrent=1)

if __name__ == "__main__":
    V = np.load(sys.argv[1])
    dnmf.consensus(V, RANKS, workdir=sys.argv[2], **SETTINGS)
