"""Smoke tests: each script in examples/ runs at a small size and shows what it promises.

The scripts' ``main(argv)`` is called in this process (a subprocess would only add start-up time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args, capsys) -> str:
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(a) for a in args])
    return capsys.readouterr().out


def test_digits_parts(tmp_path, capsys):
    out = run_example("digits_parts.py", "--rank", 8, "--max-iter", 40, "--out-dir", tmp_path, capsys=capsys)
    assert "8 parts" in out and "relative error" in out
    assert (tmp_path / "digit_parts.png").read_bytes()[:4] == b"\x89PNG"


def test_topics_kl_recovers_the_themes(capsys):
    out = run_example("topics_kl.py", "--docs", 600, "--max-iter", 150, capsys=capsys)
    precision = float(out.rsplit("mean precision of the top words:", 1)[1].split()[0])
    assert precision >= 0.9, out


def test_out_of_core(tmp_path, capsys):
    out = run_example(
        "out_of_core.py", "--n-samples", 4000, "--n-features", 120, "--rank", 4, "--rows-per-chunk", 500,
        "--max-iter", 30, "--scheduler", "threads", "--dir", tmp_path, capsys=capsys,
    )
    cosine = float(out.split("worst part match (cosine)", 1)[1].split(";")[0])
    assert cosine > 0.95, out
    assert (tmp_path / "result.zarr" / "zarr.json").exists()
