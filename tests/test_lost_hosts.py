"""Lost hosts: the scheduler and the workers on "hosts" of their own, Linux network namespaces
joined by veth pairs to a bridge (addresses private to the test, created and removed by it).

(a) one worker host's link is cut mid-fit (``ip link set eth0 down``): the scheduler drops the
    worker, its tasks run again elsewhere from V and the re-rooted W, and the fit ends bitwise
    equal to an undisturbed one;
(b) the scheduler is killed mid-fit and a new one started at the same address: the driver's
    command fails, and the same command (``--resume auto``) rerun against the new scheduler
    resumes from the checkpoint and ends bitwise equal.

Skipped, with the reason printed, where the machine cannot create network namespaces.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dnmf
from dnmf.run import checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from test_batch import wait_for_lines  # noqa: E402
from test_checkpoint import same_bits, write_zarr  # noqa: E402

PORT = 8786
# Quick to notice a lost peer: the scheduler drops a worker it has not heard from for 5 s, a
# connection silent for 15 s is closed (the least dask allows: its keep-alive probes).
DASK_ENV = {
    "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "15s",
    "DASK_LOGGING__DISTRIBUTED": "error",
}


def _netns_unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    name = f"dnmf{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class Hosts:
    """Network namespaces "s" (the scheduler and the driver), "w1", "w2" (a worker each), each
    with an ``eth0`` on a bridge in a namespace of its own, on a /24 private to the test."""

    def __init__(self, names=("s", "w1", "w2")):
        self.tag = f"dnmf{os.getpid() % 100000}"
        self.subnet = f"10.213.{random.Random(os.getpid()).randrange(1, 250)}"
        self.bridge = f"{self.tag}br"
        self.names = {name: f"{self.tag}{name}" for name in names}
        self.addresses = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(names)}
        self.processes: list[subprocess.Popen] = []
        self._made: list[str] = []

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def create(self) -> None:
        self.ip("netns", "add", self.bridge)
        self._made.append(self.bridge)
        self.ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, (name, netns) in enumerate(self.names.items()):
            self.ip("netns", "add", netns)
            self._made.append(netns)
            self.ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", f"p{i}",
                    "netns", self.bridge)
            self.ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0")
            self.ip("-n", self.bridge, "link", "set", f"p{i}", "up")
            self.ip("-n", netns, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            self.ip("-n", netns, "link", "set", "eth0", "up")
            self.ip("-n", netns, "link", "set", "lo", "up")

    def start(self, host: str, command: list[str], **kwargs) -> subprocess.Popen:
        """Run ``command`` on ``host`` (its network namespace); stopped at the end."""
        env = {**os.environ, **DASK_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *command], env=env, **kwargs)
        self.processes.append(proc)
        return proc

    def scheduler(self) -> subprocess.Popen:
        proc = self.start("s", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                self.addresses["s"], "--port", str(PORT), "--no-dashboard"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_for_port()
        return proc

    def worker(self, host: str) -> subprocess.Popen:
        return self.start(host, [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--host",
                                 self.addresses[host], "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                 "--memory-limit", "1GiB"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def address(self) -> str:
        return f"tcp://{self.addresses['s']}:{PORT}"

    def wait_for_port(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ip", "netns", "exec", self.names["s"], sys.executable, "-c",
                 f"import socket; socket.create_connection(('{self.addresses['s']}', {PORT}), timeout=1)"],
                capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.3)
        pytest.fail("the scheduler did not start listening")

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        code = (f"from distributed import Client; c = Client('{self.address}', timeout=20); "
                f"c.wait_for_workers({n}, timeout={timeout}); c.close()")
        probe = subprocess.run(["ip", "netns", "exec", self.names["s"], sys.executable, "-c", code],
                               env={**os.environ, **DASK_ENV}, capture_output=True, text=True, timeout=timeout + 30)
        assert probe.returncode == 0, probe.stderr[-2000:]

    def cut(self, host: str) -> None:
        self.ip("-n", self.names[host], "link", "set", "eth0", "down")

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture
def hosts():
    reason = _netns_unavailable_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    net = Hosts()
    try:
        net.create()
        yield net
    finally:
        net.close()


@pytest.fixture
def problem(tmp_path):
    rng = np.random.default_rng(5)
    V = rng.random((3000, 5)) @ rng.random((5, 200)) + 0.05 * rng.random((3000, 200))
    path = write_zarr(tmp_path / "V.zarr", V)
    return V, path


MAX_ITER = 60


def fit_command(V_path, out, ckpt, log, spill, scheduler) -> list[str]:
    return [sys.executable, "-m", "dnmf", "fit", V_path, "-o", str(out), "-r", "5", "--init", "random", "--seed", "2",
            "--tol", "0", "--tol-x", "0", "--max-iter", str(MAX_ITER), "--chunks", "250", "--scheduler", scheduler,
            "-q", "--checkpoint", str(ckpt), "--resume", "auto", "--checkpoint-every", "5", "--log-json", str(log),
            "--overwrite", "--spill-dir", str(spill), "--reroot-every", "5", "--cache", "false"]


def reference(V_path, tmp_path) -> dnmf.results.Result:
    done = subprocess.run(
        fit_command(V_path, tmp_path / "ref.zarr", tmp_path / "ref-ckpt", tmp_path / "ref.jsonl", tmp_path / "ref-spill",
                    "threads"),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return dnmf.results.load_result(tmp_path / "ref.zarr")


def assert_same_result(out: Path, ref) -> None:
    got = dnmf.results.load_result(out)
    assert got.n_iter == ref.n_iter == MAX_ITER
    assert same_bits(np.asarray(got.H), np.asarray(ref.H))
    assert same_bits(got.W.compute(), ref.W.compute())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_host_cut_off_the_network_mid_fit_changes_nothing(hosts, problem, tmp_path):
    _, V_path = problem
    ref = reference(V_path, tmp_path)
    hosts.scheduler()
    hosts.worker("w1")
    hosts.worker("w2")
    hosts.wait_for_workers(2)
    out, log = tmp_path / "r.zarr", tmp_path / "log.jsonl"
    driver = hosts.start("s", fit_command(V_path, out, tmp_path / "ckpt", log, tmp_path / "spill", hosts.address),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(log, 12)
    hosts.cut("w1")
    cut_at = len(log.read_text().splitlines())
    _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err[-3000:]
    print(f"link of w1 cut after iteration {cut_at}")
    assert 0 < cut_at < MAX_ITER
    assert_same_result(out, ref)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_scheduler_is_replaced_and_the_same_command_resumes_bitwise(hosts, problem, tmp_path):
    _, V_path = problem
    ref = reference(V_path, tmp_path)
    scheduler = hosts.scheduler()
    workers = [hosts.worker("w1"), hosts.worker("w2")]
    hosts.wait_for_workers(2)
    out, log, ckpt = tmp_path / "r.zarr", tmp_path / "log.jsonl", tmp_path / "ckpt"
    command = fit_command(V_path, out, ckpt, log, tmp_path / "spill", hosts.address)
    driver = hosts.start("s", command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(log, 12)
    hosts.stop(scheduler)  # SIGKILL: the scheduler's state is gone
    lost_at = len(log.read_text().splitlines())
    try:
        _, err = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # still waiting for the scheduler: stop it as a batch system would
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
    assert driver.returncode != 0, "the fit cannot have finished without its scheduler"
    # A new scheduler at the same address; the workers of the old one are replaced too.
    for worker in workers:
        hosts.stop(worker)
    hosts.scheduler()
    hosts.worker("w1")
    hosts.worker("w2")
    hosts.wait_for_workers(2)
    saved = checkpoint.load(ckpt).iteration
    logged = len(log.read_text().splitlines())
    again = hosts.start("s", command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    print(f"scheduler killed after iteration {lost_at}; first driver exited {driver.returncode}; "
          f"resumed from iteration {saved}")
    rerun = [json.loads(line) for line in log.read_text().splitlines()[logged:]]
    assert saved >= 5 and rerun[0]["iteration"] == saved + 1  # resumed, not restarted
    assert_same_result(out, ref)
