"""The Jobs side of the local workspace emulator: jobs, runs, and the processes that run them.

`Jobs` is mixed into `localws.Emulator`, whose route table sends the Jobs 2.2 requests (run-now, runs get/list/cancel,
jobs get/list) to its methods. A run is a real subprocess, `python <spark_python_task.python_file> <parameters>`,
with `{{job.parameters.x}}`, `{{job.run_id}}`, ... substituted; its lifecycle (QUEUED, PENDING, RUNNING, TERMINATING,
TERMINATED or SKIPPED) follows the process. Run records are kept in memory, or with a DSN in Postgres schema
`local_workspace`, so run ids stay unique and old runs stay readable across restarts. Run ids restart with each
store, so each store's run logs have a directory of their own (`log_dir/<store key>/run-<id>.stdout`), private
to the user (0700, files 0600).

Runs have the real shapes: `status` (state, termination_details, queue_details) besides the deprecated `state`;
a task that fails reads as on serverless (the run INTERNAL_ERROR FAILED, "Workload failed, see run output for
details."), and `runs/get-output` of the task run gives its error, error trace and logs (the process's stdout
and stderr); `run_page_url` is `<host>/?o=<workspace id>#job/<job>/run/<run>`, and the emulator serves that page.
Quirk `jobs_queued` (localws/quirks.py) adds what is real but slow: runs that wait QUEUED before they start.
"""
import base64
import dataclasses
import html
import itertools
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

import lakebase
import runs
from localws.emulator import WORKSPACE_ID, ApiError, Page, bad, now_ms, peer_uid

log = logging.getLogger(__name__)

# On Linux a run's process first runs this, which asks for SIGTERM when the thread that started it ends, then becomes
# the task (exec: same pid). See _command().
DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG
                   "os.getppid() == int(sys.argv[1]) or os.kill(os.getpid(), signal.SIGTERM); "
                   "os.execv(sys.argv[2], sys.argv[2:])")
STARTING = 0.5  # s: a cancel reaches a process no sooner, or Python, still starting, would die unable to log it
HOST = socket.gethostname()  # run records of another machine's workspaces (one shared database) are left alone
SHUTDOWN_MESSAGE = "the local workspace stopped while this run was active"
CLOSED_MESSAGE = "the local workspace was closed while this run was active"
ACTIVE = ("QUEUED", "PENDING", "RUNNING", "TERMINATING")
# (result_state, termination code, termination type, state_message) of a run that ended this way
CANCELLED = ("CANCELED", "USER_CANCELED", "SUCCESS", "Run cancelled.")
SHUT_DOWN = ("FAILED", "INTERNAL_ERROR", "INTERNAL_ERROR", SHUTDOWN_MESSAGE)  # found after a crash
CLOSED = ("CANCELED", "CANCELED", "SUCCESS", CLOSED_MESSAGE)  # stopped by close(), like a cancel
TASK_FAILED = "Workload failed, see run output for details"  # a failed task's message on a real workspace
MULTI_TASK = ("Retrieving the output of runs with multiple tasks is not supported. Please retrieve the output of "
              "each individual task run instead.")  # get-output of a job run: the real API wants its task's run
OUTPUT_LIMIT = 5 * 1024 * 1024  # get-output gives the last 5 MB of a task's logs, as the real API does
PAGE_RUNS = 100  # runs listed on the run page
HELD = ("ACTIVE_RUNS_LIMIT_REACHED", "Queued due to reaching the workspace limit of active runs.")  # jobs_queued
# JobSettings / RunTask keys we pass through from a bundle job; bundle-only keys (permissions, ...) are dropped.
JOB_KEYS = ("name", "description", "max_concurrent_runs", "queue", "parameters", "tasks", "timeout_seconds",
            "environments", "tags", "email_notifications", "notification_settings", "health", "performance_target")
TASK_KEYS = ("task_key", "description", "depends_on", "spark_python_task", "environment_key", "timeout_seconds",
             "max_retries", "min_retry_interval_millis", "retry_on_timeout", "run_if", "disable_auto_optimization")


# ---------------------------------------------------------------- run records

@dataclass
class RunRecord:
    """One job run as the emulator keeps it (and persists it as JSON)."""
    run_id: int
    task_run_id: int
    job_id: int
    run_name: str
    task: dict  # the task definition, as in the job settings
    parameters: list  # [{"name", "default", "value"}]
    argv: list
    created: int  # ms since the epoch
    token: str | None = None  # idempotency token
    life: str = "QUEUED"  # RunLifeCycleState
    result: str | None = None  # RunResultState
    message: str = ""
    code: str | None = None  # TerminationCodeCode
    kind: str | None = None  # TerminationTypeType
    queue_reason: str | None = None
    started: int | None = None  # when the process was spawned (ms)
    ended: int | None = None
    pid: int | None = None
    stop: str | None = None  # why we are stopping it: cancel, timeout or shutdown
    owner: str = ""  # the emulator instance that runs it
    owner_pid: int = 0
    error: str | None = None  # why the task failed, as get-output's `error` says
    held: bool = False  # jobs_queued: QUEUED for jobs_queue_delay seconds, whatever the job's free slots
    owner_host: str = ""
    creator: str = ""  # the user whose token started it

    @classmethod
    def from_json(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _MemoryRuns:
    """Runs kept in memory (no DSN): ids restart at 1 with each emulator."""

    def __init__(self):
        self.rows, self.ids = {}, itertools.count(1)
        self.key = f"memory-{uuid.uuid4().hex[:12]}"

    def next_id(self):
        return next(self.ids)

    def save(self, rec):
        self.rows[rec.run_id] = dataclasses.asdict(rec)

    def get(self, run_id):
        row = self.rows.get(run_id)
        return RunRecord.from_json(row) if row else None

    def by_token(self, token):
        return next((RunRecord.from_json(r) for r in self.rows.values() if r["token"] == token), None)

    def by_task(self, task_run_id):
        return next((RunRecord.from_json(r) for r in self.rows.values() if r["task_run_id"] == task_run_id), None)

    def all(self, limit=None):
        """The runs, newest first; at most `limit`."""
        return [RunRecord.from_json(r) for _, r in sorted(self.rows.items(), reverse=True)[:limit]]

    def close(self):
        pass


class _PostgresRuns:
    """Runs kept in Postgres schema `local_workspace`, ids from a sequence: unique across restarts. Its connection
    comes back by itself after a server restart or a terminated backend."""
    SCHEMA = """
        create schema if not exists local_workspace;
        create sequence if not exists local_workspace.run_ids;
        create table if not exists local_workspace.runs(
            run_id bigint primary key, job_id bigint not null, idempotency_token text unique,
            record jsonb not null, updated_at timestamptz not null default now());
        create table if not exists local_workspace.store(key text not null);
        insert into local_workspace.store
            select current_database() || '-' || left(md5(random()::text), 12)
            where not exists (select from local_workspace.store)"""

    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = self._connect()
        with self.conn.transaction():  # two local workspaces may start at once
            self.conn.execute("select pg_advisory_xact_lock(hashtext('local_workspace'))")
            self.conn.execute(self.SCHEMA)
            key = self.conn.execute("select key from local_workspace.store").fetchone()[0]
        self.key = re.sub(r"[^\w.-]", "_", key)  # names this database's run log directory

    def _connect(self):
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        conn.execute("set statement_timeout = '10s'")
        return conn

    def _execute(self, query, params=()):
        """Every statement here may run twice (a lost nextval only leaves a gap), so a lost connection is
        reconnected and the statement sent again, once."""
        try:
            try:
                return self.conn.execute(query, params)
            except psycopg.OperationalError:
                if not (self.conn.broken or self.conn.closed):
                    raise
            self.conn.close()
            self.conn = self._connect()
            return self.conn.execute(query, params)
        except psycopg.OperationalError as e:
            message = " ".join(str(e).split())
            raise ApiError(503, "TEMPORARILY_UNAVAILABLE", f"the local workspace's database: {message}") from e

    def next_id(self):
        return self._execute("select nextval('local_workspace.run_ids')").fetchone()[0]

    def save(self, rec):
        self._execute(
            "insert into local_workspace.runs(run_id, job_id, idempotency_token, record) values (%s, %s, %s, %s)"
            " on conflict (run_id) do update set record = excluded.record, updated_at = now()",
            (rec.run_id, rec.job_id, rec.token, Jsonb(dataclasses.asdict(rec))))

    def _select(self, where, params, limit=None):
        rows = self._execute(f"select record from local_workspace.runs where {where} order by run_id desc limit %s",
                             (*params, limit)).fetchall()
        return [RunRecord.from_json(r[0]) for r in rows]

    def get(self, run_id):
        return next(iter(self._select("run_id = %s", (run_id,))), None)

    def by_token(self, token):
        return next(iter(self._select("idempotency_token = %s", (token,))), None)

    def by_task(self, task_run_id):
        return next(iter(self._select("(record->>'task_run_id')::bigint = %s", (task_run_id,))), None)

    def all(self, limit=None):
        """The runs, newest first; at most `limit`."""
        return self._select("true", (), limit)

    def close(self):
        self.conn.close()


class Jobs:
    """Mixed into `localws.Emulator`: uses its `_lock`, `_closing`, `_server`, `url`, `token`, `user` and `quirks`;
    `_init_jobs()` and `_close_jobs()` are called by its `__init__()` and `close()`."""
    ROUTES = [
        ("POST", r"/api/2\.2/jobs/run-now", "_run_now"),
        ("GET", r"/api/2\.2/jobs/runs/get", "_get_run"),
        ("GET", r"/api/2\.2/jobs/runs/get-output", "_get_run_output"),
        ("POST", r"/api/2\.2/jobs/runs/cancel", "_cancel_run"),
        ("GET", r"/api/2\.2/jobs/runs/list", "_list_runs"),
        ("GET", r"/api/2\.2/jobs/get", "_get_job"),
        ("GET", r"/api/2\.2/jobs/list", "_list_jobs"),
    ]
    _open_instances = set()  # owner ids of emulators not closed yet, in this process

    def _init_jobs(self, dsn, project_dir, env, log_dir, cancel_grace):
        self.project_dir = Path(project_dir).resolve()
        self.env = dict(env or {})
        self.cancel_grace = cancel_grace
        self.jobs = {}
        self.live: dict[int, RunRecord] = {}  # this emulator's runs that have not ended
        self.unsaved: dict[int, RunRecord] = {}  # ended while the database was out of reach: saved later
        self._threads = []
        self.owner = uuid.uuid4().hex
        self.dsn, self.jobs_queue_delay = dsn, 3.0  # jobs_queued: how long a run waits
        self.omitted_run_fields = set()  # test hook: top-level run fields left out of runs/get and runs/list
        self.store = _PostgresRuns(dsn) if dsn else _MemoryRuns()
        self._temp_logs = log_dir is None  # a directory of our own, removed by close()
        if log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="local-runs-"))
        else:
            Path(log_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self.log_dir = Path(log_dir) / self.store.key
            self.log_dir.mkdir(exist_ok=True, mode=0o700)
            self.log_dir.chmod(0o700)
        Jobs._open_instances.add(self.owner)
        self._recover()

    def _close_jobs(self):
        """Stop active runs (SIGTERM, SIGKILL after the grace) and mark them CANCELED: their workers log `cancelled`."""
        with self._lock:
            for rec in list(self.live.values()):
                self._stop(rec, "shutdown")
        for thread in list(self._threads):
            thread.join(self.cancel_grace + 5)
        with self._lock:
            for rec in list(self.live.values()):  # a watcher that did not finish in time
                self._conclude(rec, *CLOSED)
            if self.unsaved:
                log.warning("local workspace: the database missed the end of run(s) %s",
                            ", ".join(map(str, self.unsaved)))
            self.store.close()
        Jobs._open_instances.discard(self.owner)
        if self._temp_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def active_runs(self) -> list[int]:
        with self._lock:
            return sorted(self.live)

    def run_log(self, run_id, stream="stdout"):
        path = self.log_dir / f"run-{run_id}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ jobs

    def add_job(self, job, job_id=None) -> int:
        """Register a bundle-style job dict (one spark_python_task); returns its job id."""
        task = (job.get("tasks") or [{}])[0]
        if not (task.get("spark_python_task") or {}).get("python_file"):
            raise ValueError("the job needs tasks[0].spark_python_task.python_file")
        settings = {k: job[k] for k in JOB_KEYS if k in job}
        settings["tasks"] = [{k: t[k] for k in TASK_KEYS if k in t} for t in job["tasks"]]
        settings.setdefault("max_concurrent_runs", 1)
        settings["format"] = "MULTI_TASK"
        with self._lock:
            job_id = job_id or max(self.jobs, default=0) + 1
            self.jobs[job_id] = {"job_id": job_id, "creator_user_name": self.user, "run_as_user_name": self.user,
                                 "created_time": now_ms(), "settings": settings}
        return job_id

    def _job(self, job_id):
        if job_id not in self.jobs:
            raise bad(f"Job {job_id} does not exist.")  # the SDK maps this to ResourceDoesNotExist on jobs/get
        return self.jobs[job_id]

    def _get_job(self, req):
        return self._job(_int(req.query.get("job_id"), "job_id"))

    def _list_jobs(self, req):
        name = req.query.get("name")
        jobs = [j for _, j in sorted(self.jobs.items(), reverse=True)
                if name is None or j["settings"].get("name", "").lower() == name.lower()]
        page, paging = _page(jobs, req.query, 100)
        if not _flag(req.query, "expand_tasks"):
            page = [{**j, "settings": {k: v for k, v in j["settings"].items() if k != "tasks"}} for j in page]
        page = [{k: v for k, v in j.items() if k != "run_as_user_name"} for j in page]  # a BaseJob has none
        return {"jobs": page, **paging} if page else paging

    def _run_now(self, req):
        body = req.body
        job_id = _int(body.get("job_id"), "job_id")
        settings = self._job(job_id)["settings"]
        token = body.get("idempotency_token")
        if token is not None and (not isinstance(token, str) or len(token) > 64):
            raise bad("idempotency_token must be a string of at most 64 characters")
        for key in ("python_params", "notebook_params", "jar_params", "spark_submit_params", "python_named_params",
                    "sql_params", "dbt_commands", "pipeline_params"):
            if body.get(key):
                raise bad(f"{key} is not supported by the local workspace: pass job_parameters")
        overrides = body.get("job_parameters") or {}
        defined = {p["name"]: p.get("default", "") for p in settings.get("parameters") or []}
        unknown = sorted(set(overrides) - set(defined))
        if unknown:
            raise bad(f"Job parameters {', '.join(unknown)} are not defined in job {job_id}.")
        if any(not isinstance(v, str) for v in overrides.values()):
            raise bad("job_parameters values must be strings")
        queue = (body.get("queue") or settings.get("queue") or {"enabled": True}).get("enabled", True)
        with self._lock:
            existing = token and self._find(lambda r: r.token == token, lambda: self.store.by_token(token))
            if existing:
                return {"run_id": existing.run_id, "number_in_job": existing.run_id}
            rec = RunRecord(self.store.next_id(), self.store.next_id(), job_id, settings.get("name", f"job {job_id}"),
                            settings["tasks"][0], [], [], now_ms(), token, owner=self.owner, owner_pid=os.getpid(),
                            owner_host=HOST, creator=req.user.name)
            values = {**defined, **overrides}
            rec.parameters = [{"name": n, "default": d, "value": values[n]} for n, d in defined.items()]
            refs = {f"job.parameters.{n}": v for n, v in values.items()}
            refs.update({"job.id": str(job_id), "job.run_id": str(rec.run_id), "job.name": rec.run_name,
                         "task.name": rec.task.get("task_key", ""), "task.run_id": str(rec.task_run_id)})
            rec.argv = [_substitute(str(a), refs) for a in rec.task["spark_python_task"].get("parameters") or []]
            self._admit(rec, queue)
        return {"run_id": rec.run_id, "number_in_job": rec.run_id}

    def _admit(self, rec, queue):
        """Start the run, queue it behind max_concurrent_runs, or skip it when queueing is off."""
        limit, mine, started = self._slots(rec.job_id)
        if queue and limit > 0 and "jobs_queued" in self.quirks:
            rec.held = True
            timer = threading.Timer(self.jobs_queue_delay, self._release, (rec,))
            timer.daemon = True
            timer.start()
        if limit > 0 and started < limit and started == len(mine) and not rec.held:
            self.live[rec.run_id] = rec
            self._launch(rec)
        elif queue and limit > 0:
            rec.queue_reason = f"Queued due to reaching maximum concurrent runs of {limit}."
            self.live[rec.run_id] = rec
            self._save(rec)
        else:
            rec.life, rec.result, rec.code, rec.kind, rec.ended = (
                "SKIPPED", "MAXIMUM_CONCURRENT_RUNS_REACHED", "MAX_CONCURRENT_RUNS_EXCEEDED", "CLIENT_ERROR", now_ms())
            rec.message = f"Skipping this run because the limit of {limit} maximum concurrent runs has been reached."
            self._save(rec)

    def _slots(self, job_id):
        """(max_concurrent_runs, the job's live runs oldest first, how many of them have started)."""
        limit = self.jobs[job_id]["settings"].get("max_concurrent_runs", 1)
        mine = sorted((r for r in self.live.values() if r.job_id == job_id), key=lambda r: r.run_id)
        return limit, mine, sum(r.life != "QUEUED" for r in mine)

    def _launch(self, rec):
        """The run is PENDING until its watcher thread has spawned the process."""
        rec.life, rec.queue_reason = "PENDING", None
        self._save(rec)
        thread = threading.Thread(target=self._run_process, args=(rec,), name=f"run-{rec.run_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run_process(self, rec):
        """Spawn the task's process, then watch it: timeout, cancel grace, exit code."""
        if rec.stop:  # cancelled (or shut down) while pending: the run ends without ever starting
            return self._finish(rec, *(CLOSED if rec.stop == "shutdown" else CANCELLED))
        python_file = self.project_dir / rec.task["spark_python_task"]["python_file"]
        if not python_file.is_file():
            return self._finish(rec, "FAILED", "RESOURCE_NOT_FOUND", "CLIENT_ERROR",
                                f"python_file {python_file} does not exist.")
        # The developer's own DATABRICKS_* would point the worker at their real workspace.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
        env.update(PYTHONUNBUFFERED="1", DATABRICKS_HOST=self.url, DATABRICKS_TOKEN=self.token,
                   DATABRICKS_AUTH_TYPE="pat")
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        try:
            with open(self.log_dir / f"run-{rec.run_id}.stdout", "ab", opener=_private) as out, \
                    open(self.log_dir / f"run-{rec.run_id}.stderr", "ab", opener=_private) as err:
                proc = subprocess.Popen(_command(python_file, rec.argv), cwd=self.project_dir, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        except (OSError, ValueError) as e:  # ValueError: a NUL in an argument
            return self._finish(rec, "FAILED", "INVALID_RUN_CONFIGURATION", "CLIENT_ERROR",
                                f"could not start the worker: {e}")
        with self._lock:
            rec.pid, rec.started = proc.pid, now_ms()
            if not rec.stop:  # else cancelled while spawning
                rec.life = "RUNNING"
            self._save(rec)
        settings = self.jobs[rec.job_id]["settings"]
        timeout = rec.task.get("timeout_seconds") or settings.get("timeout_seconds") or 0
        spawned = time.monotonic()
        deadline = spawned + timeout if timeout > 0 else math.inf
        kill_at, killed = math.inf, False
        while True:
            try:
                returncode = proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            with self._lock:
                if now >= deadline and not rec.stop:
                    self._stop(rec, "timeout")
                stopping = rec.stop
            if stopping and kill_at == math.inf and now >= spawned + STARTING:
                _signal(proc, signal.SIGTERM)
                kill_at = now + self.cancel_grace
            if now >= kill_at and not killed:
                _signal(proc, signal.SIGKILL)
                killed = True
        self._finish(rec, *self._outcome(rec, returncode, killed, timeout))

    def _finish(self, rec, *outcome):
        """Conclude a run whose process ended (or never started), then start the job's next queued runs."""
        with self._lock:
            self._conclude(rec, *outcome)
        self._schedule(rec.job_id)

    def _outcome(self, rec, returncode, killed, timeout):
        """(result_state, termination code, termination type, state_message) for a process that ended."""
        if rec.stop == "cancel":
            result, code, kind, message = CANCELLED
            note = f" The worker ignored SIGTERM and was killed after {self.cancel_grace:g} s." if killed else ""
            return result, code, kind, message + note
        if rec.stop == "timeout":
            return "TIMEDOUT", "CANCELED", "CLIENT_ERROR", f"Run timed out after {timeout} seconds (timeout_seconds)."
        if rec.stop == "shutdown":
            return CLOSED
        if returncode == 0:
            return "SUCCESS", "SUCCESS", "SUCCESS", ""
        if returncode < 0:  # killed (out of memory, say): its own last words would not say so
            rec.error = f"the worker process was killed by {signal.Signals(-returncode).name} (signal {-returncode})"
        else:  # the exception a traceback ends with, or the worker's own last line
            lines = [line.strip() for line in self.run_log(rec.run_id, "stderr").splitlines() if line.strip()]
            rec.error = lines[-1] if lines else f"the worker process exited with code {returncode}"
        message = f"Task {rec.task.get('task_key')} failed with message: {TASK_FAILED}."  # the reason: get-output
        return "FAILED", "RUN_EXECUTION_ERROR", "CLIENT_ERROR", message

    def _conclude(self, rec, result, code, kind, message):
        life = "INTERNAL_ERROR" if code == "RUN_EXECUTION_ERROR" else "TERMINATED"  # a failed task, on serverless
        rec.life, rec.result, rec.code, rec.kind, rec.message = life, result, code, kind, message
        rec.ended, rec.queue_reason = now_ms(), None
        self.live.pop(rec.run_id, None)
        self._save(rec)

    def _save(self, rec):
        """Save a record, then those the database missed before. While the database is out of reach this emulator
        answers from memory (`live`, and `unsaved` for runs that ended) and saves them with the next change."""
        if rec.life not in ACTIVE:
            self.unsaved[rec.run_id] = rec
        try:
            for r in [rec, *(u for u in self.unsaved.values() if u is not rec)]:
                self.store.save(r)
                self.unsaved.pop(r.run_id, None)
        except ApiError as e:
            log.warning("local workspace: run %s is not saved yet (saved with the next change): %s", rec.run_id,
                        e.message)

    def _stop(self, rec, reason):
        """Cancel (or time out, or shut down) a live run; a queued run ends without ever starting."""
        if rec.life == "QUEUED":
            return self._conclude(rec, *(CLOSED if reason == "shutdown" else CANCELLED))
        if rec.stop:
            return
        rec.stop, rec.life = reason, "TERMINATING"  # its watcher thread sends the process SIGTERM
        self._save(rec)

    def _schedule(self, job_id):
        """Start queued runs of the job while it has free slots."""
        with self._lock:
            if self._closing.is_set():
                return
            limit, mine, started = self._slots(job_id)
            for rec in [r for r in mine if r.life == "QUEUED"][:max(0, limit - started)]:
                if rec.held:
                    break  # runs start in order; its timer comes back (jobs_queued)
                self._launch(rec)

    def _release(self, rec):
        """jobs_queued: the run's wait is over; it starts like any queued run."""
        with self._lock:
            if rec.life != "QUEUED":  # cancelled meanwhile
                return
            rec.held = False
        self._schedule(rec.job_id)

    def _recover(self):
        """Reconcile the runs of local workspaces that died while they were active (see `_reconcile`)."""
        for rec in self.store.all():
            self._reconcile(rec)

    def _reconcile(self, rec):
        """An active run of a local workspace on this machine that died (even by SIGKILL) ended FAILED, once its
        worker is gone too (it dies with its workspace, logging `cancelled`); until then it reads as it is.
        Runs are reconciled when read, so every open local workspace sees it end."""
        if rec.life in ACTIVE and rec.run_id not in self.live and rec.owner not in Jobs._open_instances \
                and rec.owner_host in ("", HOST) and (rec.owner_pid == os.getpid() or not _alive(rec.owner_pid)) \
                and not _worker_alive(rec):
            self._conclude(rec, *SHUT_DOWN)
        return rec

    def _current(self, rec):
        """The newest word on a run: this emulator's own copy if it has one (live, or ended but not saved yet: the
        database may have missed changes), else `rec`; reconciled."""
        return self._reconcile(self.live.get(rec.run_id) or self.unsaved.get(rec.run_id) or rec)

    def _find(self, match, stored):
        """The run that `match(rec)` picks, looked for in this emulator's own records first, then `stored()` (the
        store's); None if neither has it. (With the database out of reach, the emulator's own runs still answer.)"""
        with self._lock:
            rec = next((r for r in (*self.live.values(), *self.unsaved.values()) if match(r)), None) or stored()
            return rec and self._current(rec)

    def _runs(self, limit=None):
        """The runs, newest first, at most `limit`: the stored ones as `_current` has them, and this emulator's own
        that the database missed."""
        with self._lock:
            recs = {r.run_id: self._current(r) for r in self.store.all(limit)}
            recs.update((r.run_id, self._current(r)) for r in (*self.live.values(), *self.unsaved.values()))
            return [recs[run_id] for run_id in sorted(recs, reverse=True)[:limit]]

    def _record(self, run_id):
        rec = self._find(lambda r: r.run_id == run_id, lambda: self.store.get(run_id))
        if rec is None:
            raise bad(f"Run {run_id} does not exist.")  # the SDK maps this to ResourceDoesNotExist on runs/get
        return rec

    def _get_run(self, req):
        with self._lock:  # a consistent snapshot: the watcher thread updates live records
            return self._run_json(self._record(_int(req.query.get("run_id"), "run_id")))

    def _cancel_run(self, req):
        rec = self._record(_int(req.body.get("run_id"), "run_id"))
        with self._lock:
            if rec.run_id in self.live:  # cancelling an ended run is a no-op, as on the service
                self._stop(self.live[rec.run_id], "cancel")
        return {}

    def _list_runs(self, req):
        q = req.query
        if _flag(q, "active_only") and _flag(q, "completed_only"):
            raise bad("active_only and completed_only cannot both be true")
        job_id = _int(q["job_id"], "job_id") if "job_id" in q else None
        runs = [r for r in self._runs() if (job_id is None or r.job_id == job_id)
                and not (_flag(q, "active_only") and r.life not in ACTIVE)
                and not (_flag(q, "completed_only") and r.life in ACTIVE)
                and q.get("run_type", "JOB_RUN") == "JOB_RUN"
                and _int(q.get("start_time_from", 0), "start_time_from") <= r.created
                and r.created <= _int(q.get("start_time_to", 2 ** 62), "start_time_to")]
        page, paging = _page(runs, q, 24)
        with self._lock:
            page = [self._run_json(r, tasks=_flag(q, "expand_tasks")) for r in page]
        return {"runs": page, **paging} if page else paging

    def _run_json(self, rec, tasks=True):
        now, end = now_ms(), rec.ended or 0
        state, status = self._state(rec, rec.life, rec.message)
        url = f"{self.url}/?o={WORKSPACE_ID}#job/{rec.job_id}/run/"
        body = {"job_id": rec.job_id, "run_id": rec.run_id, "number_in_job": rec.run_id,
                "original_attempt_run_id": rec.run_id, "attempt_number": 0, "run_name": rec.run_name,
                "creator_user_name": rec.creator or self.user, "run_page_url": url + str(rec.run_id),
                "run_type": "JOB_RUN", "trigger": "ONE_TIME", "start_time": rec.created, "end_time": end,
                "setup_duration": 0, "execution_duration": 0, "cleanup_duration": 0,
                "run_duration": (end or now) - rec.created,
                "queue_duration": (rec.started or end or now) - rec.created, "state": state, "status": status}
        if rec.parameters:
            body["job_parameters"] = rec.parameters
        if tasks:
            running = ((end or now) - rec.started) if rec.started else 0
            failed = rec.code == "RUN_EXECUTION_ERROR"  # the task ended; the job run is INTERNAL_ERROR
            task_state, task_status = self._state(rec, "TERMINATED" if failed else rec.life,
                                                  TASK_FAILED if failed else rec.message)
            body["tasks"] = [{**rec.task, "run_id": rec.task_run_id, "run_page_url": url + str(rec.task_run_id),
                              "state": task_state, "status": task_status, "attempt_number": 0,
                              "start_time": rec.started or 0, "end_time": end, "setup_duration": 0,
                              "execution_duration": running, "cleanup_duration": 0, "run_duration": running,
                              "queue_duration": body["queue_duration"]}]
        for name in self.omitted_run_fields:
            body.pop(name, None)
            for task in body.get("tasks", []):
                task.pop(name, None)
        return body

    def _state(self, rec, life, message):
        """The run's (or its task's) deprecated `state` and its `status`."""
        state = {"life_cycle_state": life, "state_message": message,
                 "user_cancelled_or_timedout": rec.result in ("CANCELED", "TIMEDOUT")}
        if rec.result:
            state["result_state"] = rec.result
        status = {"state": "TERMINATED" if life in ("SKIPPED", "INTERNAL_ERROR") else life}
        if rec.code:
            status["termination_details"] = {"code": rec.code, "type": rec.kind, "message": message}
        if rec.life == "QUEUED":
            code, reason = HELD if rec.held else ("MAX_CONCURRENT_RUNS_REACHED", rec.queue_reason)
            state["queue_reason"], status["queue_details"] = reason, {"code": code, "message": reason}
        return state, status

    def _get_run_output(self, req):
        """A task run's output: its logs (the process's stdout, then its stderr), and why it failed."""
        task_run_id = _int(req.query.get("run_id"), "run_id")
        with self._lock:
            rec = self._find(lambda r: r.task_run_id == task_run_id, lambda: self.store.by_task(task_run_id))
            if rec is None:
                self._record(task_run_id)  # a job run's id, or none: the same errors as the real API
                raise bad(MULTI_TASK)
            body = self._run_json(rec)
        task = body["tasks"][0]
        metadata = {k: task[k] for k in ("run_page_url", "state", "status", "start_time", "end_time", "attempt_number",
                                         "setup_duration", "execution_duration", "cleanup_duration", "run_duration",
                                         "queue_duration") if k in task}
        metadata.update(job_id=rec.job_id, run_id=rec.task_run_id, job_run_id=rec.run_id, run_name=rec.run_name,
                        run_type="JOB_RUN", tasks=[task])
        stderr = self.run_log(rec.run_id, "stderr")
        logs = self.run_log(rec.run_id, "stdout") + stderr
        output = {"metadata": metadata, "logs": logs[-OUTPUT_LIMIT:], "logs_truncated": len(logs) > OUTPUT_LIMIT}
        if rec.error:
            output.update(error=rec.error, error_trace=stderr[-OUTPUT_LIMIT:].strip())
        return output

    # ------------------------------------------------------------ the run page

    def _home(self, req):
        """The page of every run's `run_page_url`: `/?o=<workspace id>` lists the newest runs, each under the
        anchor its URL's fragment names (`job/<job>/run/<run>`, which a browser never sends), with its state and,
        with a DSN, the steps its worker logged. A browser sends no token, and a token in a link would put a
        secret into replies and the thread store (and go stale with the next start's token); so instead the page
        answers only the user the local workspace runs as, where the system says who is connecting (Linux)."""
        uid = peer_uid(req.peer, self._server.server_address[1])
        if uid is not None and uid != os.getuid():
            return Page("<!doctype html><title>Forbidden</title><p>This page shows the runs of another user's "
                        "local workspace.</p>", status=403)
        with self._lock:
            records = self._runs(PAGE_RUNS)
            statuses = {r.run_id: self._state(r, r.life, r.message)[1] for r in records}
        steps = self._steps([rec.run_id for rec in records])
        sections = [self._run_section(rec, statuses[rec.run_id], steps.get(rec.run_id, [])) for rec in records]
        return Page(PAGE.format(limit=PAGE_RUNS, sections="\n".join(sections) or "<p>No runs yet.</p>"))

    def _run_section(self, rec, status, steps):
        e = html.escape
        why = (status.get("queue_details") or status.get("termination_details") or {}).get("message")
        facts = [f"<b>{e(' '.join(filter(None, [status['state'], rec.result])))}</b>", e(why or ""),
                 f"started {e(_when(rec.created))}", f"ended {e(_when(rec.ended))}" if rec.ended else ""]
        request = next((p["value"] for p in rec.parameters if p["name"] == "request"), "")
        items = [f"<li>{e(runs.describe_step(step))}</li>" for step in steps]
        final = next((step for step in steps[::-1] if step["status"] == "completed"), None)
        answer = f"<pre>{e(str(final['payload'].get('answer')))}</pre>" if final else ""
        error = f"<p>Error (run output): {e(rec.error)}</p>" if rec.error else ""
        anchor = f"job/{rec.job_id}/run/{rec.run_id}"
        return (f'<section id="{e(anchor)}"><h2>Run {rec.run_id} <small>{e(rec.run_name)}</small></h2>'
                f"<p>{' &middot; '.join(f for f in facts if f)}</p>"
                + (f"<p>Request: {e(request)}</p>" if request else "") + error
                + (f"<ol>{''.join(items)}</ol>" if items else "") + answer + "</section>")

    def _steps(self, run_ids) -> dict:
        """The steps the runs' workers logged in task_logs, by run id, if the emulator has a DSN (that is where
        they are)."""
        if not self.dsn:
            return {}
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                return {run_id: lakebase.read_steps(conn, str(run_id), limit=200) for run_id in run_ids}
        except psycopg.Error:  # no task_logs yet (no worker has run), or the database is out of reach
            return {}


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Job runs - local workspace</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}} section{{border-top:1px solid #ccc;padding:.3em 0}}
section:target{{background:#ffe}} pre{{white-space:pre-wrap}} small{{color:#666}}</style></head>
<body><h1>Job runs of the local workspace</h1><p>Newest first (the last {limit}); a run's link brings you to it.</p>
{sections}
</body></html>
"""


def _when(ms):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _substitute(text, refs):
    """Replace `{{job.parameters.x}}`-style references the run knows; others are left as written."""
    return re.sub(r"\{\{\s*([\w.\-]+)\s*\}\}", lambda m: refs.get(m.group(1), m.group(0)), text)


def _int(value, name):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad(f"{name} must be an integer, got {value!r}") from None


def _flag(query, name):
    return str(query.get(name, "false")).lower() == "true"


def _page(items, query, limit_max, default=20):
    """One page of `items` by offset / page token, with the list response's paging keys."""
    limit = _int(query.get("limit", default), "limit")
    if limit == 0:
        limit = limit_max
    if not 1 <= limit <= limit_max:
        raise bad(f"limit must be between 1 and {limit_max}, got {limit}")
    offset = _int(query.get("offset", 0), "offset")
    if query.get("page_token"):
        try:
            offset = int(base64.urlsafe_b64decode(query["page_token"].encode()).decode().removeprefix("offset:"))
        except ValueError:
            raise bad(f"invalid page_token {query['page_token']!r}") from None
    def token(n):
        return base64.urlsafe_b64encode(f"offset:{n}".encode()).decode()
    page = {"has_more": offset + limit < len(items)}
    if page["has_more"]:
        page["next_page_token"] = token(offset + limit)
    if offset > 0:
        page["prev_page_token"] = token(max(0, offset - limit))
    return items[offset:offset + limit], page


def _command(python_file, argv):
    """The run's command. On Linux it dies with this workspace, even one killed by SIGKILL: its watcher thread,
    which started it, outlives it otherwise; the worker then logs `cancelled`. (A preexec_fn would do the same
    but make each start fork this whole process, ~50 ms.) Elsewhere a worker outlives a killed workspace, and its
    run is reconciled once it ends."""
    command = [sys.executable, str(python_file), *argv]
    if sys.platform.startswith("linux"):
        return [sys.executable, "-S", "-c", DIE_WITH_PARENT, str(os.getpid()), *command]
    return command


def _worker_alive(rec):
    """Whether the run's worker still runs: its pid is alive and, where /proc says, it started with the run (a pid
    is reused in time)."""
    if not rec.pid or not _alive(rec.pid):
        return False
    try:
        ticks = int(Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return abs(boot + ticks / os.sysconf("SC_CLK_TCK") - (rec.started or 0) / 1000) < 10


def _private(path, flags):
    return os.open(path, flags, 0o600)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(proc, sig):
    try:
        os.killpg(proc.pid, sig)  # the worker runs in its own session: reach its children too
    except ProcessLookupError:
        pass
