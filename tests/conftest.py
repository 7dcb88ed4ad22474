import hashlib
from pathlib import Path

import numpy as np
import pytest


def planted_parts(n=60, p=40, seed=1301, noise=0.05):
    """The seed chapter's demonstration matrix: three overlapping block parts plus noise."""
    rng = np.random.default_rng(seed)
    H_true = np.zeros((3, p))
    H_true[0, 0:14] = 1
    H_true[1, 12:27] = 1
    H_true[2, 25:40] = 1
    W_true = rng.uniform(0, 1, size=(n, 3))
    V = W_true @ H_true + rng.uniform(0, noise, size=(n, p))
    return V, W_true, H_true


@pytest.fixture
def parts():
    return planted_parts()


@pytest.fixture
def lowrank():
    rng = np.random.default_rng(0)
    return rng.random((120, 4)) @ rng.random((4, 50)) + 0.01 * rng.random((120, 50))


def custom_start(shape, r, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n, p = shape
    return (rng.uniform(0.1, 1, (n, r)).astype(dtype), rng.uniform(0.1, 1, (r, p)).astype(dtype))


def one_line_error(stderr: str) -> str:
    """The single 'Error: ...' line of a failed command (no traceback, nothing else)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def best_cosines(H, H_true):
    """For each planted row of H_true, the best cosine similarity with a learned row of H."""
    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    return (Tn @ Hn.T).max(axis=1)


def worker_killer(client, at_iteration: int, killed: list):
    """A fit callback that SIGKILLs one worker process of ``client`` after iteration
    ``at_iteration`` and waits until the scheduler has noticed; the victim goes in ``killed``."""
    import os
    import signal
    import time

    def kill_one(record):
        if record.iteration == at_iteration:
            pids = client.run(os.getpid)
            victim = sorted(pids)[0]
            killed.append(victim)
            os.kill(pids[victim], signal.SIGKILL)
            deadline = time.time() + 30
            while victim in client.scheduler_info()["workers"] and time.time() < deadline:
                time.sleep(0.05)

    return kill_one


def tree_digest(path) -> str:
    """A digest of every file's name and bytes under ``path`` (or of one file)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        digest.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return digest.hexdigest()
