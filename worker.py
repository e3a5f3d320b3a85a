"""The Databricks Job task: a standalone worker agent that answers one data request with Genie.

The primary agent starts it through `w.jobs.run_now`, and job.yml turns the job parameters into the flags
below; it also runs by hand: `python worker.py --request "total revenue in 2025"`. It runs a bounded
tool loop with `query_genie` and logs every step to `task_logs` in Lakebase, each committed as it goes so
a poller sees progress live: started, tool_call, tool_result, completed. A failure logs `failed` and a
cancellation (SIGTERM, which is how Databricks cancels a run) logs `cancelled`; both exit non-zero, so the
Job run shows the outcome too. What a person must fix (bad flags, no database, a `--run-id` whose run has ended:
its step log is closed) is one line on stderr. The answer is also printed on stdout between two marker lines
(`runs.answer_block`): a poller finds it in the run's output if the step log never got it.
With an MLflow experiment named (--mlflow-experiment) and mlflow installed, the run is also one MLflow trace
(tracing.py): a span per model call and per query_genie, tagged with the run id and the thread id; the `started`
step records its trace id. Without them the run is the same, untraced.
"""
import signal

if __name__ == "__main__":  # a cancel during start-up (imports take ~0.3 s) waits until the log can record it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass

import psycopg

import lakebase
import runs
import tracing
from genie import DEFAULT_DESCRIPTION, Genie, GenieConfig, GenieUnavailable
from llm import DEFAULT_ENDPOINT, ChatConfig, LimitReached, LLMError, run_tools

log = logging.getLogger("worker")

MAX_REQUEST_CHARS = 20_000
FINAL_STEP_SECONDS = 20 * 60  # how long the run's last step is retried while the database is out of reach
SYSTEM_PROMPT = """You are a data analyst. Answer the user's request with data from the query_genie tool, \
which asks a Genie space questions in plain language and returns its answer, the SQL and the rows.
Ask one focused question per call; ask follow-up questions when the first answer is not enough.
When you have what you need, answer concisely: the key numbers first, then a small table if it helps.
If the data cannot answer the request, say so and say what is missing. Never invent numbers."""


class UsageError(Exception):
    """A bad flag or setting: one line for the person who started the run."""


class Cancelled(BaseException):
    """SIGTERM arrived: the run was cancelled. A BaseException, so no tool error handler swallows it."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="worker.py", description="Answer one data request with Genie, logging each step to Lakebase.",
        epilog="Environment: LAKEBASE_DSN (or PG* variables), LAKEBASE_INSTANCE, LAKEBASE_ENDPOINT, "
               "LAKEBASE_DATABASE, LAKEBASE_USER (the Postgres role; default: the Databricks identity), "
               "GENIE_SPACE_ID, GENIE_DESCRIPTION (the tool description the model reads), LLM_ENDPOINT_NAME "
               f"(default {DEFAULT_ENDPOINT}), LLM_BASE_URL (an OpenAI-compatible server instead), LLM_MODEL, "
               "LLM_API_KEY, MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI (where traces go; default on Databricks: "
               "its workspace), LOG_LEVEL (default INFO); Databricks auth as the SDK reads it (DATABRICKS_HOST, ...). "
               "An empty flag value means 'not given'. Exit status: 0 answered, 1 failed, 2 bad input (or a run "
               "that has already ended: its step log is closed), "
               "3 no step-log database, 143 cancelled (SIGTERM).")
    p.add_argument("--request", required=True, help="the user's data request, in plain language")
    p.add_argument("--thread-id", default="", help="the primary agent's thread that asked (kept in the log)")
    p.add_argument("--asked-by", default="", help="the user who asked, as the primary agent knew them (kept in the "
                   "log; verified on Model Serving with on-behalf-of-user authorization)")
    p.add_argument("--run-id", default="", help="the Databricks run id ({{job.run_id}}) that keys the step "
                   "log; default: a new local-<uuid>, printed at start")
    p.add_argument("--lakebase-instance", default="", help="Lakebase provisioned instance name "
                   "(default: LAKEBASE_INSTANCE)")
    p.add_argument("--lakebase-endpoint", default="", help="Lakebase autoscaling endpoint "
                   "projects/P/branches/B/endpoints/E (default: LAKEBASE_ENDPOINT)")
    p.add_argument("--lakebase-database", default="", help="database in that instance or endpoint "
                   f"(default: LAKEBASE_DATABASE or {lakebase.DEFAULT_DATABASE})")
    p.add_argument("--genie-space-id", default="", help="Genie space to ask (default: GENIE_SPACE_ID)")
    p.add_argument("--llm-endpoint", default="", help=f"chat model serving endpoint (default: "
                   f"LLM_ENDPOINT_NAME or {DEFAULT_ENDPOINT})")
    p.add_argument("--mlflow-experiment", default="", help="MLflow experiment to trace the run in, if mlflow is "
                   "installed (default: MLFLOW_EXPERIMENT_NAME; none: no trace)")
    return p


@dataclass
class WorkerConfig:
    request: str
    run_id: str
    thread_id: str = ""
    asked_by: str = ""  # who asked (kept in the started step)
    genie_space_id: str = ""
    genie_description: str = ""  # GENIE_DESCRIPTION overrides the tool description the model sees
    mlflow_experiment: str = ""  # --mlflow-experiment, MLFLOW_EXPERIMENT_NAME: the run's trace goes there
    chat: ChatConfig = dataclasses.field(default_factory=ChatConfig)  # --llm-endpoint, LLM_*
    db: lakebase.LakebaseConfig = dataclasses.field(default_factory=lakebase.LakebaseConfig)  # the step log
    max_calls: int = 12  # model calls per run
    max_tool_calls: int = 5  # tool calls run per model reply (Genie answers about 5 questions a minute)
    retry_seconds: int = 120  # how long the SDK keeps retrying 429/503 (Genie allows ~5 questions a minute)
    log_level: str = "INFO"  # LOG_LEVEL

    @classmethod
    def from_args(cls, args, env=os.environ) -> "WorkerConfig":
        db = lakebase.LakebaseConfig.from_env(env)
        if args.lakebase_instance or args.lakebase_endpoint:  # a flag names the database instead of the env
            db = dataclasses.replace(db, dsn="", instance=args.lakebase_instance, endpoint=args.lakebase_endpoint)
        if args.lakebase_database:
            db = dataclasses.replace(db, database=args.lakebase_database)
        return cls(request=args.request, run_id=args.run_id or f"local-{uuid.uuid4()}", thread_id=args.thread_id,
                   asked_by=args.asked_by,
                   genie_space_id=args.genie_space_id or env.get("GENIE_SPACE_ID", ""),
                   genie_description=env.get("GENIE_DESCRIPTION", ""),
                   mlflow_experiment=args.mlflow_experiment or env.get("MLFLOW_EXPERIMENT_NAME", ""),
                   chat=ChatConfig.from_env(env, endpoint=args.llm_endpoint), db=db,
                   log_level=env.get("LOG_LEVEL") or "INFO")

    def check(self):
        request = self.request.strip()
        if not request:
            raise UsageError("the request is empty: pass the question with --request")
        if len(request) > MAX_REQUEST_CHARS:
            raise UsageError(f"the request is {len(request):,} characters; the limit is {MAX_REQUEST_CHARS:,}")
        if not self.genie_space_id:
            raise UsageError("no Genie space: set GENIE_SPACE_ID or pass --genie-space-id")


class StepLog:
    """Writes one run's steps to task_logs, each under a key chosen before its first try, so a retry after a lost
    reply never logs a step twice. A lost connection, a lock or statement timeout, or a failed reconnect is tried
    again: at once for a step along the way, and with growing pauses for `final_seconds` for the run's last
    step, which carries its answer. `bounds`: the database config, whose time limits an error names."""

    def __init__(self, connect, run_id: str, final_seconds: float = FINAL_STEP_SECONDS,
                 bounds: lakebase.LakebaseConfig | None = None):
        self.connect, self.run_id, self.final_seconds, self.bounds = connect, run_id, final_seconds, bounds
        self.conn = connect()

    def __call__(self, status: str, payload: dict, *, final: bool = False) -> int:
        # SIGTERM waits until the step is written: cut short, the write would leave its transaction open,
        # holding the run's step lock, and the `cancelled` step would wait for that lock forever.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        key, deadline = uuid.uuid4().hex, time.monotonic() + (self.final_seconds if final else 0)
        wait = 0.0  # the first retry goes at once: a restarted server is usually back, and connect() waits a while
        try:
            while True:
                try:
                    if self.conn.closed:
                        self.conn = self.connect()
                    return lakebase.log_step(self.conn, self.run_id, status, payload, key=key)
                except (psycopg.Error, lakebase.LakebaseError) as e:
                    transient = isinstance(e, lakebase.Unreachable) or lakebase.connection_lost(e) or \
                        lakebase.timed_out(e)
                    if not transient or (wait and time.monotonic() + wait > deadline):
                        raise
                    lost = lakebase.connection_lost(e) or isinstance(e, lakebase.Unreachable)
                    log.warning("%s; %s%s to log the %s step (%s)", "lost the database connection" if lost else
                                "the database failed", "reconnecting" if lost else "trying again",
                                f" in {wait:.0f} s" if wait else "", status, lakebase.explain(e, self.bounds))
                time.sleep(wait)
                wait = min(max(2 * wait, 1.0), 30.0)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def run(config: WorkerConfig, chat, genie: Genie, step: StepLog, span=None) -> str:
    """The agent: the request, then the tool loop with query_genie, each call and result logged as a step (and a
    span, with `span`, the run's trace's span factory). Returns the answer (main() logs the run's start and end)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": config.request}]

    def on_message(message, info):
        if message["role"] == "assistant":
            for call in message.get("tool_calls", []):
                step("tool_call", {"call_id": call["id"], "name": call["function"]["name"],
                                   "arguments": _arguments(call["function"]["arguments"])})
        elif message["role"] == "tool":  # detail: Genie's outcome, if this call reached Genie
            step("tool_result", {"call_id": info["call_id"], "name": info["name"], "output": message["content"],
                                 "duration_ms": round(info["duration_s"] * 1000), "error": info["error"] is not None,
                                 "detail": info["detail"] or {}})

    answer = run_tools(chat, messages, [genie.tool()], max_calls=config.max_calls,
                       max_tool_calls=config.max_tool_calls, on_message=on_message, span=span,
                       fatal=(psycopg.Error, GenieUnavailable))
    return answer


def _arguments(text: str):
    try:  # the log keeps a dict when the model sent a JSON object, else the text as sent
        arguments = json.loads(text)
    except ValueError:
        return text
    return arguments if isinstance(arguments, dict) else text


def workspace_client(config: WorkerConfig):
    """The WorkspaceClient from the environment's Databricks auth (on a Job run: the run's own identity)."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config

    workspace = WorkspaceClient(config=Config(retry_timeout_seconds=config.retry_seconds))
    lakebase.add_secrets(*lakebase.sdk_secrets(workspace.config))  # a profile's token, too
    return workspace


def _cancel(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough (a dying local workspace may send several)
    raise Cancelled(f"received {signal.Signals(signum).name}: the run was cancelled")


def open_step_log(config: WorkerConfig, workspace) -> StepLog:
    """The run's step log, connected. Its login is built once: a reconnect reuses it and its token while fresh,
    so a database outage (the last step retries for FINAL_STEP_SECONDS) adds no Workspace API calls."""
    login = lakebase.login_for(config.db, workspace)  # None for a plain DSN
    return StepLog(lambda: lakebase.connect(config.db, login=login), config.run_id, bounds=config.db)


def setup_logging(level: str):
    """Log records on stderr at `level`, a level name in any case (LOG_LEVEL); an unknown one is a UsageError."""
    number = logging.getLevelName(level.upper())  # a number for a level's name (getLevelNamesMapping is 3.11+)
    if not isinstance(number, int):
        raise UsageError(f"LOG_LEVEL={level!r} is not a log level: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    logging.basicConfig(level=number, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv=None) -> int:
    config = WorkerConfig.from_args(parser().parse_args(argv))
    try:
        setup_logging(config.log_level)
    except UsageError as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2
    lakebase.guard_secrets()
    try:
        lakebase.check_id(config.run_id, "run id")  # else the step log refuses every step
    except ValueError as e:
        print(f"worker: {e}", file=sys.stderr)
        return 2
    try:
        # Lakebase mints its login tokens through the workspace; a plain DSN needs none
        workspace = workspace_client(config) if config.db.instance or config.db.endpoint else None
        step = open_step_log(config, workspace)
        lakebase.migrate(step.conn)
    except (lakebase.LakebaseError, psycopg.Error, ValueError) as e:  # ValueError: the SDK's auth config
        print(f"worker: cannot reach the step-log database: {lakebase.explain(e, config.db)}", file=sys.stderr)
        return 3
    trace = tracing.job_run(config.mlflow_experiment, request=config.request[:MAX_REQUEST_CHARS],
                            run_id=config.run_id, thread_id=config.thread_id)
    started = time.monotonic()
    try:
        signal.signal(signal.SIGTERM, _cancel)  # the first step unblocks SIGTERM: a pending one is raised there
        step("started", {"request": config.request[:MAX_REQUEST_CHARS], "thread_id": config.thread_id or None,
                         "asked_by": config.asked_by or None, **({"trace_id": trace.trace_id} if trace else {})})
        print(f"worker: run {config.run_id}", file=sys.stderr)
        config.check()
        workspace = workspace or workspace_client(config)
        genie = GenieConfig(config.genie_space_id, description=config.genie_description or DEFAULT_DESCRIPTION)
        answer = run(config, config.chat.client(workspace.config), Genie(workspace, genie), step,
                     trace and trace.spans)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # answered: too late to cancel
    except Cancelled as e:
        return _end(step, "cancelled", {"reason": str(e)}, f"worker: {e}", 128 + signal.SIGTERM, trace)
    except KeyboardInterrupt:
        return _end(step, "cancelled", {"reason": "interrupted (Ctrl-C)"}, "worker: interrupted (Ctrl-C)", 130,
                    trace)
    except lakebase.RunEnded as e:  # the run was logged to its end already, maybe by another worker
        if trace:
            trace.end("failed", {"error": str(e)})
        print(_closed(e), file=sys.stderr)
        return 2
    except Exception as e:  # anything else ends the run: record why, then fail the Job run visibly
        error = _describe(e, config)
        log.debug("run failed", exc_info=True)
        return _end(step, "failed", {"error": error, "kind": type(e).__name__}, f"worker: failed: {error}",
                    2 if isinstance(e, UsageError) else 1, trace)
    print(runs.answer_block(answer), flush=True)  # the run's output keeps it, should the step log miss it
    return _end(step, "completed", {"answer": answer}, f"worker: completed in {time.monotonic() - started:.1f} s", 0,
                trace)


def _end(step: StepLog, status: str, payload: dict, message: str, code: int, trace=None) -> int:
    """Log the run's last step and say why it ended, then end its trace; returns the exit code (3 if the log is
    out of reach)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ending already: a second SIGTERM changes nothing
    try:
        step(status, payload, final=True)
    except lakebase.RunEnded as e:  # another worker with this run id ended it first
        code, message = 2, _closed(e)
    except (lakebase.LakebaseError, psycopg.Error, ValueError) as e:
        why = payload.get("error") or payload.get("reason")
        ended = f"{status}: {why}" if why else status
        print(f"worker: could not log the run's end ({ended}): {lakebase.explain(e, step.bounds)}", file=sys.stderr)
        code, message = 3, None
    if trace:
        trace.end(status, payload)
    if message:
        print(message, file=sys.stderr)
    return code


def _closed(e: lakebase.RunEnded) -> str:
    return f"worker: {e}; a run is logged once: start a new run (without --run-id, a local run gets a new id)"


def _describe(e: Exception, config: WorkerConfig) -> str:
    """Why the run failed, for a person: on one line, no secrets; for a statement cancelled at one of the database's
    time limits, which limit (lakebase.explain)."""
    if isinstance(e, LimitReached):
        return f"no final answer after {config.max_calls} model calls; the request may need narrowing"
    text = lakebase.explain(e, config.db)
    return f"the chat model failed: {text}" if isinstance(e, LLMError) else text


if __name__ == "__main__":
    sys.exit(main())
