"""``batchnorm tune --storage postgresql://...``: several workers share one study on a real PostgreSQL server.

The server comes from the Debian package (``apt-get install postgresql``),
started by the test in a temporary data directory on loopback and stopped in
a finalizer; without its binaries or the ``psycopg`` driver the test is
skipped with the reason. Three worker processes run the same command; one
of them claims to be on another machine (``BATCHNORM_TUNE_HOST``) and is
killed with SIGKILL in the middle of a trial, so only its Optuna heartbeat
can tell the others it is gone: they train that grid point again after the
grace period. Every grid point ends with exactly one COMPLETE trial, and the
validation accuracies and losses per point, and the best point, equal those
of the same search in SQLite.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

SMALL = ["--data", "synthetic", "--model", "mlp:64-32-10", "--no-progress"]
GRID = ["--grid", "lr=0.003,0.03", "--grid", "momentum=0,0.9", "--trial-steps", "500", "--eval-every", "50"]
STUDY = "shared-grid"
TIMEOUT = 120


def _server_binaries() -> Path | None:
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all((Path(directory) / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL server on 127.0.0.1 with an empty database ``tune``: its URL."""
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    psycopg = pytest.importorskip(
        "psycopg", reason="the PostgreSQL driver is missing: pip install 'batchnorm[postgres]'"
    )
    user: str | None = None
    if os.geteuid() == 0:  # postgres refuses to run as root: run the server as an unprivileged user
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no unprivileged user 'nobody' to run the PostgreSQL server as")
        user = "nobody"
    # Not under pytest's tmp_path: its parents are private to root, and the server user must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="batchnorm-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if user is not None:
        for path in (root, sockets):
            shutil.chown(path, user)
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    port = _free_port()

    def as_server(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            user=user,
            extra_groups=[] if user is not None else None,
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    started = False
    try:
        initdb = as_server(
            [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        )
        assert initdb.returncode == 0, initdb.stderr
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "30"]
        start = as_server([*pg_ctl, "-o", options, "start"])
        started = True
        assert start.returncode == 0, start.stderr + (root / "server.log").read_text()
        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True, connect_timeout=10
        ) as connection:
            connection.execute("CREATE DATABASE tune")
        yield f"postgresql://postgres:unused@127.0.0.1:{port}/tune"
    finally:
        if started:
            as_server([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def _command(out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "batchnorm", "tune", *SMALL, *GRID, "--no-final", "--out", str(out), *options]


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _per_point(results: dict[str, Any]) -> dict[tuple[Any, ...], tuple[Any, Any]]:
    return {
        (trial["params"]["lr"], trial["params"]["momentum"]): (trial["value"], trial["val_loss"])
        for trial in results["trials"]
        if trial["state"] == "complete"
    }


@pytest.mark.slow
def test_workers_share_a_postgres_study_rerun_a_killed_trial_and_equal_sqlite(
    postgres_url: str, tmp_path: Path
) -> None:
    environment = {**os.environ, "BATCHNORM_THREADS": "1"}
    reference = subprocess.run(
        _command(tmp_path / "sqlite"), env=environment, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert reference.returncode == 0, reference.stderr
    expected: dict[str, Any] = json.loads((tmp_path / "sqlite" / "tune.json").read_text())

    storage = ["--storage", postgres_url, "--study-name", STUDY, "--heartbeat", "1", "--grace", "2"]
    victim = subprocess.Popen(
        _command(tmp_path / "victim", *storage),
        env={**environment, "BATCHNORM_TUNE_HOST": "machine-b"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = [
        subprocess.Popen(_command(tmp_path / f"worker{i}", *storage), env=environment, stdout=subprocess.PIPE)
        for i in range(2)
    ]
    killed_number = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
            try:
                trials = _trials(postgres_url)
            except KeyError:  # the study is not created yet
                continue
            mid_trial = [
                trial
                for trial in trials
                if trial.state == optuna.trial.TrialState.RUNNING
                and str(trial.system_attrs.get("worker", "")).startswith("machine-b:")
                and trial.intermediate_values
            ]
            if mid_trial:
                killed_number = mid_trial[0].number
                victim.send_signal(signal.SIGKILL)
                break
        assert killed_number is not None, "the worker of 'machine-b' finished before it could be killed mid-trial"
        for worker in workers:
            output, _ = worker.communicate(timeout=TIMEOUT)
            assert worker.returncode == 0, output
    finally:
        for process in (victim, *workers):
            process.kill()
            process.wait(timeout=TIMEOUT)

    trials = _trials(postgres_url)
    killed = next(trial for trial in trials if trial.number == killed_number)
    assert killed.state == optuna.trial.TrialState.FAIL  # failed by the others' heartbeat check, then retried
    complete = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    points = [(trial.params["lr"], trial.params["momentum"]) for trial in complete]
    assert sorted(points) == sorted({(lr, momentum) for lr in (0.003, 0.03) for momentum in (0.0, 0.9)})
    assert (killed.params["lr"], killed.params["momentum"]) in points  # its point was trained again, once
    assert all(not str(trial.system_attrs["worker"]).startswith("machine-b:") for trial in complete)

    # Each machine's summary holds the whole study and equals the SQLite run's.
    for worker in ("worker0", "worker1"):
        shared: dict[str, Any] = json.loads((tmp_path / worker / "tune.json").read_text())
        assert _per_point(shared) == _per_point(expected)
        assert shared["best"] == expected["best"]
        assert "unused" not in json.dumps(shared)  # the password is masked
    assert len(_per_point(expected)) == 4
    assert len(set(_per_point(expected).values())) == 4  # the points differ, so the comparison means something

    rerun = subprocess.run(
        _command(tmp_path / "rerun", *storage), env=environment, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert rerun.returncode == 0, rerun.stderr
    assert len(_trials(postgres_url)) == len(trials)  # nothing trained again


def test_unreachable_server_is_one_line_exit_2(tmp_path: Path) -> None:
    url = f"postgresql://user:secret@127.0.0.1:{_free_port()}/db"
    result = subprocess.run(
        [sys.executable, "-m", "batchnorm", "tune", *SMALL, *GRID, "--out", str(tmp_path), "--storage", url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot open the database" in lines[0] or "driver is not installed" in lines[0]
    assert "secret" not in result.stderr
