"""Plain helpers the test modules share (their fixtures are in conftest.py): the local workspace's SDK client, Genie
answerer and jobs, ResponsesAgent requests and replies, chat messages, the agent's database, worker.py and
primary.py as subprocesses, and a small HTTP server on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import psycopg
from pg_fixture import wait_for

import lakebase
import llm

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30  # seconds: the bound on a wait for a run to end (and for processes, unless a test says otherwise)
SPACE = "space"  # the Genie space of the `emu` fixture
GENIE = f"/api/2.0/genie/spaces/{SPACE}"
SQL = "SELECT region, SUM(amount) AS total FROM sales GROUP BY 1"  # what the Answerer's Genie ran


# ------------------------------------------------------------------ the local workspace

def workspace(emu, retry_timeout=10, token=None):
    """The real SDK's WorkspaceClient on the emulator `emu` (a PAT; `token` defaults to the emulator's)."""
    from databricks.sdk import WorkspaceClient  # imported here: it takes 1-2.5 s, and many modules never need it
    from databricks.sdk.config import Config

    return WorkspaceClient(config=Config(host=emu.url, token=token or emu.token, auth_type="pat",
                                         retry_timeout_seconds=retry_timeout))


class Answerer:
    """A Genie answerer for the emulator's spaces: answers every question from `rows` (region | total) and records
    (question, history) in `asked`; a question with "explain" gets a text-only answer, one that is "unanswerable"
    or about the "weather" is refused."""

    def __init__(self, rows=None):
        self.asked = []
        self.rows = rows if rows is not None else [["east", "10.50"], ["west", None]]

    def answer(self, question, history):
        from localws.answerer import CannotAnswer

        self.asked.append((question, history))
        if "unanswerable" in question or "weather" in question:
            raise CannotAnswer("I can only answer questions about sales.")
        if "explain" in question:
            return SimpleNamespace(text="Sales are completed orders.", sql=None, columns=[], rows=[])
        return SimpleNamespace(text=f"Answer to {question}", sql=SQL, rows=self.rows,
                               columns=[{"name": "region", "type_name": "STRING"},
                                        {"name": "total", "type_name": "DECIMAL"}])

    def questions(self):
        """What was asked, each question with the earlier questions of its conversation."""
        return [(question, [h["question"] for h in history]) for question, history in self.asked]


def bounded_sleep(limit=20.0):
    """time.sleep for Genie's polling that fails the test, rather than hang it, if polling outlasts `limit`."""
    deadline = time.monotonic() + limit

    def sleep(seconds):
        assert time.monotonic() < deadline, f"Genie still polling after {limit} s: its timeout did not work"
        time.sleep(seconds)
    return sleep


def make_genie(w, space=SPACE, **settings):
    """genie.Genie with test-sized polling (the defaults are 1 s growing to 5 s, 10 minutes overall)."""
    from genie import Genie, GenieConfig

    settings = {"poll_first": 0.01, "poll_max": 0.05, "timeout": 10.0, **settings}
    return Genie(w, GenieConfig(space, **settings), sleep=bounded_sleep())


def step_job(*more_parameters, **settings):
    """The job the agent starts, with job.yml's parameters request, thread_id and asked_by (and `more_parameters`);
    its task runs tests/fixtures/step_worker.py, which logs steps as worker.py does, without a model."""
    job = {"name": "steps", "max_concurrent_runs": 20,
           "parameters": [{"name": name, "default": ""}
                          for name in ("request", "thread_id", "asked_by", *more_parameters)],
           "tasks": [{"task_key": "worker", "spark_python_task": {
               "python_file": "tests/fixtures/step_worker.py",
               "parameters": ["--request={{job.parameters.request}}", "--thread-id={{job.parameters.thread_id}}",
                              "--run-id={{job.run_id}}"]}}]}
    return {**job, **settings}


def wait_ended(w, run_id, timeout=WAIT):
    """The run, once it has ended (TERMINATED, INTERNAL_ERROR or SKIPPED: it has a result state)."""
    return wait_for(lambda: (run := w.jobs.get_run(int(run_id))).state.result_state and run, f"run {run_id} to end",
                    timeout=timeout)


# ------------------------------------------------------------------ the agent's requests and replies

def ask(text, thread=None, **request) -> dict:
    """A ResponsesAgent request: one user message, in `thread` if given."""
    custom = {"thread_id": thread} if thread else {}
    return {"input": [{"role": "user", "content": text}], "custom_inputs": custom, **request}


def texts(response) -> list[str]:
    """The text parts of a ResponsesAgent response's messages."""
    return [part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]]


def reply_text(response) -> str:
    return "\n".join(texts(response))


def fast_chat(model, **kw) -> llm.ChatClient:
    """The scripted model over HTTP with short timeouts and retry budgets, so a failure shows in a second."""
    return llm.openai_chat(model.base_url, "m", **{"retry_seconds": 1.0, "backoff": 0.05, "timeout": (2.0, 5.0),
                                                   **kw})


def tool_results(request) -> dict:
    """The tool messages a request to the scripted model carried, by tool call id."""
    return {m["tool_call_id"]: m["content"] for m in request.body["messages"] if m["role"] == "tool"}


def last_tool_result(model) -> str:
    """The last tool message of the scripted model's last request."""
    return next(m["content"] for m in reversed(model.requests[-1].body["messages"]) if m["role"] == "tool")


# ------------------------------------------------------------------ chat messages

def user(text) -> dict:
    return {"role": "user", "content": text}


def assistant(text) -> dict:
    return {"role": "assistant", "content": text}


def tool_call(name, arguments, call_id="call_1") -> dict:
    """An assistant message calling one tool; `arguments` is a dict, or a string sent as is."""
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool_result(call_id, content) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# ------------------------------------------------------------------ the database

def open_db(where, bounds=None, **pool):
    """A migrated pool on `where` (a DSN, or a LakebaseConfig), with short retries and waits so that a failure
    shows in seconds; `bounds`: more LakebaseConfig fields for a DSN (such as lock_timeout); `pool` overrides
    open_pool's arguments."""
    if isinstance(where, lakebase.LakebaseConfig):
        config = where
    else:
        config = lakebase.LakebaseConfig(dsn=where, retry_seconds=2, **(bounds or {}))
    return lakebase.open_pool(config, **{"migrated": True, "max_size": 4, "timeout": 5, **pool})


def connection(db):
    """A connection to `db`, a pool or a DSN, as a context manager."""
    return db.connection() if hasattr(db, "connection") else psycopg.connect(db, autocommit=True)


def stored(db, thread_id) -> list[dict]:
    """The thread's stored messages."""
    with connection(db) as conn:
        return lakebase.load_messages(conn, thread_id)


def count_threads(db) -> int:
    with connection(db) as conn:
        return conn.execute("select count(*) from threads").fetchone()[0]


def steps_of(db, run_id) -> list[dict]:
    """The run's step log."""
    with connection(db) as conn:
        return lakebase.read_steps(conn, str(run_id))


def turns_of(db, thread_id) -> list[list[dict]]:
    """The thread's stored messages, grouped by turn."""
    with connection(db) as conn:
        rows = conn.execute("select turn, message from thread_messages where thread_id = %s order by seq",
                            (thread_id,)).fetchall()
    turns = {}
    for turn, message in rows:
        turns.setdefault(turn, []).append(message)
    return [turns[number] for number in sorted(turns)]


def whole(turn: list[dict]) -> bool:
    """A stored turn is whole: the user's message first, an answer last, every tool call with its result."""
    if not turn or turn[0].get("role") != "user":
        return False
    last = turn[-1]
    if last.get("role") != "assistant" or last.get("tool_calls") or not isinstance(last.get("content"), str):
        return False
    calls = [call["id"] for m in turn for call in m.get("tool_calls") or []]
    return calls == [m.get("tool_call_id") for m in turn if m.get("role") == "tool"]


def _before_insert(conn, name, table, action, when):
    conn.execute(f"create function {name}() returns trigger language plpgsql as "
                 f"$$ begin if {when} then {action}; end if; return new; end $$")
    conn.execute(f"create trigger {name} before insert on {table} for each row execute function {name}()")


def refuse_inserts(conn, table, message, when="true"):
    """Make each insert into `table` (whose row matches `when`) fail with `message`, as a lost connection or a full
    disk would; `drop trigger refuse on TABLE` ends it."""
    _before_insert(conn, "refuse", table, f"raise exception '{message}'", when)


def slow_inserts(conn, table, seconds, when="true"):
    """Make each insert into `table` (whose row matches `when`) take `seconds` longer, as a slow disk would."""
    _before_insert(conn, "slow", table, f"perform pg_sleep({seconds})", when)


# ------------------------------------------------------------------ processes

OWN_VARS = ("DATABRICKS_", "LAKEBASE_", "GENIE_", "LLM_", "PG", "LOG_LEVEL")  # what the project reads


def clean_env(**changes) -> dict:
    """This process's environment without the developer's own settings (workspace, database, model), and
    unbuffered; then `changes` (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARS)}
    env.update(DATABRICKS_CONFIG_FILE=os.devnull, PYTHONUNBUFFERED="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def worker_env(emu=None, dsn=None, model=None, **changes) -> dict:
    """worker.py's environment as a job run has it: the emulator as workspace (Genie space SPACE), the step-log
    database, the scripted model; then `changes`."""
    env = {}
    if emu:
        env.update(DATABRICKS_HOST=emu.url, DATABRICKS_TOKEN=emu.token, DATABRICKS_AUTH_TYPE="pat",
                   GENIE_SPACE_ID=SPACE)
    if dsn:
        env["LAKEBASE_DSN"] = dsn
    if model:
        env.update(LLM_BASE_URL=model.base_url, LLM_MODEL="scripted")
    return clean_env(**{**env, **changes})


def run_worker(*args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "worker.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_worker(*args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "worker.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def terminal_env(emu, job_id, dsn, model, **changes) -> dict:
    """`python primary.py`'s environment: the emulator's workspace and job, the database, the scripted model."""
    return clean_env(**{"DATABRICKS_HOST": emu.url, "DATABRICKS_TOKEN": emu.token, "DATABRICKS_JOB_ID": str(job_id),
                        "LAKEBASE_DSN": dsn, "LLM_BASE_URL": model.base_url, "LLM_MODEL": "m", **changes})


def terminal(env, stdin, *args, timeout=60) -> subprocess.CompletedProcess:
    """`python primary.py ARGS` with `stdin` typed in, to its end."""
    return subprocess.run([sys.executable, str(ROOT / "primary.py"), *args], input=stdin, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ HTTP

class LocalServer:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`, a BaseHTTPRequestHandler class."""

    def __init__(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # quick close()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def send_json(handler, status, body, headers=None):
    """Answer the handler's request with `body` as JSON (a str is sent as is)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
