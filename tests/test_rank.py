"""Model selection: restarts, the rank survey on planted data and on noise, its outputs."""

import json
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import dnmf
from dnmf.errors import DnmfError
from dnmf.rank import (
    RankSurvey,
    consensus_matrix,
    cophenetic_correlation,
    factor_silhouette,
    parse_ranks,
    rank_survey,
)

SURVEY = dict(n_runs=3, holdout_fraction=0.1, max_iter=200, tol=1e-4, tol_x=1e-3, random_state=0)


def planted(k, n=100, p=60, noise=0.2, seed=0):
    """k distinct parts (disjoint column blocks) mixed by uniform weights, plus uniform noise."""
    rng = np.random.default_rng(seed)
    H = np.zeros((k, p))
    width = p // k
    for i in range(k):
        H[i, i * width : (i + 1) * width] = 1
    return rng.uniform(0, 1, (n, k)) @ H + rng.uniform(0, noise, (n, p))


@pytest.fixture(scope="module")
def noise_survey():
    V = np.random.default_rng(1).random((100, 60))
    return rank_survey(V, "2:4", chunks=100, **SURVEY)


# ---------------------------------------------------------------------------
# Restarts


def quiet(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def test_restarts_keep_the_best_and_are_reproducible(lowrank):
    kw = dict(init="random", random_state=3, max_iter=30, tol=0, tol_x=0, chunks=60)
    model = quiet(dnmf.NMF(4, n_runs=4, **kw), lowrank)
    again = quiet(dnmf.NMF(4, n_runs=4, **kw), lowrank)
    losses = model.run_losses_
    assert len(losses) == 4 and len(set(model.run_seeds_)) == 4
    assert losses[model.best_run_] == min(losses)
    assert model.history_[-1]["objective"] == min(losses)
    assert model.reconstruction_err_ == pytest.approx(np.sqrt(2 * min(losses)))
    assert losses == again.run_losses_
    np.testing.assert_array_equal(model.components_, again.components_)
    # Each run is the single fit with its own seed.
    for k in (0, 3):
        single = quiet(dnmf.NMF(4, **{**kw, "random_state": model.run_seeds_[k]}), lowrank)
        assert single.history_[-1]["objective"] == pytest.approx(losses[k], rel=1e-12)


def test_restarts_sequential_equal_parallel(lowrank):
    from dnmf.run.restarts import fit_runs
    from dnmf.settings import FitSettings

    params = dnmf.NMF(3, init="random", random_state=5, max_iter=10, tol=0, tol_x=0, chunks=40).get_params()
    settings = FitSettings.from_params(params, n_runs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = fit_runs(lowrank, settings, max_concurrent=1)
        b = fit_runs(lowrank, settings, max_concurrent=3)
    assert a.losses == b.losses and a.seeds == b.seeds


def test_restarts_with_missing_values(parts):
    V, _, _ = parts
    V = V.copy()
    V[::7, ::5] = np.nan
    model = quiet(dnmf.NMF(3, missing="nan", n_runs=2, init="random", random_state=0, max_iter=20), V)
    assert len(model.run_losses_) == 2 and np.isfinite(model.components_).all()


def test_restarts_need_a_random_start(lowrank):
    with pytest.raises(DnmfError, match="restarts need a random start"):
        dnmf.NMF(3, init="nndsvda", n_runs=2).fit(lowrank)


# ---------------------------------------------------------------------------
# The survey


@pytest.mark.slow
@pytest.mark.parametrize("k", [3, 5, 8])
def test_survey_finds_planted_rank(k):
    V = planted(k)
    survey = rank_survey(V, range(k - 1, k + 2), chunks=100, **SURVEY)
    assert survey.ranks == [1, k - 1, k, k + 1]
    assert survey.structure_found and survey.suggested_rank == k
    heldout = survey.curve("heldout_error")
    assert survey.ranks[int(np.argmin(heldout))] == k
    at_k = survey.results[survey.ranks.index(k)]
    assert at_k.silhouette > 0.9
    before, after = survey.results[1].relative_error, survey.results[3].relative_error
    assert at_k.relative_error < 0.6 * before and after > 0.9 * at_k.relative_error  # the elbow
    assert f"Suggested rank: {k}." in survey.to_table()


def test_survey_claims_no_structure_on_noise(noise_survey):
    assert not noise_survey.structure_found and noise_survey.suggested_rank is None
    assert "No structure found." in noise_survey.to_table()
    assert "no structure beyond rank 1" in noise_survey.reason
    assert noise_survey.ranks == [1, 2, 3, 4]


def test_survey_save_load_plot(noise_survey, tmp_path):
    noise_survey.save(tmp_path / "survey.json")
    data = json.loads((tmp_path / "survey.json").read_text())
    assert data["suggested_rank"] is None and data["results"][0]["cophenetic"] is None
    back = RankSurvey.load(tmp_path / "survey.json")
    np.testing.assert_array_equal(back.curve("heldout_error"), noise_survey.curve("heldout_error"))
    assert back.to_table() == noise_survey.to_table()

    noise_survey.save(tmp_path / "survey.zarr")
    assert RankSurvey.load(tmp_path / "survey.zarr").to_table() == noise_survey.to_table()

    noise_survey.plot(tmp_path / "survey.png")
    assert (tmp_path / "survey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_survey_reproducible_and_respects_missing():
    V = planted(3, n=60, p=30)
    V[0, 0] = np.nan
    kw = {**SURVEY, "n_runs": 2, "max_iter": 30}
    a = rank_survey(V, [2, 3], chunks=30, missing_values="nan", **kw)
    b = rank_survey(V, [2, 3], chunks=30, missing_values="nan", max_concurrent=1, **kw)
    c = rank_survey(V, [2, 3], chunks=60, missing_values="nan", **kw)
    # Same chunks, sequential or concurrent: the same fits. (Bit for bit at ranks >= 2; the
    # core's rank-1 HALS differs run to run in the last bits, which 30 iterations amplify.)
    for name in ("objective", "heldout_error", "cophenetic", "silhouette"):
        np.testing.assert_allclose(a.curve(name), b.curve(name), rtol=1e-4)
    for name in ("objective", "heldout_error"):
        np.testing.assert_array_equal(a.curve(name)[1:], b.curve(name)[1:])
    np.testing.assert_allclose(a.curve("heldout_error"), c.curve("heldout_error"), rtol=1e-4)
    with pytest.raises(DnmfError, match="NaN or infinite"):
        rank_survey(V, [2], **kw)


# ---------------------------------------------------------------------------
# The measures


def test_consensus_and_cophenetic():
    labels = [np.array([0, 0, 1, 1, 2]), np.array([1, 1, 0, 0, 2])]
    C = consensus_matrix(labels)
    assert C[0, 1] == 1 and C[0, 2] == 0 and np.all(np.diag(C) == 1)
    assert cophenetic_correlation(C) == pytest.approx(1.0)
    noisy = consensus_matrix([np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 2]), np.array([2, 0, 0, 1, 1])])
    assert cophenetic_correlation(noisy) < 0.95
    assert np.isnan(cophenetic_correlation(consensus_matrix([np.zeros(4, int)] * 2)))


def test_factor_silhouette():
    rng = np.random.default_rng(0)
    H = np.eye(4, 12) + 0.01 * rng.random((4, 12))
    runs = [H, H[[2, 0, 3, 1]] * 3.0, H[[1, 2, 3, 0]] + 0.001]
    assert factor_silhouette(runs) > 0.95
    assert factor_silhouette([rng.random((4, 12)) for _ in range(3)]) < 0.5
    assert np.isnan(factor_silhouette([H]))


@pytest.mark.parametrize("text,want", [("2:5", [2, 3, 4, 5]), ("2:10:4", [2, 6, 10]), ("5,3,3", [3, 5])])
def test_parse_ranks(text, want):
    assert parse_ranks(text) == want


@pytest.mark.parametrize("bad", ["a:b", "", [0, 2], "1:2:3:4"])
def test_parse_ranks_errors(bad):
    with pytest.raises(DnmfError, match="Expected"):
        parse_ranks(bad)


def test_survey_parameter_errors():
    V = np.ones((10, 8))
    with pytest.raises(DnmfError, match="holdout_fraction strictly between 0 and 1"):
        rank_survey(V, [2], holdout_fraction=0)
    with pytest.raises(DnmfError, match="Rank 9 is larger than"):
        rank_survey(V, [2, 9])


# ---------------------------------------------------------------------------
# Command line


def test_rank_command(tmp_path):
    import zarr
    from click.testing import CliRunner

    from dnmf.cli.rank import rank_command

    path = str(tmp_path / "v.zarr")
    V = planted(3, n=60, p=30)
    zarr.create_array(path, shape=V.shape, chunks=(30, 30), dtype="f8")[:] = V
    out = tmp_path / "survey"
    args = [path, "--ranks", "2:4", "--runs", "2", "--max-iter", "100", "--tol", "1e-4", "--out", str(out)]
    result = CliRunner().invoke(rank_command, args)
    assert result.exit_code == 0, result.output
    assert "Suggested rank: 3." in result.output
    assert RankSurvey.load(out / "survey.json").suggested_rank == 3
    assert (out / "survey.png").stat().st_size > 0

    again = CliRunner().invoke(rank_command, args)
    assert again.exit_code == 1 and "already exists" in again.output

    bad = CliRunner().invoke(rank_command, [path, "--ranks", "x"])
    assert bad.exit_code == 1 and "Expected ranks like" in bad.output
    missing = CliRunner().invoke(rank_command, [str(tmp_path / "nope.zarr")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_restarts_refuse_a_shared_checkpoint(tmp_path):
    import dnmf
    from dnmf.errors import ParameterError

    V = np.random.default_rng(0).random((30, 12))
    with pytest.raises(ParameterError, match="one checkpoint directory"):
        dnmf.NMF(2, init="random", n_runs=3, checkpoint=str(tmp_path / "ck")).fit(V)
    assert not (tmp_path / "ck").exists()


def test_rank_command_with_bpp_and_penalties(tmp_path):
    import zarr
    from click.testing import CliRunner

    from dnmf.cli.rank import rank_command

    path = str(tmp_path / "v.zarr")
    V = planted(3, n=60, p=30)
    zarr.create_array(path, shape=V.shape, chunks=(30, 30), dtype="f8")[:] = V
    out = tmp_path / "survey"
    args = [path, "--ranks", "2:4", "--runs", "2", "--max-iter", "100", "--tol", "1e-4", "--solver", "bpp",
            "--alpha-w", "0.001", "--l1-ratio", "0.5", "--out", str(out)]
    result = CliRunner().invoke(rank_command, args)
    assert result.exit_code == 0, result.output
    assert "Suggested rank: 3." in result.output
    saved = RankSurvey.load(out / "survey.json")
    assert saved.settings["solver"] == "bpp" and saved.settings["alpha_W"] == saved.settings["alpha_H"] == 0.001
    assert saved.settings["l1_ratio"] == 0.5


def test_survey_with_bpp_equals_its_fits_and_penalties_change_them():
    V = planted(3, n=60, p=30)
    common = dict(n_runs=2, max_iter=60, tol=1e-6, random_state=0, solver="bpp")
    plain = rank_survey(V, [3], **common)
    again = rank_survey(V, [3], **common)
    penalized = rank_survey(V, [3], alpha_W=0.01, l1_ratio=1.0, **common)
    assert plain.results[1].run_losses == again.results[1].run_losses  # reproducible
    assert plain.results[1].relative_error < 0.1  # the planted noise's level
    # The penalized objective counts its penalty; the relative error leaves it out.
    assert penalized.results[1].objective > plain.results[1].objective
    assert plain.results[1].relative_error <= penalized.results[1].relative_error < 0.15
