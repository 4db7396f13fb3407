"""Grid search over training options with Optuna, then the full run with the best setting.

``batchnorm tune --grid lr=0.05,0.5,5 --grid norm=batch,none`` trains one
short run (``--trial-steps``) per point of the grid, each with the same seed,
init and batches, keeps the setting with the highest final *validation*
accuracy (ties: the lower validation loss), and trains it for ``--steps``. The answers to the
question this project grew from recommend exactly that: search the starting
learning rate, momentum and weight decay with short runs, then train fully;
and they warn that bad values make training blow up, which is why BN's wider
stable region shows up in the heatmaps.

Engine: :class:`optuna.samplers.GridSampler` on an Optuna study in SQLite
(``--out/study.db``) or any database URL (``--storage``), so that

* running the same command again resumes: finished grid points are never
  trained again (the study is named after the grid and the base settings);
* ``--jobs K`` starts K worker processes that each call ``study.optimize``
  on the shared study (Optuna's multi-process pattern; processes, not
  threads, so each trial runs on its own CPU thread without the GIL);
* several machines can share one study through ``--storage``: run the same
  ``batchnorm tune --storage postgresql://USER:PASSWORD@HOST:PORT/DB`` command
  on each (driver: ``pip install 'batchnorm[postgres]'``).

A trial left RUNNING by a killed process is marked failed and its grid point
re-enqueued: at once when its worker (host and process id, stored with the
trial; the host is ``$BATCHNORM_TUNE_HOST`` when set, else the host name) is
gone from this machine, otherwise when its Optuna heartbeat (every
``--heartbeat`` seconds) is older than ``--grace`` seconds
(:func:`optuna.storages.fail_stale_trials`), which any other worker, or a
rerun of the command, notices. A lock serializes the choice of the next grid
point between all workers of a study, so each point is trained exactly once:
a file lock in ``--out`` for SQLite; for PostgreSQL a session-level advisory
lock on the server (``pg_advisory_lock``, keyed by the study name), held
from the creation of a trial until its grid point is recorded, and released
by the server when a killed worker's connection drops. Inside the lock a
worker also checks the storage for another COMPLETE or RUNNING trial of the
same point; such a trial (possible only with other storages shared between
machines) is recorded with state ``duplicate``, not trained and not counted.

Ctrl-C: a trial in progress is recorded as ``interrupted`` (Optuna state
PRUNED, no traceback) and trained again from its start by the next run; the
search stops with :class:`TuneInterrupted`. In the full run, Ctrl-C saves
its checkpoint (:class:`~batchnorm.lab.training.TrainingInterrupted`), from
which the next run continues. A kill (SIGKILL) leaves the trial RUNNING; the
next run fails and re-enqueues it (see above). Every write is a database
transaction (SQLite commits atomically) or an atomic file replace.

A run stopped by the training divergence guard (:class:`DivergenceError`:
non-finite or exploding loss or weights) ends the trial early. Optuna records
it as PRUNED with the user attribute ``state = "diverged"``; it is listed in
the table, ``tune.json`` and the heatmaps, never dropped.

Files written into ``--out``: ``study.db``, ``tune.json`` (every trial with
params, state and value, the best params and the final run's metrics),
``heatmap_*.png`` (validation accuracy over each pair of grid options, diverged
cells hatched; one panel per ``norm`` when the grid varies it),
``report.html`` (all of it on one self-contained page) and ``final/``
(``metrics.jsonl`` and ``checkpoint.pt`` of the full run, which a rerun
resumes).

The objective is the accuracy on the validation split
(:func:`batchnorm.lab.data.split_validation`: ``--val-fraction`` of each class
of the training split, default 0.1, the same examples for every trial; the
trials train on the rest). Trials never evaluate the test split. The full
run of the best setting trains on the same examples and evaluates the test
split once, at its last step: that number is an unbiased estimate for the
selected setting. (Before the validation split existed, the objective was
the test accuracy; such studies are not reused, as the study definition
names its objective.)
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import html
import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState
from torch import nn

from batchnorm.lab.data import INPUT_NORMS, Dataset, load_dataset, split_validation
from batchnorm.lab.figures import pyplot
from batchnorm.lab.files import write_json_atomically
from batchnorm.lab.models import ACTIVATIONS, NORMS, PLACEMENTS, parse_init
from batchnorm.lab.report import _figure, _page, html_table, settings_table
from batchnorm.lab.training import (
    DivergenceError,
    TrainConfig,
    TrainingInterrupted,
    load_checkpoint,
    resolve_device,
    train,
)

__all__ = [
    "DEFAULT_TRIAL_STEPS",
    "FINISHED_STATES",
    "GRACE_SECONDS",
    "GRID_OPTIONS",
    "HEARTBEAT_SECONDS",
    "ClaimingGridSampler",
    "Grid",
    "TuneInterrupted",
    "WorkerError",
    "WorkerJob",
    "draw_heatmaps",
    "format_params",
    "format_table",
    "option_name",
    "parse_grid",
    "recover",
    "results_table",
    "run_worker",
    "trial_records",
    "tune",
    "worker_main",
    "write_tune_report",
]

GridValue = float | int | str
Grid = dict[str, list[GridValue]]

HEARTBEAT_SECONDS = 2
# A live worker beats every 2 s; 15 s of silence means it is gone (killed, machine down).
GRACE_SECONDS = 15
# The worker's host name as recorded with its trials (set it where machines share a host name, e.g. containers).
HOST_VARIABLE = "BATCHNORM_TUNE_HOST"
CONNECT_TIMEOUT_SECONDS = 10
POLL_SECONDS = 1.0
DEFAULT_TRIAL_STEPS = 500
SQLITE_BUSY_TIMEOUT_SECONDS = 60
FINISHED_STATES = ("complete", "diverged")
OBJECTIVE = "val_accuracy"


# --------------------------------------------------------------------------- grid strings


# The command line's limits (batchnorm.cli.argtypes): --lr and --weight-decay at most 1e6, --momentum below 1.
MAX_GRID_RATE = 1e6


def _number(name: str, text: str, *, positive: bool, below: float | None = None, at_most: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--grid {name}: expected numbers, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"--grid {name}: expected finite numbers {bound}, got {text!r}")
    if below is not None and value >= below:
        raise ValueError(f"--grid {name}: expected numbers >= 0 and < {below:g}, got {text!r}")
    if at_most is not None and value > at_most:
        raise ValueError(f"--grid {name}: expected numbers <= {at_most:g}, got {text!r}")
    return value


def _integer(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--grid {name}: expected positive integers, got {text!r}") from None
    if value < 1:
        raise ValueError(f"--grid {name}: expected positive integers, got {text!r}")
    return value


def _choice(allowed: Sequence[str]) -> Callable[[str, str], GridValue]:
    def parse(name: str, text: str) -> GridValue:
        if text not in allowed:
            raise ValueError(f"--grid {name}: expected one of {', '.join(allowed)}, got {text!r}")
        return text

    return parse


def _init(name: str, text: str) -> GridValue:
    try:
        parse_init(text)
    except ValueError as error:
        raise ValueError(f"--grid {name}: {error}") from None
    return text


# option (TrainConfig field) -> parser of one value; the order is the one shown in --help.
GRID_OPTIONS: dict[str, Callable[[str, str], GridValue]] = {
    "lr": lambda name, text: _number(name, text, positive=True, at_most=MAX_GRID_RATE),
    "momentum": lambda name, text: _number(name, text, positive=False, below=1.0),
    "weight_decay": lambda name, text: _number(name, text, positive=False, at_most=MAX_GRID_RATE),
    "batch_size": _integer,
    "norm": _choice(NORMS),
    "act": _choice(ACTIVATIONS),
    "placement": _choice(PLACEMENTS),
    "init": _init,
    "input_norm": _choice(INPUT_NORMS),
    "groups": _integer,
    "virtual_batch_size": _integer,
    "rmax": lambda name, text: _number(name, text, positive=True),
    "dmax": lambda name, text: _number(name, text, positive=False),
}


def option_name(field_name: str) -> str:
    """The command-line spelling of a TrainConfig field (``weight_decay`` -> ``weight-decay``)."""
    return field_name.replace("_", "-")


def parse_grid(texts: Sequence[str]) -> Grid:
    """Parse repeated ``NAME=V1,V2,...`` strings into ``{TrainConfig field: [values]}``.

    ``NAME`` is a ``train`` option with ``-`` or ``_`` (``weight-decay``,
    ``weight_decay``, ``--lr``); values are converted and checked like the
    option's own (numbers, positive integers, one of the allowed words).
    The order of options and values is kept.

    Raises:
        ValueError: a one-line message naming the bad string and what was expected.
    """
    if not texts:
        raise ValueError("give at least one --grid NAME=V1,V2,... (e.g. --grid lr=0.01,0.1,1)")
    grid: Grid = {}
    known = ", ".join(option_name(name) for name in GRID_OPTIONS)
    for text in texts:
        name_text, separator, values_text = text.partition("=")
        if not separator:
            raise ValueError(f"--grid {text!r}: expected NAME=V1,V2,... (no '=' found)")
        name = name_text.strip().lstrip("-").replace("-", "_").lower()
        if name not in GRID_OPTIONS:
            raise ValueError(f"--grid {text!r}: unknown option {name_text.strip()!r}; choose from {known}")
        if name in grid:
            raise ValueError(f"--grid {option_name(name)} is given twice; list all its values in one --grid")
        pieces = [piece.strip() for piece in values_text.split(",")]
        if not values_text.strip() or any(not piece for piece in pieces):
            raise ValueError(f"--grid {text!r}: empty value; expected {option_name(name)}=V1,V2,...")
        values = [GRID_OPTIONS[name](option_name(name), piece) for piece in pieces]
        for index, value in enumerate(values):
            if value in values[:index]:
                raise ValueError(f"--grid {text!r}: value {pieces[index]!r} is listed twice")
        grid[name] = values
    return grid


def with_params(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """``base`` with the gridded fields set (``params`` maps TrainConfig field names to values)."""
    return dataclasses.replace(base, **params)


def grid_points(grid: Grid) -> list[dict[str, GridValue]]:
    """Every combination of the grid's values, as ``{field: value}``."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_params(params: dict[str, Any]) -> str:
    """``lr=0.5 norm=batch``: a grid point as the options that set it."""
    return " ".join(f"{option_name(name)}={_format_value(value)}" for name, value in params.items())


# --------------------------------------------------------------------------- study and storage


def study_definition(grid: Grid, base: TrainConfig) -> dict[str, Any]:
    """What makes two searches the same: the grid and every base setting that shapes a trial.

    Gridded fields, the data location and the checkpoint interval (trials
    write no files) are left out.
    """
    settings = dataclasses.asdict(base)
    for name in (*grid, "data_dir", "checkpoint_every"):
        settings.pop(name, None)
    return {"grid": grid, "base": settings, "objective": OBJECTIVE}


def default_study_name(definition: dict[str, Any]) -> str:
    """``tune-`` and a short hash of :func:`study_definition`: same grid and settings, same study."""
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return f"tune-{digest[:12]}"


def is_postgres(url: str) -> bool:
    """Whether a storage URL names a PostgreSQL server (``postgresql://`` or ``postgresql+DRIVER://``)."""
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def database_url(url: str) -> str:
    """The URL given to SQLAlchemy: a bare ``postgresql://`` (or ``postgres://``) names the psycopg (3) driver.

    SQLAlchemy's default driver for ``postgresql://`` changed between versions
    (psycopg2, then psycopg); naming it keeps the ``batchnorm[postgres]``
    extra sufficient. An explicit ``postgresql+DRIVER://`` is kept.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def safe_url(url: str) -> str:
    """The storage URL with its password masked (for messages and ``tune.json``)."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Several workers write to one SQLite file: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}}
    if is_postgres(url):
        # An unreachable server fails within seconds instead of the system's TCP timeout.
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS}}
    return {}


def _storage_error(url: str, error: BaseException) -> ValueError:
    """One line for a bad URL, a missing driver or an unreachable server (sqlalchemy's many errors)."""
    if isinstance(error, ImportError):  # Optuna's own wraps the driver's; name the missing module
        cause = error.__cause__ if isinstance(error.__cause__, ImportError) else error
        error = cause
        extra = " (pip install 'batchnorm[postgres]')" if is_postgres(url) else ""
        return ValueError(f"--storage {safe_url(url)}: the database driver is not installed: {error}{extra}")
    text = str(error).strip()
    first_line = text.splitlines()[0].strip() if text else type(error).__name__
    first_line = re.sub(r"^\([\w.]+\)\s*", "", first_line)  # sqlalchemy's "(psycopg2.OperationalError) "
    return ValueError(f"--storage {safe_url(url)}: cannot open the database ({first_line})")


def open_storage(
    url: str, *, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats (so a killed worker's trial can be detected and retried)."""
    with warnings.catch_warnings():
        # heartbeat_interval is marked experimental; the warning gives the user nothing to act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                database_url(url), engine_kwargs=_engine_kwargs(url), heartbeat_interval=heartbeat, grace_period=grace
            )
        except Exception as error:  # a bad URL, a missing driver, an unreachable server: sqlalchemy's many errors
            raise _storage_error(url, error) from None


class ClaimingGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler that also stamps each new trial with the worker (``host:pid``) that made it.

    The stamp is written as the trial is created, before its objective runs,
    so that a trial left RUNNING by a killed process can be told from one
    that is still training. :meth:`grid_params` reads back which grid point
    the sampler gave a trial, even one killed before its params were set.
    """

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        study._storage.set_trial_system_attr(trial._trial_id, "worker", _worker_id())

    def grid_params(self, trial: FrozenTrial) -> dict[str, Any] | None:
        """The grid point behind the trial's ``grid_id`` (None for an enqueued trial or another grid)."""
        grid_id = trial.system_attrs.get("grid_id")
        if grid_id is None or not self._same_search_space(trial.system_attrs.get("search_space", {})):
            return None
        return dict(zip(self._param_names, self._all_grids[grid_id]))


def _sampler(grid: Grid) -> ClaimingGridSampler:
    # The same seed in every process, as Optuna recommends for distributed grid search.
    return ClaimingGridSampler({name: list(values) for name, values in grid.items()}, seed=0)


def open_study(
    storage_url: str,
    study_name: str,
    grid: Grid,
    definition: dict[str, Any],
    *,
    heartbeat: int = HEARTBEAT_SECONDS,
    grace: int = GRACE_SECONDS,
) -> optuna.Study:
    """Create the study or load it, refusing one that was made for another grid or base settings."""
    study = optuna.create_study(
        storage=open_storage(storage_url, heartbeat=heartbeat, grace=grace),
        study_name=study_name,
        sampler=_sampler(grid),
        direction="maximize",
        load_if_exists=True,
    )
    stored = study.user_attrs.get("definition")
    expected = json.loads(json.dumps(definition))  # as it reads back from the database
    if stored is None:
        study.set_user_attr("definition", expected)
    elif stored != expected:
        raise ValueError(
            f"study {study_name!r} in {safe_url(storage_url)} holds another search (grid or base settings differ); "
            "use another --study-name or --out"
        )
    return study


def _host() -> str:
    return os.environ.get(HOST_VARIABLE) or socket.gethostname()


def _worker_id() -> str:
    return f"{_host()}:{os.getpid()}"


def _local_pid(worker: Any) -> int | None:
    """The process id of a worker on this machine, or None for another machine or no record."""
    if not isinstance(worker, str):
        return None
    host, _, pid = worker.rpartition(":")
    return int(pid) if host == _host() and pid.isdigit() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trial_state(trial: FrozenTrial) -> str:
    """The state written to ``tune.json``: complete, diverged, failed, interrupted, duplicate, running, waiting."""
    recorded = trial.user_attrs.get("state")
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return str(recorded) if recorded in ("diverged", "duplicate", "interrupted") else "pruned"
    if trial.state == TrialState.FAIL:
        return "interrupted" if recorded == "interrupted" else "failed"
    return trial.state.name.lower()


def _trial_key(trial: FrozenTrial, names: Sequence[str], sampler: Any) -> tuple[GridValue, ...] | None:
    """The grid point of a trial: its params, the params it was enqueued with, or its grid id's; None if unknown."""
    grid_params = sampler.grid_params(trial) if isinstance(sampler, ClaimingGridSampler) else None
    for params in (trial.params, trial.system_attrs.get("fixed_params") or {}, grid_params or {}):
        if all(name in params for name in names):
            return tuple(params[name] for name in names)
    return None


@dataclass
class StudyProgress:
    """Where a study stands.

    Attributes:
        finished: grid points with a complete or diverged trial.
        pending: grid points neither finished nor being trained (to do, or enqueued again).
        running_elsewhere: RUNNING trials not owned by a process on this machine (another machine's, or
            not claimed yet); a worker waits for them to finish or go stale before it exits.
        running: every RUNNING trial (also those of live processes here, which may be another command's
            worker of the same shared study); a worker waits for them too, so that it exits with every point done.
    """

    finished: int
    pending: int
    running_elsewhere: int
    running: int = 0


def recover(study: optuna.Study, grid: Grid, *, local_only: bool = False, grace: int = GRACE_SECONDS) -> StudyProgress:
    """Fail the trials of dead workers, re-enqueue grid points that have no finished trial; count the rest.

    Call it holding the file lock. A RUNNING trial whose worker was on this
    machine and is gone (killed) is failed at once with state
    ``interrupted``. So is a trial that no worker has stamped yet
    (:class:`ClaimingGridSampler` stamps it just after creating it, under the
    lock): when ``local_only`` (every worker of the study shares this lock,
    as with the default SQLite file in ``--out`` or PostgreSQL's advisory lock) its creator must have
    died holding the lock; otherwise after ``grace`` seconds, as it may belong to
    another machine. A trial of another machine is failed by Optuna once its
    heartbeat is older than ``grace`` seconds (the storage's ``grace_period``). A grid point whose every
    trial ended without a result (failed, interrupted, duplicate) is
    enqueued again with all its params, which Optuna runs before asking the
    grid sampler for a new point.
    """
    with warnings.catch_warnings():
        # fail_stale_trials is marked experimental; Optuna itself calls it the same way.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    storage = study._storage  # the public Study API has no way to fail a trial another process left RUNNING
    now = datetime.datetime.now()  # Optuna stores naive local times
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get("worker")
        pid = _local_pid(worker)
        started = trial.datetime_start
        unclaimed = worker is None and (local_only or (started is not None and (now - started).total_seconds() > grace))
        if unclaimed or (pid is not None and not _process_alive(pid)):
            try:
                storage.set_trial_user_attr(trial._trial_id, "state", "interrupted")
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its worker or another process finished it meanwhile

    names = list(grid)
    finished: set[tuple[GridValue, ...]] = set()
    busy: set[tuple[GridValue, ...]] = set()
    running: set[tuple[GridValue, ...]] = set()
    attempted: set[tuple[GridValue, ...]] = set()
    running_elsewhere = 0
    for trial in study.get_trials(deepcopy=False):
        key = _trial_key(trial, names, study.sampler)
        if trial.state == TrialState.RUNNING and _local_pid(trial.system_attrs.get("worker")) is None:
            running_elsewhere += 1  # on another machine, or not claimed yet: wait for it or its staleness
        if key is None:
            continue
        if trial_state(trial) in FINISHED_STATES:
            finished.add(key)
        elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
            busy.add(key)
            if trial.state == TrialState.RUNNING:
                running.add(key)
        else:
            attempted.add(key)
    for key in sorted(attempted - finished - busy, key=str):
        study.enqueue_trial(dict(zip(names, key)), user_attrs={"retry": True})
    points = {tuple(point.values()) for point in grid_points(grid)}
    return StudyProgress(
        finished=len(points & finished),
        pending=len(points - finished - running),
        running_elsewhere=running_elsewhere,
        running=sum(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False)),
    )


class _Lock:
    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


class _FileLock(_Lock):
    """An exclusive ``flock`` on a file; the operating system releases it when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        handle = self.path.open("a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class _AdvisoryLock(_Lock):
    """A PostgreSQL session-level advisory lock, shared by every worker of the study on any machine.

    Each acquire opens its own connection and takes ``pg_advisory_lock``
    (waiting for the holder); release closes the connection, which ends the
    session and so frees the lock. The server frees it too when a holder is
    killed and its connection drops.
    """

    def __init__(self, url: str, study_name: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        digest = hashlib.sha256(f"batchnorm tune {study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        try:
            self._engine = sqlalchemy.create_engine(
                database_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT", **_engine_kwargs(url)
            )
        except Exception as error:
            raise _storage_error(url, error) from None
        self._url = url
        self._connection: Any = None

    def acquire(self) -> None:
        import sqlalchemy

        try:
            connection = self._engine.connect()
        except Exception as error:
            raise _storage_error(self._url, error) from None
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        self._connection = connection

    def release(self) -> None:
        if self._connection is not None:
            self._connection.close()  # NullPool: the session ends, the server frees its advisory locks
            self._connection = None


def _study_lock(job: WorkerJob) -> _Lock:
    """The lock that serializes the choice of grid points between all workers of the study."""
    return _AdvisoryLock(job.storage, job.study_name) if is_postgres(job.storage) else _FileLock(Path(job.lock_path))


# --------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    """A ``--jobs`` worker process failed (it printed its own error)."""


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during a trial: the trial is recorded as interrupted (retried by the next run), the study kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs (as JSON on its command line): the study, the grid and the base settings.

    ``local_only`` says that every worker of the study takes the same lock
    (the file at ``lock_path`` for the default SQLite storage in ``--out``, or
    PostgreSQL's advisory lock), see :func:`recover`. ``heartbeat`` and
    ``grace`` are the storage's heartbeat interval and grace period in seconds.
    ``device`` is where this machine's trials train (``cpu``, ``cuda:0``,
    ...): not part of the study, so workers on different devices share one.
    """

    storage: str
    study_name: str
    grid: Grid
    base: dict[str, Any]
    lock_path: str
    threads: int
    local_only: bool
    heartbeat: int = HEARTBEAT_SECONDS
    grace: int = GRACE_SECONDS
    device: str = "cpu"


class _ReportToTrial:
    """Sends each validation accuracy of a trial to Optuna as an intermediate value."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    def before_step(self, step: int, model: nn.Module) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, loss: float) -> None:
        pass

    def on_eval(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
        self.trial.report(metrics["val_accuracy"], step)


def _find_duplicate(study: optuna.Study, trial: Trial, params: dict[str, Any]) -> int | None:
    """The number of another trial that already has (or is training) this grid point."""
    names = list(params)
    key = tuple(params.values())
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or _trial_key(other, names, study.sampler) != key:
            continue
        if trial_state(other) in FINISHED_STATES or (other.state == TrialState.RUNNING and other.number < trial.number):
            return other.number
    return None


def _train_trial(trial: Trial, config: TrainConfig, dataset: Dataset, device: str = "cpu") -> float:
    started = time.perf_counter()
    trial.set_user_attr("device", device)
    try:
        result = train(
            config,
            None,
            dataset=dataset,
            callbacks=[_ReportToTrial(trial)],
            progress=False,
            test_eval="never",
            device=device,
        )
    except DivergenceError as error:
        message = str(error)
        step = re.search(r"at step (\d+)", message)
        trial.set_user_attr("state", "diverged")
        trial.set_user_attr("message", message)
        trial.set_user_attr("steps", int(step.group(1)) if step else None)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        raise optuna.TrialPruned(message) from None
    trial.set_user_attr("state", "complete")
    trial.set_user_attr("steps", result.final_step)
    trial.set_user_attr("val_loss", result.val_loss[-1])
    trial.set_user_attr("train_loss", result.train_loss[-1])
    trial.set_user_attr("seconds", result.seconds)
    return result.final_val_accuracy


def run_worker(job: WorkerJob, dataset: Dataset | None = None, on_progress: Callable[[], None] | None = None) -> None:
    """Train grid points of the study until none is left; one process, one trial at a time.

    Each round takes the file lock, recovers dead trials, and lets
    ``study.optimize(n_trials=1)`` pick the next grid point; the lock is
    released inside the objective once the point is recorded, so that the
    next worker sees it as taken. Exits when every grid point is finished;
    waits for trials running in other processes
    (here or on other machines) until they finish or their heartbeat goes stale.
    """
    torch.set_num_threads(job.threads)
    torch.set_flush_denormal(True)
    base = TrainConfig(**job.base)
    if dataset is None:
        dataset = load_dataset(base.data, base.data_dir, seed=base.seed)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=open_storage(job.storage, heartbeat=job.heartbeat, grace=job.grace),
        sampler=_sampler(job.grid),
    )
    lock = _study_lock(job)

    interrupted: list[str] = []

    def objective(trial: Trial) -> float:
        try:
            params = {name: trial.suggest_categorical(name, tuple(values)) for name, values in job.grid.items()}
            duplicate = _find_duplicate(study, trial, params)
        finally:
            lock.release()
        if duplicate is not None:
            trial.set_user_attr("state", "duplicate")
            trial.set_user_attr("duplicate_of", duplicate)
            raise optuna.TrialPruned(f"grid point already taken by trial {duplicate}")
        try:
            return _train_trial(trial, with_params(base, params), dataset, job.device)
        except KeyboardInterrupt as interrupt:
            # Recorded here (Optuna would log a traceback for a KeyboardInterrupt); the point is retried next time.
            where = f" at step {interrupt.step}" if isinstance(interrupt, TrainingInterrupted) else ""
            interrupted.append(f"interrupted in trial {trial.number} ({format_params(params)}){where}")
            trial.set_user_attr("state", "interrupted")
            raise optuna.TrialPruned("interrupted") from None

    while True:
        lock.acquire()
        try:
            progress = recover(study, job.grid, local_only=job.local_only, grace=job.grace)
            if progress.pending > 0:
                study.optimize(objective, n_trials=1)
        finally:
            lock.release()
        if interrupted:
            raise TuneInterrupted(f"{interrupted[0]}; that trial starts again on resume")
        if on_progress is not None:
            on_progress()
        if progress.pending == 0:
            if progress.running_elsewhere == 0 and progress.running == 0:
                return
            time.sleep(POLL_SECONDS)


def worker_main(job_json: str) -> int:
    """Entry point of a ``--jobs`` worker process (the job as JSON); errors become one line on stderr."""
    job = WorkerJob(**json.loads(job_json))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(job)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        sys.stderr.write(f"batchnorm: tune worker {os.getpid()}: error: {error}\n")
        return 1
    return 0


# --------------------------------------------------------------------------- results


def trial_records(study: optuna.Study, grid: Grid) -> list[dict[str, Any]]:
    """Every trial of the study as a ``tune.json`` record, in trial order (nothing dropped)."""
    names = list(grid)
    records = []
    for trial in study.get_trials(deepcopy=False):
        key = _trial_key(trial, names, study.sampler)
        state = trial_state(trial)
        record: dict[str, Any] = {
            "number": trial.number,
            "params": dict(zip(names, key)) if key is not None else dict(trial.params),
            "state": state,
            "value": trial.value if state == "complete" else None,
        }
        for name in ("val_loss", "train_loss", "steps", "seconds", "device", "message", "duplicate_of"):
            if name in trial.user_attrs:
                record[name] = trial.user_attrs[name]
        records.append(record)
    return records


def _sort_key(record: dict[str, Any]) -> tuple[int, float, float, int]:
    if record["state"] == "complete" and record["value"] is not None and math.isfinite(record["value"]):
        loss = record.get("val_loss")
        return (0, -record["value"], loss if loss is not None and math.isfinite(loss) else math.inf, record["number"])
    return (1 if record["state"] == "diverged" else 2, 0.0, 0.0, record["number"])


def results_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per grid point (its finished trial), best first; diverged after the completed ones."""
    return sorted((r for r in records if r["state"] in FINISHED_STATES), key=_sort_key)


def _finished_points(records: list[dict[str, Any]], grid: Grid) -> set[tuple[Any, ...]]:
    return {tuple(r["params"].get(name) for name in grid) for r in results_table(records)}


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest validation accuracy (ties: lower validation loss, then earlier trial)."""
    table = results_table(records)
    return table[0] if table and _sort_key(table[0])[0] == 0 else None


def format_table(rows: list[dict[str, Any]], grid: Grid, best_number: int | None = None) -> str:
    """The sorted results as aligned text columns."""
    header = ["rank", *[option_name(name) for name in grid], "state", "val acc", "val loss", "seconds"]
    lines = [header]
    for rank, row in enumerate(rows, start=1):
        accuracy = f"{row['value']:.4f}" if row["value"] is not None else "-"
        loss = row.get("val_loss")
        state = row["state"]
        if state == "diverged" and row.get("steps") is not None:
            state = f"diverged at step {row['steps']}"
        lines.append(
            [
                f"{rank}{'*' if row['number'] == best_number else ''}",
                *[_format_value(row["params"].get(name)) for name in grid],
                state,
                accuracy,
                f"{loss:.4f}" if loss is not None else "-",
                f"{row['seconds']:.2f}" if row.get("seconds") is not None else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


# --------------------------------------------------------------------------- heatmaps and report


def _heatmap_layout(grid: Grid) -> tuple[str | None, list[tuple[str, str | None]]]:
    """The facet option (``norm`` when it varies) and the (x, y) pairs of options to draw."""
    varied = [name for name, values in grid.items() if len(values) >= 2]
    facet = "norm" if "norm" in varied else None
    axes = [name for name in varied if name != facet]
    if facet is not None and not axes:
        axes = [facet]
        facet = None
    pairs: list[tuple[str, str | None]] = list(itertools.combinations(axes, 2))
    if not pairs and axes:
        pairs = [(axes[0], None)]
    return facet, pairs


def draw_heatmaps(records: list[dict[str, Any]], grid: Grid, out: Path, trial_steps: int) -> list[Path]:
    """One PNG per pair of varied grid options: final validation accuracy per cell, diverged cells hatched.

    A cell shows the best accuracy over the grid options not on the axes;
    it is hatched and labelled "diverged" when every trial in it diverged,
    and notes "k/m div" when some did. With ``norm`` in the grid, each figure
    has one panel per norm, side by side, on the same color scale.
    """
    from matplotlib.patches import Rectangle

    plt = pyplot()
    rows = results_table(records)
    facet, pairs = _heatmap_layout(grid)
    facet_values: list[GridValue | None] = list(grid[facet]) if facet is not None else [None]
    paths = []
    # One colour scale for every figure and panel, fit to the accuracies reached (a fixed 0-1 scale makes
    # close cells look alike); the number is written in every cell.
    reached = [
        float(row["value"])
        for row in rows
        if row["state"] == "complete" and row["value"] is not None and math.isfinite(row["value"])
    ]
    low, high = (min(reached), max(reached)) if reached else (0.0, 1.0)
    if high - low < 1e-3:
        low, high = low - 5e-4, high + 5e-4
    for x_name, y_name in pairs:
        x_values = grid[x_name]
        y_values: list[GridValue | None] = list(grid[y_name]) if y_name is not None else [None]
        width = max(3.0, 0.9 * len(x_values) + 1.5)
        height = max(2.0, 0.6 * len(y_values) + 1.5)
        figure, axes = plt.subplots(
            1, len(facet_values), figsize=(width * len(facet_values) + 1.0, height), squeeze=False
        )
        image = None
        for axis, facet_value in zip(axes[0], facet_values):
            values = [[math.nan] * len(x_values) for _ in y_values]
            for i, y_value in enumerate(y_values):
                for j, x_value in enumerate(x_values):
                    cell = [
                        row
                        for row in rows
                        if row["params"].get(x_name) == x_value
                        and (y_name is None or row["params"].get(y_name) == y_value)
                        and (facet is None or row["params"].get(facet) == facet_value)
                    ]
                    completed = [
                        row["value"] for row in cell if row["state"] == "complete" and row["value"] is not None
                    ]
                    diverged = sum(row["state"] == "diverged" for row in cell)
                    if completed:
                        values[i][j] = max(completed)
                        note = f"{max(completed):.3f}" + (f"\n{diverged}/{len(cell)} div" if diverged else "")
                        bright = (max(completed) - low) / (high - low) > 0.55  # viridis is light at the top
                        color = "black" if bright else "white"
                        axis.text(j, i, note, ha="center", va="center", fontsize=8, color=color)
                    elif diverged:
                        axis.add_patch(
                            Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#dddddd", edgecolor="#888888", hatch="xx")
                        )
                        axis.text(j, i, "diverged", ha="center", va="center", fontsize=8, color="#b00000")
            image = axis.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto", origin="lower")
            axis.set_xticks(range(len(x_values)), [_format_value(v) for v in x_values])
            axis.set_xlabel(option_name(x_name))
            if y_name is not None:
                axis.set_yticks(range(len(y_values)), [_format_value(v) for v in y_values])
                if axis is axes[0][0]:
                    axis.set_ylabel(option_name(y_name))
            else:
                axis.set_yticks([])
            axis.set_xlim(-0.5, len(x_values) - 0.5)
            axis.set_ylim(-0.5, len(y_values) - 0.5)
            if facet is not None:
                axis.set_title(f"{facet}={facet_value}")
        if image is not None:
            figure.colorbar(image, ax=list(axes[0]), label=f"validation accuracy after {trial_steps} steps")
        stem = f"heatmap_{x_name}" + (f"_x_{y_name}" if y_name is not None else "")
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def write_tune_report(out_dir: str | Path, results: dict[str, Any], heatmaps: Sequence[Path]) -> Path:
    """``report.html`` of a ``tune`` folder: the grid, the trials as a table, the heatmaps, the best setting."""
    grid_value = _format_value

    out = Path(out_dir)
    grid: dict[str, list[Any]] = results["grid"]
    rows = results_table(results["trials"])
    best_number = (results.get("best_trial") or {}).get("number")
    table: list[list[Any]] = [
        ["trial", *[option_name(name) for name in grid], "state", "validation accuracy", "validation loss"]
    ]
    best_index = None
    for index, row in enumerate(rows):
        if row.get("number") == best_number:
            best_index = index
        table.append(
            [
                str(row.get("number", "")),
                *[grid_value(row["params"].get(name)) for name in grid],
                str(row.get("state", "")),
                row.get("value"),
                row.get("val_loss"),
            ]
        )
    figures = "".join(
        _figure(
            Path(path),
            f"Final validation accuracy of the {results['trial_steps']}-step trials, the number in each cell; the "
            "colour scale spans the lowest to the highest accuracy reached (see the colour bar), so close cells "
            "still differ. Each cell shows the best over the grid options not on its axes, 'k/m div' when k of "
            "its m trials diverged; hatched cells diverged entirely (stopped by the divergence guard).",
        )
        for path in heatmaps
    )
    grid_rows: list[list[Any]] = [["option", "values"]]
    grid_rows += [[option_name(name), ", ".join(grid_value(v) for v in values)] for name, values in grid.items()]
    best = results.get("best")
    final = results.get("final")
    final_html = "<p>No full run (--no-final, or the search is unfinished).</p>"
    if isinstance(final, dict):
        final_html = settings_table(
            {k: v for k, v in final.items() if not isinstance(v, (list, dict))}
            | {"params": format_params(final.get("params") or {})},
            ("quantity", "value"),
        )
    base_settings = {key: value for key, value in (results.get("base") or {}).items() if key not in grid}
    body = f"""<h1>Hyperparameter grid search</h1>
<section id="tune">
<p>Each point trained for {html.escape(str(results["trial_steps"]))} steps from the same seed, init and batches
(Optuna's grid sampler, study <code>{html.escape(str(results.get("study", "")))}</code>). Trials are ranked by their
accuracy on the validation split (held out of the training split; the trials never see the test split); the full
run of the best setting reports the test split once. Runs stopped by the divergence guard are listed as
diverged.</p>
<h2>Grid search: the options tried</h2>
{html_table(grid_rows)}
<h2>Trials (best first)</h2>
{html_table(table, highlight=best_index)}
<h2>Figures</h2>
{figures or "<p>No grid option varies over two or more values: no heatmap.</p>"}
<h2>Best setting and full run</h2>
<p>Best: {html.escape(format_params(best) if best else "none (every trial diverged or failed)")}.</p>
{final_html}
<h2>Base settings (every trial; the full run uses --steps)</h2>
{settings_table(base_settings)}
</section>"""
    path = out / "report.html"
    path.write_text(_page("batchnorm tune: grid search", body), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the search


def _final_run(config: TrainConfig, out: Path, dataset: Dataset, progress: bool, device: str = "cpu") -> dict[str, Any]:
    """Train the best setting for ``config.steps`` into ``out``, resuming an earlier final run of the same setting.

    The run trains on ``device``; an earlier final run resumes whatever device it started on.

    Returns the last evaluation of ``metrics.jsonl`` (the whole run's, also
    when resumed); ``seconds`` is the training time of the whole run, over
    all its sessions. Ctrl-C raises :class:`~batchnorm.lab.training.TrainingInterrupted`
    after saving the checkpoint the next call resumes.
    """
    checkpoint = out / "checkpoint.pt"
    resume: Path | None = None
    if checkpoint.is_file():
        try:
            stored = load_checkpoint(checkpoint)["config"]
        except ValueError:
            stored = None
        ours = dataclasses.asdict(config)
        if stored is not None and {k: v for k, v in stored.items() if k != "steps"} == {
            k: v for k, v in ours.items() if k != "steps"
        }:
            resume = checkpoint
    try:
        result = train(
            config,
            out,
            resume=resume,
            dataset=dataset,
            progress=progress,
            description="final",
            test_eval="final",
            device=device,
        )
    except DivergenceError as error:
        return {"state": "diverged", "message": str(error), "steps": config.steps, "device": device}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = lines[-1] if lines else {}
    final = {
        "state": "complete",
        "steps": config.steps,
        "val_accuracy": last.get("val_accuracy"),
        "val_loss": last.get("val_loss"),
        "test_accuracy": last.get("test_accuracy", result.final_accuracy),
        "test_loss": last.get("test_loss"),
        "train_loss": last.get("train_loss"),
        "seconds": result.seconds,
        "device": result.device,
        "resumed_from": str(resume) if resume is not None else None,
        "checkpoint": str(result.checkpoint),
        "metrics": str(out / "metrics.jsonl"),
    }
    return final


def _run_workers(job: WorkerJob, jobs: int, dataset: Dataset, on_progress: Callable[[], None]) -> None:
    if jobs == 1:
        run_worker(job, dataset, on_progress)
        return
    # Fresh interpreters (not multiprocessing's fork, which can deadlock once torch's thread pools run, nor
    # its spawn, which re-imports the caller's main module): each worker imports only this module.
    command = [
        sys.executable,
        "-c",
        "import sys; from batchnorm.lab.tune import worker_main; sys.exit(worker_main(sys.argv[1]))",
        json.dumps(dataclasses.asdict(job)),
    ]
    processes = [subprocess.Popen(command) for _ in range(jobs)]
    try:
        while any(process.poll() is None for process in processes):
            on_progress()
            time.sleep(POLL_SECONDS / 2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()  # only on an error or interrupt here; the trial is retried next time
            process.wait()
    on_progress()
    failed = [process.returncode for process in processes if process.returncode != 0]
    if failed:
        raise WorkerError(f"{len(failed)} of {jobs} tune workers failed (exit codes {failed}); see above")


def tune(
    grid: Grid,
    base: TrainConfig,
    out_dir: str | Path,
    *,
    final_steps: int | None,
    storage: str | None = None,
    study_name: str | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    heartbeat: int = HEARTBEAT_SECONDS,
    grace: int = GRACE_SECONDS,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run (or resume) the grid search, then the full run of the best setting; write every output.

    Args:
        grid: ``{TrainConfig field: values}`` from :func:`parse_grid`.
        base: the settings of every trial except the gridded ones;
            ``base.steps`` is the trial length.
        out_dir: folder for the study, ``tune.json``, heatmaps, report and ``final/``.
        final_steps: steps of the full run with the best setting; None skips it.
        storage: database URL; default ``sqlite:///OUT/study.db``.
        study_name: default :func:`default_study_name` of the grid and base.
        jobs: worker processes.
        threads: torch CPU threads per worker.
        progress: progress bars on stderr.
        heartbeat: seconds between a running trial's heartbeats in the storage.
        grace: seconds without a heartbeat after which a RUNNING trial counts as dead and is trained again.
        device: where the trials and the full run train (default the CPU); recorded in ``tune.json`` (top
            level, each trial, the full run), not in the study, whose storage is the same on any device.

    Returns:
        the content of ``tune.json``.

    Raises:
        ValueError: a grid point with invalid settings, or a study of another search.
    """
    from tqdm import tqdm

    run_device = str(resolve_device(device))
    base.validate()
    if base.val_fraction <= 0:
        raise ValueError("tune selects on the validation split: --val-fraction must be > 0 (default 0.1)")
    points = grid_points(grid)
    for point in points:
        with_params(base, point).validate()
    dataset = load_dataset(base.data, base.data_dir, seed=base.seed)
    kept = len(split_validation(dataset, base.val_fraction).train_images)
    for size in grid.get("batch_size", [base.batch_size]):
        if int(size) > kept:
            raise ValueError(
                f"batch size {size} is larger than the training split without its validation part ({kept})"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    definition = study_definition(grid, base)
    name = study_name or default_study_name(definition)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if heartbeat < 1 or grace <= heartbeat:
        raise ValueError(
            f"expected a heartbeat of at least 1 s and a grace period above it, got {heartbeat} and {grace}"
        )
    study = open_study(storage_url, name, grid, definition, heartbeat=heartbeat, grace=grace)
    job = WorkerJob(
        storage_url,
        name,
        grid,
        dataclasses.asdict(base),
        str(out / ".tune.lock"),
        threads,
        local_only=storage is None or is_postgres(storage_url),
        heartbeat=heartbeat,
        grace=grace,
        device=run_device,
    )

    lock = _study_lock(job)
    lock.acquire()
    try:
        state = recover(study, grid, local_only=job.local_only, grace=grace)
    finally:
        lock.release()
    bar = tqdm(
        total=len(points),
        initial=state.finished,
        desc="trials",
        unit="trial",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def on_progress() -> None:
        bar.n = len(_finished_points(trial_records(study, grid), grid))
        bar.refresh()

    started = time.perf_counter()
    try:
        if state.pending > 0 or state.running_elsewhere > 0:
            _run_workers(job, max(1, min(jobs, state.pending)), dataset, on_progress)
    finally:
        bar.close()
    search_seconds = time.perf_counter() - started

    records = trial_records(study, grid)
    finished_keys = _finished_points(records, grid)
    missing = [point for point in points if tuple(point.values()) not in finished_keys]
    best = best_record(records)
    results: dict[str, Any] = {
        "study": name,
        "storage": safe_url(storage_url),
        "grid": grid,
        "base": dataclasses.asdict(base),
        "device": run_device,
        "trial_steps": base.steps,
        "trials": records,
        "best": best["params"] if best is not None else None,
        "objective": OBJECTIVE,
        "best_trial": {k: best.get(k) for k in ("number", "value", "val_loss")} if best is not None else None,
        "final": None,
        "unfinished": missing,
        "search_seconds": search_seconds,
    }
    if best is not None and final_steps is not None and not missing:
        final_config = dataclasses.replace(with_params(base, best["params"]), steps=final_steps)
        final = _final_run(final_config, out / "final", dataset, progress, run_device)
        results["final"] = {"params": best["params"], **final}
    write_json_atomically(out / "tune.json", results, indent=2)
    heatmaps = draw_heatmaps(records, grid, out, base.steps)
    write_tune_report(out, results, heatmaps)
    results["heatmaps"] = [str(path) for path in heatmaps]
    return results
