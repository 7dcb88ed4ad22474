"""Nothing the user owns is ever modified or deleted by an output path (issue 14, cases 1 and 3).

Every refusal is a real CLI run that exits 1 with one line on stderr, and leaves every byte of
every file under the workspace as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from dnmf.cli import main
from dnmf.data.convert import convert
from dnmf.data.outputs import MARKER, check_output
from dnmf.data.results import is_result, save_array
from dnmf.errors import StoreError

from conftest import one_line_error

THREADS = ["--scheduler", "threads", "--quiet"]
FAST = [*THREADS, "--max-iter", "2"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a symlink's target, or 'dir'."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                entries[os.path.relpath(path, root)] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as file:
                    entries[os.path.relpath(path, root)] = hashlib.sha256(file.read()).hexdigest()
            else:
                entries[os.path.relpath(path, root)] = "dir"
    return entries


def assert_refused(args, root) -> str:
    """Run the CLI with ``args``: exit 1, one line, and no entry under ``root`` changed or added."""
    before = snapshot(root)
    result = run_cli(*args)
    assert result.exit_code == 1, (args, result.output)
    line = one_line_error(result.stderr)
    assert snapshot(root) == before, args
    return line


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project folder: data/V.npy and data/V.zarr, a result R.zarr, a checkpoint runs/ck,
    an unrelated notes.txt and symlinks to the inputs."""
    root = tmp_path_factory.mktemp("template") / "project"
    (root / "data").mkdir(parents=True)
    np.save(root / "data" / "V.npy", np.random.default_rng(0).random((12, 5)))
    convert(root / "data" / "V.npy", root / "data" / "V.zarr")
    (root / "notes.txt").write_text("mine\n")
    V = root / "data" / "V.zarr"
    assert run_cli("fit", V, "-r", 2, "-o", root / "R.zarr", *FAST).exit_code == 0
    ck = run_cli("fit", V, "-r", 2, "-o", root / "scratch.zarr", "--checkpoint", root / "runs" / "ck",
                 "--checkpoint-every", 1, *FAST)
    assert ck.exit_code == 0, ck.output
    shutil.rmtree(root / "scratch.zarr")
    for target in ("data/V.zarr", "data/V.npy", "R.zarr"):
        os.symlink(target, root / ("link-" + os.path.basename(target)))
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch):
    """A fresh copy of the template, and the current folder."""
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


# ---------------------------------------------------------------------------
# Case 1: --overwrite removes whatever is at the output path


def test_fit_over_its_own_input_is_refused(project):
    line = assert_refused(["fit", "data/V.zarr", "-r", 2, "-o", "data/V.zarr", "--overwrite", *FAST], project)
    assert "is the input" in line


def test_fit_into_the_current_folder_is_refused(project):
    line = assert_refused(["fit", "data/V.zarr", "-r", 3, "-o", ".", "--overwrite", *FAST], project)
    assert "current folder" in line


def test_convert_to_an_empty_path_is_refused(project):
    line = assert_refused(["convert", "data/V.npy", "", "--overwrite"], project)
    assert "empty" in line


def test_resume_over_the_input_holding_the_checkpoint_is_refused(project):
    shutil.move(project / "runs" / "ck", project / "data" / "V.zarr" / "ck")
    line = assert_refused(["resume", "data/V.zarr/ck", "-o", "data/V.zarr", "--overwrite", *FAST], project)
    assert "holds the checkpoint" in line


def test_convert_over_its_source_is_refused(project):
    line = assert_refused(["convert", "data/V.npy", "data/V.npy", "--overwrite"], project)
    assert "is the source" in line


def test_overwrite_refuses_what_dnmf_did_not_write(project):
    (project / "mine").mkdir()
    (project / "mine" / "thesis.tex").write_text("years of work\n")
    line = assert_refused(["fit", "data/V.zarr", "-r", 2, "-o", "mine", "--overwrite", *FAST], project)
    assert "not something dnmf wrote" in line
    assert_refused(["convert", "data/V.npy", "notes.txt", "--overwrite"], project)
    assert_refused(["transform", "R.zarr", "data/V.zarr", "-o", "runs/ck", "--overwrite", *THREADS], project)


# ---------------------------------------------------------------------------
# Case 3: --log-json inside an input


@pytest.mark.parametrize("log", ["data/V.zarr/zarr.json", "data/V.zarr/new.jsonl", "data/V.npy", "runs/ck/log.jsonl",
                                 "link-V.npy", "R.zarr/log.jsonl"])
def test_log_json_never_writes_inside_an_input(project, log):
    assert_refused(["fit", "data/V.zarr", "-r", 2, "-o", "data/out.zarr", "--log-json", log, *FAST], project)


def test_log_json_appends_to_its_own_log_but_not_to_other_files(project):
    for out in ("a.zarr", "b.zarr"):
        ok = run_cli("fit", "data/V.zarr", "-r", 2, "-o", out, "--log-json", "fit.jsonl", *FAST)
        assert ok.exit_code == 0, ok.output
    lines = (project / "fit.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(isinstance(json.loads(line), dict) for line in lines)
    line = assert_refused(["fit", "data/V.zarr", "-r", 2, "-o", "c.zarr", "--log-json", "notes.txt", *FAST], project)
    assert "not a JSON-lines log" in line


# ---------------------------------------------------------------------------
# A small path fuzz: fit, convert and transform against their inputs and a checkpoint

INPUTS = {
    "fit": ("data/V.zarr",),
    "convert": ("data/V.npy",),
    "transform": ("R.zarr", "data/V.zarr"),
}


def command(name: str, out: str) -> list:
    if name == "fit":
        return ["fit", "data/V.zarr", "-r", 2, "-o", out, "--checkpoint", "runs/new-ck", *FAST]
    if name == "convert":
        return ["convert", "data/V.npy", out, "--quiet"]
    return ["transform", "R.zarr", "data/V.zarr", "-o", out, *THREADS]


def bad_outputs(name: str) -> list[str]:
    """Outputs equal to, inside or above each input and a checkpoint, the current folder and
    its parent, the empty path, a symlink to an input and a detour through '..'."""
    outs = [".", "", "..", "./", "runs/ck", "runs/ck/out.zarr", "runs"]
    for path in INPUTS[name]:
        parent, base = os.path.split(path)
        outs += [path, f"{path}/out.zarr", f"link-{base}", f"data/../{path}"]
        outs += [parent] if parent else []
    if name == "fit":
        outs += ["runs/new-ck", "runs/new-ck/out.zarr"]
    return outs


FUZZ = [(name, out, overwrite) for name in INPUTS for out in bad_outputs(name) for overwrite in (False, True)]


@pytest.mark.parametrize("name, out, overwrite", FUZZ, ids=[f"{n}-{o or 'empty'}-{w}" for n, o, w in FUZZ])
def test_fuzz_refusals_change_nothing(project, name, out, overwrite):
    assert_refused(command(name, out) + (["--overwrite"] if overwrite else []), project)


@pytest.mark.parametrize("name", list(INPUTS))
def test_fuzz_outputs_beside_the_input_work_and_overwrite_their_own(project, name):
    before = snapshot(project)
    first = run_cli(*command(name, "data/out.zarr"))
    assert first.exit_code == 0, first.output
    after = snapshot(project)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith(("data/out.zarr", "runs/new-ck")) for k in after.keys() - before.keys())
    shutil.rmtree(project / "runs" / "new-ck", ignore_errors=True)
    again = run_cli(*command(name, "data/out.zarr"), "--overwrite")
    assert again.exit_code == 0, again.output
    assert {k: v for k, v in snapshot(project).items() if k in before} == before


# ---------------------------------------------------------------------------
# The Python API follows the same rule


def test_library_writers_replace_only_their_own(tmp_path):
    np.save(tmp_path / "V.npy", np.ones((4, 3)))
    convert(tmp_path / "V.npy", tmp_path / "V.zarr")
    assert zarr.open_array(str(tmp_path / "V.zarr"), mode="r").attrs[MARKER] == {"written_by": "convert"}
    convert(tmp_path / "V.npy", tmp_path / "V.zarr", overwrite=True)
    save_array(tmp_path / "W.zarr", np.ones((4, 2)))
    save_array(tmp_path / "W.zarr", np.zeros((4, 2)), overwrite=True)
    (tmp_path / "empty").mkdir()
    save_array(tmp_path / "empty", np.ones((4, 2)), overwrite=True)
    foreign = zarr.create_array(store=str(tmp_path / "foreign.zarr"), shape=(2, 2), dtype="f8")
    foreign[...] = 1
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="not something dnmf wrote"):
        save_array(tmp_path / "foreign.zarr", np.ones((4, 2)), overwrite=True)
    with pytest.raises(StoreError, match="is the source"):
        convert(tmp_path / "V.npy", tmp_path / "V.npy", overwrite=True)
    with pytest.raises(StoreError, match="lies inside"):
        save_array(tmp_path / "V.zarr" / "W", np.ones((4, 2)))
    assert snapshot(tmp_path) == before
    assert not is_result(tmp_path / "W.zarr")


def test_urls_are_compared_as_strings():
    with pytest.raises(StoreError, match="lies inside the input"):
        check_output("s3://bucket/V.zarr/out", protected={"input": "s3://bucket/V.zarr/"})
    check_output("s3://bucket/V.zarr.out", protected={"input": "s3://bucket/V.zarr"})


@pytest.mark.parametrize("args", [
    ["plot", "R.zarr", "--out-dir", "R.zarr"],
    ["plot", "R.zarr", "--out-dir", "R.zarr/plots"],
    ["plot", "R.zarr", "--out-dir", "."],
    ["rank", "data/V.npy", "--ranks", "2", "--runs", "1", "--out", "data/V.zarr/survey"],
    ["rank", "data/V.npy", "--ranks", "2", "--runs", "1", "--out", ""],
    ["demo", "--out-dir", ".", "--overwrite"],
    ["demo", "--out-dir", "data", "--overwrite"],
    ["demo", "--out-dir", "", "--quiet"],
])
def test_plot_rank_and_demo_folders_are_guarded(project, args):
    assert_refused(args, project)
