"""End to end in local mode, as a newcomer meets it: `python primary.py` in a pseudo-terminal (the README's
walk-through: greet, ask, /watch, poll, answer, cancel), persistence across sessions, how the workspace is
chosen, a real model through LLM_BASE_URL, that requirements.txt is enough, and the same walk-through (plus a
few supported question shapes) through `PrimaryAgent.predict` on `localws.start()`'s workspace.

Everything is real: embedded Postgres, the emulator, worker.py subprocesses, the offline stand-in model and
Genie. The expected numbers are computed here from sample_data/*.csv, not from the SQL under test.
`pytest -rP tests/test_local_e2e.py` prints the terminal transcripts.
"""
import ast
import codecs
import http.server
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    WAIT,
    LocalServer,
    ask,
    clean_env,
    open_db,
    reply_text,
    send_json,
    steps_of,
    stored,
    wait_ended,
    workspace,
)
from pg_fixture import wait_for
from sample_truth import grouped, in_year, measure, money, top

import llm
import localws
import localws.stand_in
import primary

PROMPT = "\n> "
SPINNER = re.compile(r"\r[|/\\-] run (\d+) (QUEUED|PENDING|RUNNING|TERMINATING) \d+ s")
PASTE_MODE = re.compile(r"\x1b\[\?2004h|\x1b\[\?2004l\r?")  # readline's bracketed paste on and off
NOTICE = re.compile(r"[^\n]*\r\x1b\[K(\* run [^\n]*\n)")  # a notice erases the line it is printed over

REVENUE_2025 = measure("revenue", in_year(2025))


# ------------------------------------------------------------------ a terminal

def newcomer_env(home, **extra):
    """A fresh machine: no workspace, database or model configured; HOME is `home`."""
    return clean_env(HOME=str(home), TERM="xterm", DATABRICKS_CONFIG_FILE=None, **extra)


class Terminal:
    """`python primary.py ARGS` on a pseudo-terminal, as its controlling terminal (Ctrl-C is a real ^C).
    `expect` waits, bounded, for a pattern in the output not consumed yet; failures show the transcript."""

    def __init__(self, env, *args):
        self.args, self.transcript, self.pending, self.before, self.returncode = args, "", "", "", None
        self.decoder, self.carry = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become primary.py
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "primary.py", *args], env)
            finally:
                os._exit(127)

    def expect(self, pattern, what, timeout=WAIT) -> re.Match:
        """The first match of `pattern` in the unread output; what comes before it and the match are consumed."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.pending)):
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"timed out after {timeout} s waiting for {what}")
            if self._read(left) == "":
                self.fail(f"primary.py ended while waiting for {what}")
        self.before, self.pending = self.pending[:match.start()], self.pending[match.end():]
        return match

    def _read(self, timeout) -> str | None:
        """What the terminal has within `timeout`: None if nothing came, "" once the child has closed it."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return None
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child has closed the terminal
            data = b""
        text = self.carry + self.decoder.decode(data, final=not data)
        split = re.search(r"(?:\x1b\[\?2004l)?\r?\Z", text) if data else None  # \r\n, or paste-off + \r: split?
        text, self.carry = (text[:split.start()], split.group(0)) if split and split.group(0) else (text, "")
        text = PASTE_MODE.sub("", text.replace("\r\n", "\n"))  # the terminal's newline; a lone \r: the spinner's
        self.transcript += text
        self.pending = NOTICE.sub(r"\1", self.pending + text)
        return (text or None) if data else ""

    def fail(self, message):
        raise AssertionError(f"{message}\n----- `python primary.py {' '.join(self.args)}` so far:\n"
                             f"{self.transcript}\n-----")

    def send(self, line):
        os.write(self.fd, line.encode() + b"\n")

    def say(self, line, timeout=WAIT) -> str:
        """Type a line; the output up to the next prompt."""
        self.send(line)
        self.expect(re.escape(line) + "\n", f"the echo of {line!r}")
        return self.until_prompt(f"the prompt after {line!r}", timeout)

    def until_prompt(self, what, timeout=WAIT) -> str:
        self.expect(re.escape(PROMPT), what, timeout)
        return self.before

    def interrupt(self):
        os.write(self.fd, b"\x03")  # the terminal sends SIGINT to its foreground process group

    def wait(self, timeout=WAIT) -> int:
        """Wait for primary.py to exit, reading its output meanwhile (so it never blocks on a full terminal)."""
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                self.fail(f"primary.py did not exit within {timeout} s")
            else:
                self._read(0.05)
        while self._read(0.2):  # the rest of its output
            pass
        return self.returncode

    def close(self):
        """Leave as a user would (/quit stops the local workspace and its runs); kill only if that fails."""
        if self.returncode is None:
            try:
                self.send("/quit")
                self.wait(15)
            except (OSError, AssertionError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_session(env, *args) -> tuple[Terminal, str, str]:
    """(terminal, start-up output, thread id) once the first prompt is up."""
    t = Terminal(env, *args)
    try:
        startup = t.until_prompt("the first prompt", timeout=60)  # a new data dir runs initdb first
        thread = re.search(r"^thread (\S+) \((?:new|continued, \d+ turns? so far)\) - /help for commands$", startup,
                           re.M)
        if not thread:
            t.fail("no 'thread ... - /help for commands' line at start-up")
    except BaseException:
        t.close()
        raise
    return t, startup, thread.group(1)


def started_run(t, reply) -> str:
    match = re.search(r"I've started a job to answer this: run (\d+)", reply)
    if not match:
        t.fail(f"no run id in the reply {reply!r}")
    return match.group(1)


def screen_lines(out) -> list[str]:
    """The lines as the screen ends up showing them: a spinner frame is overwritten (\\r, erase to the end)."""
    return [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in out.split("\n")]


def watch(t, run_id) -> tuple[str, str]:
    """/watch RUN_ID until it ends by itself: (what it printed, the final state)."""
    out = t.say(f"/watch {run_id}")
    ended = [line for line in screen_lines(out) if line.startswith(f"run {run_id} ended: ")]
    if not ended:
        t.fail(f"/watch {run_id} came back without 'run {run_id} ended: ...'")
    return out, ended[-1].split(": ", 1)[1]


def step_lines(out) -> list[str]:
    """The step lines `#N ...` that /watch printed."""
    return [line for line in screen_lines(out) if re.match(r"#\d+ ", line)]


def runs_table(t) -> dict:
    """/runs as {run id: state}."""
    out = t.say("/runs")
    return dict(re.findall(r"^run (\d+) +(\S+(?: \S+)?) +\d{4}-\d\d-\d\d", out, re.M))


def assert_only_the_banner(startup):
    """Start-up says where it runs in one line, then the thread line: no warnings, no other noise (as root, the
    first start also says which directories the server's own user may now pass through)."""
    lines = [line for line in startup.splitlines() if line.strip()
             and not (os.geteuid() == 0 and line.startswith("note: as root, the embedded Postgres runs as"))]
    assert len(lines) == 2 and lines[0].startswith("local workspace: ") and lines[1].startswith("thread "), \
        "start-up printed more than the local-mode banner:\n" + "\n".join(lines)


def data_dir_of(startup) -> Path:
    match = re.search(r"embedded Postgres \(data in (.+?)/pgdata\)", startup)
    assert match, startup
    return Path(match.group(1))


# ------------------------------------------------------------------ the walk-through

def test_a_newcomer_walks_through_the_readme_in_a_terminal(scratch):
    home = scratch / "home"
    home.mkdir()
    t, startup, thread = start_session(newcomer_env(home))
    with t:
        # local mode, said in the banner, with every stand-in named and the data under ~/.local/share
        banner = next((line for line in startup.splitlines() if line.startswith("local workspace: ")), None)
        assert banner, f"no local-mode banner in the start-up output:\n{startup}"
        for stand_in in ("emulated Databricks API at http://127.0.0.1:", "jobs as local worker.py processes",
                         "Genie over the sample dataset", "embedded Postgres", "offline deterministic stand-in model"):
            assert stand_in in banner, banner
        assert data_dir_of(banner) == home / ".local/share/async-agent"

        # small talk: answered directly, no job
        reply = t.say("hello")
        assert "Hello!" in reply and "[start_databricks_job" not in reply, reply

        # a data question: delegated, the reply gives the run id at once
        question = "What was the total revenue in 2025?"
        reply = t.say(question)
        assert f'[start_databricks_job {{"request": "{question}"}}]' in reply, reply
        first = started_run(t, reply)

        # the run ends while the prompt waits: the terminal says so, and the next reply, whatever was said, tells
        # the answer (once)
        t.expect(rf"\* run {first} answered: Total revenue in 2025: {re.escape(money(REVENUE_2025))}\. \(ask me for "
                 rf"the whole answer\)\n",
                 f"the notice that run {first} has ended")
        reply = t.say("thanks")
        assert reply.index(f'[poll_databricks_job {{"run_id": "{first}"}}]') < reply.index(
            f"Run {first} has ended since we last spoke: it is TERMINATED SUCCESS") < reply.index(
            f"Total revenue in 2025: {money(REVENUE_2025)}.") < reply.index("You're welcome!"), reply
        reply = t.say("thanks again")
        assert "poll_databricks_job" not in reply and money(REVENUE_2025) not in reply, reply

        # a second question, watched live (steps and a spinner) until its worker is at work, then cancelled
        reply = t.say("How many orders were there in 2024?")
        second = started_run(t, reply)
        assert int(second) > int(first)
        t.send(f"/watch {second}")
        t.expect(r"#1 started: How many orders were there in 2024\?\n", f"run {second}'s first step")
        t.expect(r"#\d+ calls query_genie", f"run {second} to call query_genie")
        t.expect(rf"\r[|/\\-] run {second} RUNNING \d+ s", f"the spinner of run {second} while Genie works")
        t.interrupt()
        t.expect(rf"stopped watching run {second}; it goes on", "Ctrl-C to stop watching")
        t.until_prompt("the prompt after Ctrl-C")
        reply = t.say("cancel it")
        assert f'[terminate_databricks_job {{"run_id": "{second}"}}]' in reply, reply
        assert f"I asked to cancel run {second}; it is now TERMINATING" in reply, reply
        out, state = watch(t, second)
        assert state == "TERMINATED CANCELED", out
        assert re.fullmatch(r"#\d+ cancelled: received SIGTERM: the run was cancelled", step_lines(out)[-1]), out

        # /runs: both, with their states
        assert runs_table(t) == {first: "TERMINATED SUCCESS", second: "TERMINATED CANCELED"}

        t.send("/quit")
        assert t.wait() == 0
    assert "Traceback" not in t.transcript, t.transcript
    assert (home / ".local/share/async-agent/pgdata/PG_VERSION").exists()
    print(t.transcript)  # pytest -rP shows it: the README's transcript
    assert_only_the_banner(startup)  # last: a stray warning should not hide what the walk-through showed


def test_a_second_session_continues_the_thread_and_its_runs(scratch):
    home, data_dir = scratch / "home", scratch / "data"
    home.mkdir()
    env = newcomer_env(home)
    t, startup, thread = start_session(env, "--data-dir", str(data_dir))
    with t:
        assert data_dir_of(startup) == data_dir
        first = started_run(t, t.say("What was the total revenue in 2025?"))
        assert watch(t, first)[1] == "TERMINATED SUCCESS"
        t.send("/quit")
        assert t.wait() == 0
    assert (data_dir / "pgdata/PG_VERSION").exists() and not (home / ".local/share/async-agent").exists()

    t, startup, same = start_session(env, "--data-dir", str(data_dir), "--thread", thread)
    with t:
        assert same == thread
        assert f"thread {thread} (continued, 1 turn so far) - /help for commands\n  you: What was the total revenue " \
               f"in 2025?\n  agent: I've started a job to answer this: run {first} (" in startup, startup
        assert runs_table(t) == {first: "TERMINATED SUCCESS"}
        reply = t.say("is it done?")  # it ended after the first session's last turn: this reply tells it
        assert f"Run {first} has ended since we last spoke: it is TERMINATED SUCCESS" in reply, reply
        assert money(REVENUE_2025) in reply, reply
        second = started_run(t, t.say("How many orders were there in 2024?"))
        assert int(second) > int(first), "run ids restarted instead of continuing"
        runs = runs_table(t)
        assert list(runs) == [first, second] and runs[first] == "TERMINATED SUCCESS", runs
        assert runs[second] in ("QUEUED", "PENDING", "RUNNING", "TERMINATED SUCCESS"), runs
        t.send("/quit")
        assert t.wait() == 0
    assert "Traceback" not in t.transcript, t.transcript
    print(t.transcript)


# ------------------------------------------------------------------ the prompt

def test_the_prompt_takes_long_lines_and_pasted_blocks_whole_and_tells_when_a_run_ends(tmp_path, pg_dsn):
    t, _, thread = start_session(newcomer_env(tmp_path, LAKEBASE_DSN=pg_dsn))
    with t:
        long = " ".join(f"word{i}" for i in range(1000))[:6014]  # beyond the terminal's 4,095-character line
        t.send(long)
        assert "What would you like to know?" in t.until_prompt("the reply to a long line")
        os.write(t.fd, b"\x1b[200~first line\nsecond line\nthird line\x1b[201~\n")  # a paste, as terminals send it
        assert "What would you like to know?" in t.until_prompt("the reply to a pasted block")

        # a run ends while the user is typing: the notice goes above the prompt, and what they typed stays
        question = "What was the total revenue in 2025?"
        run = started_run(t, t.say(question))
        os.write(t.fd, b"hel")
        t.expect(rf"\* run {run} answered: Total revenue in 2025: [^\n]*\n> hel", "the notice over the prompt")
        t.send("lo")
        reply = t.until_prompt("the reply to hello")
        assert f"Run {run} has ended since we last spoke" in reply and "Hello!" in reply, reply

        # threads: /new NAME, /thread ID with a recap
        assert t.say("/new side-topic").strip() == "thread side-topic (new) - /help for commands"
        assert "Hello!" in t.say("hi")
        recap = t.say(f"/thread {thread}")
        assert recap.startswith(f"thread {thread} (continued, 4 turns so far) - /help for commands\n"), recap
        assert "  you: first line second line third line\n" in recap and "  you: hello\n" in recap, recap
        assert t.say("/new side-topic").strip() == ("thread side-topic already exists (1 turn): /thread side-topic "
                                                    "continues it")
        t.send("/quit")
        assert t.wait() == 0
    said = [m["content"] for m in stored(pg_dsn, thread) if m["role"] == "user"]
    assert said == [long, "first line\nsecond line\nthird line", question, "hello"], [len(m) for m in said]
    assert "Traceback" not in t.transcript
    print(t.transcript)


# ------------------------------------------------------------------ which workspace

class RecordingServer(LocalServer):
    """A 'configured workspace' on 127.0.0.1 that records every request and answers 503."""

    def __init__(self):
        self.requests = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorded.append(f"{self.command} {self.path}")
                self.send_error(503)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_local_forces_the_local_workspace_and_start_up_says_so_in_one_line(tmp_path, pg_dsn):
    configured = RecordingServer()
    try:
        env = newcomer_env(tmp_path, DATABRICKS_HOST=configured.url, DATABRICKS_TOKEN="dapi-not-used",
                           DATABRICKS_JOB_ID="42", LAKEBASE_DSN=pg_dsn)
        t, startup, _ = start_session(env, "--local")
        with t:
            assert "local workspace: emulated Databricks API at http://127.0.0.1:" in startup, startup
            assert "Postgres at LAKEBASE_DSN, the offline deterministic stand-in model" in startup, startup
            assert "Hello!" in t.say("hello")
            run = started_run(t, t.say("How many orders were there in 2024?"))
            assert list(runs_table(t)) == [run] and configured.url not in t.transcript
            t.send("/quit")  # while the run goes on: the local workspace stops it
            assert t.wait() == 0
    finally:
        configured.close()
    assert configured.requests == [], "the configured workspace was called although --local was given"
    assert "Traceback" not in t.transcript, t.transcript
    print(t.transcript)
    assert_only_the_banner(startup)


def test_traces_of_turns_and_runs_go_to_a_local_tracking_directory(tmp_path, pg_dsn, monkeypatch):
    import mlflow  # requirements-dev.txt has it

    traces_dir = tmp_path / "traces"
    t, startup, thread = start_session(newcomer_env(tmp_path, LAKEBASE_DSN=pg_dsn), "--local", "--traces",
                                       str(traces_dir))
    with t:
        assert f"traces: MLflow tracking directory {traces_dir.as_uri()}" in startup, startup
        assert "Hello!" in t.say("hello")
        run = started_run(t, t.say("What was the total revenue in 2025?"))
        assert watch(t, run)[1] == "TERMINATED SUCCESS"
        t.send("/quit")
        assert t.wait() == 0
    assert "Traceback" not in t.transcript and "mlflow" not in t.transcript, t.transcript  # no log lines
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = mlflow.MlflowClient(tracking_uri=traces_dir.as_uri())

    def traces_in(experiment):
        found = store.search_traces(locations=[store.get_experiment_by_name(experiment).experiment_id],
                                    order_by=["timestamp_ms ASC"])
        return [store.get_trace(trace.info.trace_id) for trace in found]

    def spans(trace):
        return [(span.span_type, span.name) for span in sorted(trace.data.spans, key=lambda s: s.start_time_ns)]

    greeting, question = traces_in("async-agent")
    assert spans(greeting) == [("AGENT", "predict_stream"), ("CHAT_MODEL", "chat_model")]
    assert spans(question) == [("AGENT", "predict_stream"), ("CHAT_MODEL", "chat_model"),
                               ("TOOL", "start_databricks_job")]
    assert question.info.tags["databricks_run_id"] == run and question.info.tags["thread_id"] == thread
    [job_run] = traces_in("async-agent-runs")
    assert spans(job_run) == [("AGENT", "job_run"), ("CHAT_MODEL", "chat_model"), ("TOOL", "query_genie"),
                              ("CHAT_MODEL", "chat_model")]
    assert (job_run.info.tags["databricks_run_id"], job_run.info.tags["thread_id"]) == (run, thread)
    started = steps_of(pg_dsn, run)[0]
    assert started["status"] == "started" and started["payload"]["trace_id"] == job_run.info.trace_id


WITHOUT_MLFLOW = """
import runpy, sys
sys.modules["mlflow"] = None  # as if it were not installed: importing it raises ImportError
sys.argv = ["primary.py", *sys.argv[1:]]
runpy.run_path("primary.py", run_name="__main__")
"""


def test_without_mlflow_the_terminal_runs_as_before_and_traces_say_what_to_install(tmp_path, pg_dsn):
    env = newcomer_env(tmp_path, LAKEBASE_DSN=pg_dsn)
    out = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, "--local", "--traces", str(tmp_path / "traces")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "primary.py: --traces needs mlflow: pip install mlflow-skinny (or -r requirements-dev.txt)\n"
    assert not (tmp_path / ".local").exists()  # refused before the local workspace started
    out = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, "--local"], input="hello\n/quit\n", cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and "\n> Hello! I am the offline stand-in model" in out.stdout, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "traces").exists()


@pytest.mark.parametrize("configured", ["DATABRICKS_HOST", "profile"])
def test_a_workspace_without_a_job_id_is_refused_in_one_line(tmp_path, configured):
    extra = {"LAKEBASE_DSN": "postgresql://nobody@127.0.0.1:9/none"}
    if configured == "DATABRICKS_HOST":
        extra.update(DATABRICKS_HOST="http://127.0.0.1:9", DATABRICKS_TOKEN="dapi-not-used")
        source = "DATABRICKS_HOST"
    else:
        (tmp_path / ".databrickscfg").write_text("[DEFAULT]\nhost = http://127.0.0.1:9\ntoken = dapi-not-used\n")
        source = f"the DEFAULT profile of {tmp_path / '.databrickscfg'}"
    t = Terminal(newcomer_env(tmp_path, **extra))
    try:
        code = t.wait()
    finally:
        t.close()
    assert code != 0, t.transcript
    assert t.transcript.strip() == (f"primary.py: a workspace is configured ({source}) but not set up for this "
                                    f"agent: DATABRICKS_JOB_ID (the worker job's id) is not set. Deploy the agent "
                                    f"there and set these (README: Deploy to Databricks), or run 'python primary.py "
                                    f"--local' to use the local workspace"), t.transcript
    assert not (tmp_path / ".local").exists(), "the local workspace started although a workspace is configured"


# ------------------------------------------------------------------ a real model instead of the stand-in

class OpenAICompatibleServer(LocalServer):
    """What LLM_BASE_URL points at: an OpenAI-compatible server on 127.0.0.1 that records each request. It answers
    as the offline stand-in does, and the offline Genie's request for SQL with one SELECT."""

    def __init__(self, sql):
        self.requests = []
        recorded = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                recorded.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                completion = localws.stand_in.stand_in_reply(body)
                if body["messages"][0]["content"].startswith("You write one PostgreSQL SELECT"):
                    completion["choices"][0]["message"]["content"] = sql
                send_json(self, 200, completion)

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.url += "/v1"


def test_llm_base_url_replaces_the_stand_in_everywhere(tmp_path, pg_dsn):
    """The README's 'use a real model': the primary, the worker and Genie all ask LLM_BASE_URL for LLM_MODEL,
    with LLM_API_KEY."""
    model = OpenAICompatibleServer("```sql\nselect sum(amount) as revenue from sample.orders\nwhere status in "
                                   "('completed', 'shipped') and order_date >= '2025-01-01' and order_date < "
                                   "'2026-01-01';\n```")
    try:
        env = newcomer_env(tmp_path, LLM_BASE_URL=model.url, LLM_MODEL="my-model", LLM_API_KEY="sk-local-test",
                           LAKEBASE_DSN=pg_dsn)
        t, startup, _ = start_session(env)
        with t:
            assert f"Postgres at LAKEBASE_DSN, the model at {model.url}" in startup, startup
            run = started_run(t, t.say("What was the total revenue in 2025?"))
            out, state = watch(t, run)
            assert state == "TERMINATED SUCCESS", out
            assert str(REVENUE_2025) in step_lines(out)[-1], out
            t.send("/quit")
            assert t.wait() == 0
    finally:
        model.close()
    asked = [("start_databricks_job" in str(body.get("tools")), "query_genie" in str(body.get("tools")),
              body["messages"][0]["content"].startswith("You write one PostgreSQL SELECT"))
             for body in (r["body"] for r in model.requests)]
    assert (True, False, False) in asked, "the primary did not ask LLM_BASE_URL"
    assert (False, True, False) in asked, "the worker did not ask LLM_BASE_URL"
    assert (False, False, True) in asked, "the offline Genie did not ask LLM_BASE_URL for its SQL"
    assert {(r["path"], r["auth"], r["body"]["model"]) for r in model.requests} == {
        ("/v1/chat/completions", "Bearer sk-local-test", "my-model")}
    print(t.transcript)


# ------------------------------------------------------------------ a fresh machine

def imported_names(path):
    """The top-level names a module imports anywhere in it (imports inside functions too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def installed_by(requirements) -> set:
    """The distributions that `pip install` of these requirement lines brings, as installed here."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [Requirement(line) for line in requirements], set()
    while todo:
        req = todo.pop()
        if canonicalize_name(req.name) in seen:
            continue
        seen.add(canonicalize_name(req.name))
        try:
            deps = [Requirement(dep) for dep in requires(req.name) or []]
        except PackageNotFoundError:
            pytest.fail(f"{req.name} (in requirements.txt) is not installed in this environment")
        extras = [""] + sorted(req.extras)
        todo += [dep for dep in deps if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras)]
    return seen


def test_requirements_txt_is_all_that_local_mode_imports():
    """`pip install -r requirements.txt`, then `python primary.py`: every third-party module the project's
    modules import comes with requirements.txt (requirements-dev.txt brings more, so CI alone can't tell)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    installed = installed_by([line for line in lines if line])
    modules = sorted([*ROOT.glob("*.py"), *ROOT.glob("localws/*.py")])  # the local workspace's package too
    assert any(path.parent.name == "localws" for path in modules)
    project = {path.stem for path in ROOT.glob("*.py")} | {"localws", "serving"}  # deploy: serving.py + mlflow
    distributions = packages_distributions()
    missing = {}
    for path in modules:
        if path.name == "serving.py":  # deploys to Model Serving: needs mlflow, which local mode does not
            continue
        for name in set(imported_names(path)) - set(sys.stdlib_module_names) - project:
            if (path.name, name) == ("tracing.py", "mlflow"):  # only once traces are asked for, with a clear error
                continue
            if not {canonicalize_name(d) for d in distributions.get(name, [])} & installed:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported, but not installed by requirements.txt: {missing}"


# ------------------------------------------------------------------ through predict

def tool_calls(response):
    return [(item["name"], item["arguments"]) for item in response["output"] if item["type"] == "function_call"]


@pytest.fixture
def local_agent(pg_dsn, tmp_path, monkeypatch):
    """PrimaryAgent on localws.start()'s workspace, wired as `python primary.py` wires it; the offline model."""
    for key in [k for k in os.environ if k.startswith(("LLM_", "LAKEBASE_", "GENIE_"))]:
        monkeypatch.delenv(key)  # a developer's own model or database must not leak into local mode
    ws = localws.start(ROOT, data_dir=tmp_path, dsn=pg_dsn)
    pool = None
    try:
        w = workspace(ws.emulator)
        pool = open_db(ws.dsn)
        chat = llm.databricks_chat(llm.DEFAULT_ENDPOINT, w.config)
        yield primary.PrimaryAgent(chat, w, pool, ws.job_id), w, pool
    finally:
        if pool is not None:
            pool.close()
        ws.close()


def test_the_walk_through_by_predict(local_agent):
    agent, w, pool = local_agent

    hello = agent.predict(ask("hello"))
    thread = hello["custom_outputs"]["thread_id"]
    assert reply_text(hello).startswith("Hello!") and tool_calls(hello) == []
    assert hello["custom_outputs"]["run_ids"] == []

    asked = agent.predict(ask("What was the total revenue in 2025?", thread))
    [first] = asked["custom_outputs"]["run_ids"]
    assert [name for name, _ in tool_calls(asked)] == ["start_databricks_job"]
    assert f"run {first}" in reply_text(asked)

    def answered():
        response = agent.predict(ask("is it done?", thread))
        assert tool_calls(response) == [("poll_databricks_job", f'{{"run_id": "{first}"}}')], response
        return "Answer:" in reply_text(response) and response

    polled = wait_for(answered, f"run {first}'s answer", every=0.2)  # each try is a turn
    # the answer is in the step log a moment before the worker process has exited; a run that ended since the last
    # turn is told by the turn itself
    assert re.match(rf"Run {first} (is|has ended since we last spoke: it is) (RUNNING|TERMINATED SUCCESS), with 4 "
                    rf"steps logged", reply_text(polled)), polled
    assert money(REVENUE_2025) in reply_text(polled), reply_text(polled)
    assert polled["custom_outputs"]["run_ids"] == [] and polled["custom_outputs"]["turn"] > 2

    # a second question, cancelled at once (as a client's cancel button would)
    asked = agent.predict(ask("How many orders were there in 2024?", thread))
    [second] = asked["custom_outputs"]["run_ids"]
    cancelled = agent.predict(ask(f"cancel run {second}", thread))
    assert tool_calls(cancelled) == [("terminate_databricks_job", f'{{"run_id": "{second}"}}')]
    assert f"I asked to cancel run {second}; it is now TERMINATING" in reply_text(cancelled)
    assert wait_ended(w, second).state.result_state.value == "CANCELED"
    steps = steps_of(pool, second)
    # cancelled before its worker's Python started (it then logs nothing, as on Databricks), or logged as cancelled
    assert [s["status"] for s in steps][-1:] in ([], ["cancelled"]), \
        f"run {second} was cancelled, but its step log is {[s['status'] for s in steps]}"
    told = agent.predict(ask("thanks", thread))  # it ended between turns: this turn tells it, unasked
    reply = reply_text(told)
    assert f"Run {second} has ended since we last spoke: it is TERMINATED CANCELED" in reply, reply
    assert "Cancelled: " in reply and reply.endswith("You're welcome!"), reply
    assert told["custom_outputs"]["delivered_run_ids"] == [second]
    again = agent.predict(ask("thanks", thread))
    assert reply_text(again) == "You're welcome!" and again["custom_outputs"]["delivered_run_ids"] == []


def test_supported_shapes_through_the_whole_stack(local_agent):
    """A few of the offline Genie's question shapes, asked at once in one thread, each answered by its own run; a
    follow-up is asked within one request ("... and also ..."), as one run is one Genie conversation."""
    agent, w, pool = local_agent
    (region, region_revenue), (product, product_revenue) = top(grouped("revenue", "region")), \
        top(grouped("revenue", "product", 2025))
    expected = {
        "What was the total revenue in 2025 and also what about 2024?":
            [f"Total revenue in 2025: {money(REVENUE_2025)}.",
             f"Total revenue in 2024: {money(measure('revenue', in_year(2024)))}."],
        "Which region has the most sales?":
            [f"The region with the highest revenue in 2024-2025 is {region}, with {money(region_revenue)}."],
        "Top 3 products by revenue in 2025":
            [f"Top 3 products by revenue in 2025: {product} leads with {money(product_revenue)}."],
        "How many customers bought something in 2024?":
            [f"Total active customers in 2024: {measure('customers', in_year(2024)):,}."],
    }
    thread = agent.predict(ask("hello"))["custom_outputs"]["thread_id"]
    runs = {question: agent.predict(ask(question, thread))["custom_outputs"]["run_ids"][0] for question in expected}
    replies = ""  # a run that ended before its poll is told, unasked, by whichever turn comes first
    for run_id in runs.values():
        wait_ended(w, run_id)
        replies += reply_text(agent.predict(ask(f"is run {run_id} done?", thread))) + "\n"
    for question, run_id in runs.items():
        assert re.search(rf"Run {run_id} (is|has ended since we last spoke: it is) TERMINATED SUCCESS", replies)
        for sentence in expected[question]:
            assert sentence in replies, (question, sentence, replies)


def test_a_question_the_offline_genie_would_change_ends_as_a_refusal_not_as_data(local_agent):
    agent, w, pool = local_agent
    asked = agent.predict(ask("Which customers churned?"))
    thread, [run] = asked["custom_outputs"]["thread_id"], asked["custom_outputs"]["run_ids"]
    wait_ended(w, run)
    told = reply_text(agent.predict(ask("ok", thread)))
    assert told.startswith(f"Run {run} has ended since we last spoke: it is TERMINATED SUCCESS, with 4 steps logged, "
                           f"but it got no data.\n\nWhat it says:\nI could not get the data: Genie could not answer: "
                           f"I can't answer 'Which customers churned?' as asked: I don't know what 'churned' means "
                           f"here"), told
    assert "Answer:" not in told and "What would you like to know?" not in told, told
