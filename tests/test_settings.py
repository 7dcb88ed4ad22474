"""The settings table: one place validates every parameter, before any data is touched."""

import numpy as np
import pytest
from click.testing import CliRunner

import dnmf
from dnmf.cli import main
from dnmf.errors import ParameterError
from dnmf.settings import DEFAULTS, TABLE, FitSettings, iterate_settings


def test_the_table_holds_every_estimator_parameter_with_its_default():
    params = dnmf.NMF().get_params()
    assert set(params) == set(DEFAULTS)
    assert all(params[name] == default for name, default in DEFAULTS.items())


def test_every_default_passes_its_own_check():
    settings = FitSettings.from_params()
    assert settings.solver == "mu" and settings.beta == 2.0 and settings.eps == 1e-10
    assert settings.rules.max_iter == 200 and settings.callbacks == ()


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("n_components", 0, "n_components a positive integer"),
        ("solver", "als", "solver in"),
        ("beta_loss", "poisson", "beta_loss in"),
        ("init", "svd", "init in"),
        ("max_iter", 2.5, "max_iter a positive integer"),
        ("tol", -1, "tol a non-negative number"),
        ("random_state", "seven", "random_state"),
        ("chunks", 0, "chunks"),
        ("callbacks", [print, 3], "callbacks"),
        ("missing", "NA", "missing in"),
        ("n_runs", 0, "n_runs"),
        ("checkpoint", 3, "checkpoint"),
        ("checkpoint_every", 0, "checkpoint_every"),
        ("cache", "yes", "cache"),
        ("reroot_every", -1, "reroot_every"),
        ("inner_sweeps", "many", "inner_sweeps"),
        ("local", "sometimes", "local"),
        ("column_chunks", 2.5, "column_chunks"),
        ("objective_every", 0, "objective_every"),
    ],
)
def test_a_bad_parameter_is_refused_before_the_matrix_is_opened(tmp_path, name, value, match):
    # The input does not exist: the parameter's error comes first, naming it.
    with pytest.raises(ParameterError, match=match):
        dnmf.NMF(**{"n_components": 2, name: value}).fit(str(tmp_path / "nowhere.zarr"))


def test_an_unknown_parameter_is_named():
    with pytest.raises(ParameterError, match="Unknown parameter.*alpha"):
        FitSettings.from_params(alpha=0.1)


def test_the_checkpoint_records_the_iterate_settings_of_the_table():
    settings = FitSettings.from_params(n_components=3, random_state=4, beta_loss="kullback-leibler").for_shape((10, 8))
    assert iterate_settings(settings) == {
        "n_components": 3, "solver": "mu", "beta": 1.0, "init": "nndsvda", "seed": 4, "eps": 1e-10,
        "alpha_W": 0.0, "alpha_H": 0.0, "l1_ratio": 0.0,
    }
    assert set(iterate_settings(settings)) == {s.field or s.name for s in TABLE if s.iterates}


def test_every_parameter_with_help_is_an_option_of_dnmf_fit():
    text = CliRunner().invoke(main, ["fit", "--help"]).output
    for setting in TABLE:
        if setting.help:
            flag = {"n_components": "--rank", "random_state": "--seed", "alpha_W": "--alpha-w", "alpha_H": "--alpha-h"}.get(setting.name, "--" + setting.name.replace("_", "-"))
            assert flag in text and setting.help.split()[0] in text, setting.name


def test_the_cli_fit_equals_the_library_fit_with_options_from_the_table(tmp_path):
    rng = np.random.default_rng(0)
    V = rng.random((60, 4)) @ rng.random((4, 30))
    np.save(tmp_path / "V.npy", V)
    out = tmp_path / "r.zarr"
    args = ["fit", str(tmp_path / "V.npy"), "-r", "3", "-o", str(out), "--solver", "bpp", "--init", "random",
            "--n-runs", "2", "--max-iter", "8", "--tol-x", "0", "--seed", "5", "--scheduler", "threads", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = dnmf.NMF(3, solver="bpp", init="random", n_runs=2, max_iter=8, tol_x=0, random_state=5)
    with pytest.warns(Warning):
        model.fit(V)
    assert np.array_equal(dnmf.results.load_result(out).H, model.components_)


def test_the_cli_regularization_flags_equal_the_library_fit(tmp_path):
    rng = np.random.default_rng(0)
    V = 10 * rng.random((60, 4)) @ rng.random((4, 30))
    np.save(tmp_path / "V.npy", V)
    out = tmp_path / "r.zarr"
    args = ["fit", str(tmp_path / "V.npy"), "-r", "3", "-o", str(out), "--solver", "hals", "--init", "random",
            "--max-iter", "8", "--tol-x", "0", "--seed", "5", "--alpha-w", "0.2", "--alpha-h", "0.05",
            "--l1-ratio", "0.5", "--scheduler", "threads", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = dnmf.NMF(3, solver="hals", init="random", max_iter=8, tol_x=0, random_state=5, alpha_W=0.2, alpha_H=0.05,
                     l1_ratio=0.5)
    with pytest.warns(Warning):
        model.fit(V)
    assert np.array_equal(dnmf.results.load_result(out).H, model.components_)
    plain = dnmf.NMF(3, solver="hals", init="random", max_iter=8, tol_x=0, random_state=5)
    with pytest.warns(Warning):
        plain.fit(V)
    assert not np.array_equal(plain.components_, model.components_)
    bad = CliRunner().invoke(main, [*args[:-1], "--alpha-h", "lots", "-q"])
    assert bad.exit_code != 0 and "same" in bad.output
