"""A fit (or a resume) that tests/test_checkpoint.py runs in a subprocess and SIGKILLs.

Usage: python checkpoint_child.py MODE V_PATH CKPT_PATH OUT_DIR SOLVER BETA_LOSS MAX_ITER [--die-in NAME:N]

MODE is "fit", "auto" (NMF(checkpoint=CKPT_PATH, resume="auto"): start or resume), "resume-api" (dnmf.checkpoint.resume(path), X from the checkpoint) or
"resume-fit" (NMF(...).fit(X, resume=path)). Prints "iterating" once the first iteration of
this run is done. ``--die-in NAME:N`` SIGKILLs the process at the N-th call of a step of the
checkpoint write: "store" (a block of W being written), "fsync" (the version written, not yet
synced nor pointed to) or "prune" (the pointer switched, old versions not yet removed).
On completion writes W.npy, H.npy and objectives.npy into OUT_DIR.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import numpy as np

import dnmf
from dnmf import checkpoint
from dnmf.run import checkpoint as checkpoint_writer

CHUNKS = 25
RANK = 4


# "alpha_W,alpha_H,l1_ratio" in this variable regularizes the fits (parent and child alike).
PENALTY_ENV = "DNMF_TEST_PENALTY"


def estimator_kwargs(solver: str, beta_loss: str, max_iter: int) -> dict:
    kwargs = dict(
        solver=solver, beta_loss=beta_loss, init="random", random_state=0, max_iter=max_iter,
        tol=0, tol_x=0, chunks=CHUNKS,
    )
    if os.environ.get(PENALTY_ENV):
        alpha_W, alpha_H, l1_ratio = (float(x) for x in os.environ[PENALTY_ENV].split(","))
        kwargs.update(alpha_W=alpha_W, alpha_H=alpha_H, l1_ratio=l1_ratio)
    return kwargs


def _die_on_call(count: int, original):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return wrapper


def install_death(spec: str) -> None:
    name, count = spec.split(":")
    count = int(count)
    if name == "store":
        checkpoint_writer._store_block = _die_on_call(count, checkpoint_writer._store_block)
    elif name == "fsync":
        checkpoint_writer.fsync_tree = _die_on_call(count, checkpoint_writer.fsync_tree)
    elif name == "prune":
        checkpoint_writer.Checkpointer._prune = _die_on_call(count, checkpoint_writer.Checkpointer._prune)
    else:
        raise SystemExit(f"unknown --die-in {spec}")


def main(argv: list[str]) -> None:
    mode, v_path, ckpt, out, solver, beta_loss, max_iter = argv[:7]
    if len(argv) > 7:
        assert argv[7] == "--die-in"
        install_death(argv[8])
    warnings.simplefilter("ignore")
    announced = []

    def announce(record):
        if not announced:
            announced.append(True)
            print("iterating", flush=True)

    kwargs = estimator_kwargs(solver, beta_loss, int(max_iter))
    if mode == "fit":
        model = dnmf.NMF(RANK, checkpoint=ckpt, checkpoint_every=1, callbacks=[announce], **kwargs)
        W = model.fit_transform(v_path)
    elif mode == "auto":
        model = dnmf.NMF(RANK, checkpoint=ckpt, resume="auto", checkpoint_every=1, callbacks=[announce], **kwargs)
        W = model.fit_transform(v_path)
    elif mode == "resume-api":
        model = checkpoint.resume(ckpt, callbacks=[announce])
        W = checkpoint.load(ckpt).W  # resume() returns the estimator; W is in the final checkpoint
    elif mode == "resume-fit":
        model = dnmf.NMF(RANK, checkpoint_every=1, callbacks=[announce], **kwargs)
        W = model.fit_transform(v_path, resume=ckpt)
    else:
        raise SystemExit(f"unknown mode {mode}")
    W = W.compute() if hasattr(W, "compute") else W
    np.save(os.path.join(out, "W.npy"), W)
    np.save(os.path.join(out, "H.npy"), model.components_)
    np.save(os.path.join(out, "objectives.npy"), np.array([r["objective"] for r in model.history_]))
    np.save(os.path.join(out, "iterations.npy"), np.array([r["iteration"] for r in model.history_]))


if __name__ == "__main__":
    main(sys.argv[1:])
