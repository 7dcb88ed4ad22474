"""Smoke tests: each script in examples/ runs at a small size and shows what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True, text=True,
        env=env, cwd=cwd, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_digits_parts(tmp_path):
    out = run_example("digits_parts.py", "--rank", 8, "--max-iter", 40, "--out-dir", tmp_path, cwd=tmp_path)
    assert "8 parts" in out and "relative error" in out
    assert (tmp_path / "digit_parts.png").read_bytes()[:4] == b"\x89PNG"


def test_topics_kl_recovers_the_themes(tmp_path):
    out = run_example("topics_kl.py", "--docs", 600, "--max-iter", 150, cwd=tmp_path)
    precision = float(out.rsplit("mean precision of the top words:", 1)[1].split()[0])
    assert precision >= 0.9, out


def test_out_of_core(tmp_path):
    out = run_example(
        "out_of_core.py", "--n-samples", 4000, "--n-features", 120, "--rank", 4, "--rows-per-chunk", 500,
        "--max-iter", 30, "--scheduler", "threads", "--dir", tmp_path, cwd=tmp_path,
    )
    cosine = float(out.split("worst part match (cosine)", 1)[1].split(";")[0])
    assert cosine > 0.95, out
    assert (tmp_path / "result.zarr" / "zarr.json").exists()
