"""The core of the local workspace's REST emulator: the HTTP server, its errors, and the small routes.

`Server` is a stdlib HTTP server on 127.0.0.1 that the real `WorkspaceClient` talks to unchanged. It answers
like the real services (error bodies `{"error_code", "message"}`, host metadata, Retry-After on 429/503) and
serves the routes that need no state of their own: the current user, Lakebase database instances, postgres
endpoints and credentials for both, and chat models (`/serving-endpoints/{name}/invocations` and
`/serving-endpoints/chat/completions`; `"stream": true` is answered with server-sent chunks, as a real endpoint
does: `completion_chunks()`). Jobs (jobs.py) and Genie (genie_server.py) add their routes to it in
`localws.Emulator`. Identity: each user has a token of their own, fresh and random for each emulator
(`add_user()`); a request is answered as the user its token belongs to. For tests: `inject()` a fault before a
route, and a request log (`calls()`). `ApiError` (and `bad`, `missing`) is the error every route raises. A route
may answer a `Page` (HTML) instead of JSON: the browser page at `/` that run links point to is served without a
token (jobs.py says why).
"""
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: `{"error_code", "message"}` with an HTTP status (429/503 also carry Retry-After)."""

    def __init__(self, status, error_code, message, retry_after=None):
        super().__init__(f"{status} {error_code}: {message}")
        self.status, self.error_code, self.message, self.retry_after = status, error_code, message, retry_after


def bad(message):
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def missing(message):
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", message)


def now_ms():
    return int(time.time() * 1000)


DEFAULT_USER = "me@example.com"
WORKSPACE_ID = "1"  # host metadata names it; the SDK then sends it on every call, as with a real workspace
STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "RESOURCE_CONFLICT", 429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR",
                503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


# ---------------------------------------------------------------- streamed chat completions

def completion_chunks(completion: dict, size=8) -> list[dict]:
    """A chat.completion as the `chat.completion.chunk`s a streaming endpoint sends for it: the role, the text in
    pieces of `size` characters (content parts one by one), each tool call's id and name and then its arguments in
    pieces, the finish reason, and the usage on a last chunk without choices."""
    head = {key: completion.get(key) for key in ("id", "created", "model")}
    choice = completion["choices"][0]
    message = choice["message"]
    content = message.get("content")
    deltas = [{"role": "assistant", "content": ""}]
    if isinstance(content, list):
        deltas += [{"content": [part]} for part in content]
    elif isinstance(content, str):
        deltas += [{"content": content[i:i + size]} for i in range(0, len(content), size)]
    elif content is not None:  # not a message's content: sent as it is, for the client to refuse
        deltas.append({"content": content})
    for index, call in enumerate(message.get("tool_calls") or []):
        function, arguments = call["function"], call["function"]["arguments"]
        pieces = [arguments]  # not a string: sent whole, for the client to refuse
        if isinstance(arguments, str):
            pieces = [arguments[i:i + size] for i in range(0, len(arguments), size)]
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
    choices = [[{"index": 0, "delta": delta, "finish_reason": None}] for delta in deltas]
    choices.append([{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}])
    chunks = [{**head, "object": "chat.completion.chunk", "choices": c} for c in choices]
    if completion.get("usage"):
        chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]})
    return chunks


def sse(data) -> bytes:
    """One server-sent event: a chunk (JSON) or a marker such as [DONE]."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


@dataclass
class Stream:
    """A route's answer sent as server-sent events (Content-Type text/event-stream, chunked), ending in [DONE]."""
    chunks: list


# ---------------------------------------------------------------- the bundle job

class BundleError(ValueError):
    """The bundle's files define no job the local workspace can run; the message names the file and what is wrong."""


def load_job(project_dir=".", variables=None, *, key=None) -> dict:
    """The job resource from the bundle (`databricks.yml`, its includes and `job.yml`), `${var.x}` resolved
    from the variable defaults overridden by `variables`; `python_file` made relative to `project_dir`. `key` picks
    one job of several. A bundle that can't give one is a `BundleError`."""
    project = Path(project_dir).resolve()
    bundle = _read_yaml(project / "databricks.yml")
    files = [project / "databricks.yml"]
    include = bundle.get("include") or []
    if not isinstance(include, list) or not all(isinstance(pattern, str) for pattern in include):
        raise BundleError(f"{files[0]}: include must be a list of file patterns")
    for pattern in include:
        files += sorted(project.glob(pattern))
    if (project / "job.yml").exists() and project / "job.yml" not in files:
        files.append(project / "job.yml")
    jobs = {}
    for path in files:
        doc = bundle if path.name == "databricks.yml" else _read_yaml(path)
        jobs.update((name, (path, job)) for name, job in _jobs(doc, path).items())
    if key is None and len(jobs) != 1:
        raise BundleError(f"the bundle in {project} (databricks.yml and the files it includes) defines "
                          f"{len(jobs) or 'no'} jobs{': ' + ', '.join(sorted(jobs)) if jobs else ''}; "
                          f"the local workspace runs one")
    path, job = jobs[key] if key is not None else next(iter(jobs.values()))
    variables_spec = bundle.get("variables") or {}
    if not isinstance(variables_spec, dict):
        raise BundleError(f"{files[0]}: variables must be a mapping of names, not a {type(variables_spec).__name__}")
    values = {name: spec.get("default") if isinstance(spec, dict) else spec for name, spec in variables_spec.items()}
    values.update(variables or {})
    try:
        job = _resolve_vars(job, values)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    parameters = job.get("parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(p, dict) and "name" in p for p in parameters):
        raise BundleError(f"{path}: the job's parameters must be a list of {{name, default}}")
    tasks = job.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise BundleError(f"{path}: the job's tasks must be a list of tasks")
    if not isinstance(((tasks or [{}])[0].get("spark_python_task") or {}).get("python_file"), str):
        raise BundleError(f"{path}: the job's first task needs spark_python_task.python_file, the script to run")
    for task in tasks:
        python = task.get("spark_python_task") or {}
        if isinstance(python, dict) and isinstance(python.get("python_file"), str):
            python["python_file"] = os.path.relpath((path.parent / python["python_file"]).resolve(), project)
    return job


def _read_yaml(path) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"can't read {path}: {getattr(e, 'strerror', None) or e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BundleError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if doc is not None and not isinstance(doc, dict):
        raise BundleError(f"{path} must be a mapping of keys (bundle, resources, ...), not a {type(doc).__name__}")
    return doc or {}


def _jobs(doc, path) -> dict:
    """The jobs a bundle file defines, `resources.jobs`, each a mapping."""
    resources = doc.get("resources") or {}
    jobs = (resources.get("jobs") or {}) if isinstance(resources, dict) else None
    if not isinstance(jobs, dict) or not all(isinstance(job, dict) for job in jobs.values()):
        raise BundleError(f"{path}: resources.jobs must map each job's name to its settings")
    return jobs


def _resolve_vars(value, values, depth=0):
    if isinstance(value, dict):
        return {k: _resolve_vars(v, values, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_vars(v, values, depth) for v in value]
    if not isinstance(value, str) or "${var." not in value or depth > 10:
        return value

    def lookup(name):
        if values.get(name) is None:
            raise BundleError(f"the job uses ${{var.{name}}}, which has no default in databricks.yml's variables")
        return _resolve_vars(values[name], values, depth + 1)

    whole = re.fullmatch(r"\$\{var\.([\w-]+)\}", value)
    if whole:
        return lookup(whole.group(1))
    return re.sub(r"\$\{var\.([\w-]+)\}", lambda m: str(lookup(m.group(1))), value)


# ---------------------------------------------------------------- the HTTP server

def new_token() -> str:
    """A personal access token in the real ones' shape: "dapi" and 32 hex digits, random."""
    return "dapi" + secrets.token_hex(16)


@dataclass(frozen=True)
class User:
    name: str  # userName, an email
    id: str  # the SCIM id, digits
    token: str


@dataclass
class Request:
    """One request as the emulator received it (tests read `Emulator.requests`)."""
    method: str
    path: str
    query: dict
    body: object
    headers: dict  # lower-case names
    status: int = 0  # the status answered
    peer: tuple = ()  # the client's (host, port)
    user: User | None = None  # whose token it carried


@dataclass
class Page:
    """An answer that is an HTML page for a browser, not JSON."""
    html: str
    status: int = 200


def peer_uid(peer: tuple, server_port: int) -> int | None:
    """The uid of the process at the other end of a connection from this machine, as Linux tells it in
    /proc/net/tcp[6]; None where the system does not say (no /proc, another network namespace)."""
    ours, theirs = f":{server_port:04X}", f":{peer[1]:04X}" if len(peer) > 1 else None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in (row.split() for row in rows):  # sl local remote st queues tr retrnsmt uid ...
            if theirs and len(fields) > 7 and fields[1].endswith(theirs) and fields[2].endswith(ours):
                return int(fields[7])
    return None


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
    disable_nagle_algorithm = True  # a streamed chunk goes out at once, not after the previous one's ACK
    emulator = None  # set on a per-emulator subclass

    def do_GET(self):
        self.emulator._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)


class Server:
    """The emulator's HTTP server at `url`, with the routes in `ROUTES` (method, path pattern, method name).
    `localws.Emulator` adds the Jobs and Genie routes; `_serve()` starts answering, `close()` stops.

    Users: `user` (with `token`, default a fresh random one) is the workspace's first user, the one jobs run as;
    `users` names more, and `add_user(name)` adds one later; each user's token is `emu.users[name].token`.
    Serving: `serving={endpoint name: chat(body) -> chat.completion dict}` (streamed when the request asks).
    Lakebase: `database_instances` / `postgres_endpoints` map names to hosts; `on_credential(user, token,
    expires_at)` is called for each token minted.
    """
    ROUTES = [
        ("GET", r"/api/2\.0/preview/scim/v2/Me", "_me"),
        ("GET", r"/api/2\.0/database/instances/(?P<name>[^/]+)", "_get_instance"),
        ("POST", r"/api/2\.0/database/credentials", "_instance_credential"),
        ("POST", r"/api/2\.0/postgres/credentials", "_endpoint_credential"),
        ("GET", r"/api/2\.0/postgres/(?P<name>.+)", "_get_endpoint"),
        ("POST", r"/serving-endpoints/chat/completions", "_chat_completions"),
        ("POST", r"/serving-endpoints/(?P<name>[^/]+)/invocations", "_invocations"),
    ]

    def __init__(self, *, token=None, user=DEFAULT_USER, user_id="1", users=(), database_instances=None,
                 postgres_endpoints=None, on_credential=None, serving=None):
        self._lock = threading.RLock()
        self.token, self.user = token or new_token(), user
        self.users = {user: User(user, user_id, self.token)}  # name -> User
        for name in users:
            self.add_user(name)
        self.database_instances = dict(database_instances or {})
        self.postgres_endpoints = dict(postgres_endpoints or {})
        self.on_credential = on_credential
        self.serving = dict(serving or {})
        self.requests: list[Request] = []
        self._faults = []
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"emulator": self}))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _serve(self):
        self._routes = [(m, re.compile(p), getattr(self, name)) for m, p, name in self.ROUTES]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-workspace", daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> bool:
        """Stop serving; False if it was closed already."""
        if self._closing.is_set():
            return False
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        return True

    def add_user(self, name: str) -> str:
        """Add a workspace user; returns their token (a fresh random one)."""
        with self._lock:
            if name in self.users:
                raise ValueError(f"user {name!r} exists already")
            ids = [int(u.id) for u in self.users.values() if u.id.isdigit()]
            self.users[name] = User(name, str(max(ids, default=0) + 1), new_token())
            return self.users[name].token

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
                      {k.lower(): v for k, v in h.headers.items()}, peer=tuple(h.client_address))
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
        req.status = status
        h.close_connection = h.close_connection or self._closing.is_set()  # don't keep serving after close()
        if isinstance(payload, Stream):
            return self._send_stream(h, payload)
        content = "application/json"
        if isinstance(payload, Page):
            status, data, content = payload.status, payload.html.encode(), "text/html; charset=utf-8"
            req.status = status
        else:
            data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", content)
        if isinstance(payload, Page):  # no script, no frame, nothing from elsewhere, whatever a run wrote
            h.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                     "frame-ancestors 'none'")
        h.send_header("Content-Length", str(len(data)))
        if status in (429, 503):
            h.send_header("Retry-After", str((error and error.retry_after) or 1))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _send_stream(h, stream: Stream):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for event in [*map(sse, stream.chunks), sse("[DONE]")]:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            h.wfile.flush()
        h.wfile.write(b"0\r\n\r\n")

    def _dispatch(self, req):
        if self._closing.is_set():  # a kept-alive connection of a client from before close()
            raise ApiError(503, "TEMPORARILY_UNAVAILABLE", "the local workspace is shutting down")
        if req.path == "/.well-known/databricks-config":  # unauthenticated, like a real workspace's
            return {"oidc_endpoint": f"{self.url}/oidc", "workspace_id": WORKSPACE_ID, "cloud": "AWS"}
        if req.method == "GET" and req.path == "/":  # a browser's page, which brings no token
            return self._home(req)
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, "UNAUTHENTICATED",
                           "Credential was not sent or was of an unsupported type for this API.")
        with self._lock:
            req.user = next((u for u in self.users.values()
                             if secrets.compare_digest(u.token, auth.removeprefix("Bearer "))), None)
        if req.user is None:
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
                params = {k: unquote(v) for k, v in match.groupdict().items()}
                self._authorize(req, params)
                return handler(req, **params)
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{req.method} {req.path}'")

    def _home(self, req):
        """The page a browser gets at `/` (localws.Emulator shows its job runs there)."""
        return Page("<!doctype html><title>Local workspace</title><p>The local workspace's REST API.</p>")

    def _authorize(self, req, params):
        """Raise an ApiError if `req.user` may not use what the route's `params` name (Genie restricts spaces)."""

    def _me(self, req):
        user = req.user
        return {"id": user.id, "userName": user.name, "displayName": user.name.split("@")[0], "active": True,
                "emails": [{"value": user.name, "type": "work", "primary": True}],
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"]}

    # ------------------------------------------------------------ Lakebase

    def _mint(self, user, seconds=3600):
        token, expires = "local-" + secrets.token_urlsafe(24), time.time() + seconds
        if self.on_credential:
            self.on_credential(user.name, token, datetime.fromtimestamp(int(expires), timezone.utc))
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
        token, expires = self._mint(req.user)
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
        token, expires = self._mint(req.user, seconds)
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
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "BAD_REQUEST", "messages must be a non-empty list")
        if body.get("stream") is True:
            return Stream(completion_chunks(self.serving[name]({k: v for k, v in body.items() if k != "stream"})))
        return self.serving[name](body)
