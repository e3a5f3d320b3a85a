"""The primary agent users talk to: small talk answered directly, data questions delegated to a Databricks Job.

`PrimaryAgent(chat, workspace, db, job_id).predict(request)` takes and returns MLflow ResponsesAgent shapes as
plain dicts (serving.py wraps it for Model Serving); `build_agent(config)` builds it with its clients, for the
terminal and for serving alike. A turn (`Turn`) is one bounded tool loop over the thread's recent messages, and
its methods are its three tools: start_databricks_job (ends the turn with the run id), poll_databricks_job (run
state + the worker's steps and answer from task_logs) and terminate_databricks_job. The turn is stored in one
append at its end; nothing of a failed turn is stored (unless the connection is lost while it is being stored:
then the user is told it may have been).

`python primary.py` is a terminal chat on a workspace, or on the local stand-in workspace (see --help): it lives
in terminal.py. The request and response shapes are in agent_io.py, the Jobs API calls in runs.py.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the modules load is one line, not a traceback (terminal.main takes over)
    signal.signal(signal.SIGINT, lambda *_: sys.exit("\nprimary.py: interrupted while starting"))

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import psycopg_pool

import lakebase
import llm
import runs
from agent_io import (
    BadRequest,
    TurnRequest,
    error_event,
    item_done,
    message_id,
    output_items,
    parse_request,
    text_delta,
)

log = logging.getLogger("primary")

MAX_REQUEST_CHARS = 20_000  # a job's request: worker.py refuses longer ones
DEFAULT_WINDOW = 40  # stored messages sent to the model as context
DEFAULT_MAX_CALLS = 6  # model calls per turn
RECENT_STEPS = 5  # steps of a run shown by poll
MAX_STARTS = 3  # job runs one turn may start: a runaway model can't flood the job queue
MAX_DELIVERIES = 3  # runs read from the Jobs API at the start of a turn, to tell the user of those that ended
SYSTEM_PROMPT = """You are the assistant people chat with about their company's data.
Answer greetings, small talk and questions about this conversation yourself, briefly.
For a question that needs data (numbers, tables, trends), call start_databricks_job with the request restated \
completely: the job's worker does not see this conversation. The job runs in the background.
When the user asks how a job is doing or for its answer, call poll_databricks_job with its run id and give them \
the answer, or its state and progress, in plain words. To stop a job, call terminate_databricks_job.
Never invent numbers. When a tool returns an error, say what went wrong and what to do about it.
A turn may start with poll_databricks_job results marked "unasked": jobs of this conversation that ended since \
the user last heard of them. Whatever the user wrote, answer it and also tell them each such job's outcome (its \
answer, its error, or that it was cancelled)."""
INSTRUCTIONS = "The client sent these instructions for this turn; follow them unless they conflict with the above:"
RUN_SCHEMA = {"type": "object", "required": ["run_id"], "properties": {"run_id": {
    "type": "string", "description": "the run id that start_databricks_job returned, e.g. \"123\""}}}
START_SCHEMA = {"type": "object", "required": ["request"], "properties": {"request": {
    "type": "string", "description": "the user's data question, restated so that it stands on its own"}}}


class TurnFailed(RuntimeError):
    """The chat model or the database failed: the message says whether the turn was stored and what to check."""


class MaybeStored(Exception):
    """The connection was lost while the turn was being stored, and stayed lost: it may have been committed."""


class ConfigError(RuntimeError):
    """The agent can't be built as configured: the message names the setting."""


@dataclass
class AgentConfig:
    """The agent's settings, read from the environment once (the terminal and serving add their own)."""
    job_id: str = ""  # DATABRICKS_JOB_ID: the worker job
    genie_space_id: str = ""  # GENIE_SPACE_ID: the space verified callers must be able to use (serving.py)
    chat: llm.ChatConfig = field(default_factory=llm.ChatConfig)  # LLM_ENDPOINT_NAME, LLM_BASE_URL, ...
    database: lakebase.LakebaseConfig = field(default_factory=lakebase.LakebaseConfig)  # LAKEBASE_*, PG*
    jobs_retry_seconds: int = 60  # the SDK's retry budget: a throttled Jobs API fails one tool call, not the turn
    pool_size: int = 10  # Postgres connections of this process

    @classmethod
    def from_env(cls, env=os.environ):
        return cls(job_id=env.get("DATABRICKS_JOB_ID", "").strip(), genie_space_id=env.get("GENIE_SPACE_ID", ""),
                   chat=llm.ChatConfig.from_env(env), database=lakebase.LakebaseConfig.from_env(env))

    def problems(self) -> list[str]:
        """What is missing or wrong for an agent on a workspace, one phrase each."""
        return [problem for problem, bad in (
            ("DATABRICKS_JOB_ID (the worker job's id) is not set", not self.job_id),
            (f"DATABRICKS_JOB_ID must be a job id (a number), not {self.job_id!r}",
             self.job_id and not self.job_id.isdigit()),
            ("no database is set: set LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT (or LAKEBASE_DSN)",
             not self.database.configured())) if bad]


def build_agent(config: AgentConfig, *, host: str | None = None, token: str | None = None,
                span=None) -> "PrimaryAgent":
    """The agent and its clients: a WorkspaceClient whose retries stop after `jobs_retry_seconds`, the chat client,
    a migrated Lakebase pool. `host` and `token` name the workspace (the local one); default: the SDK's own auth.
    `span`: llm.run_tools's span factory, to trace each turn's model and tool calls (tracing.Spans)."""
    from databricks.sdk import WorkspaceClient  # here, not at the top: importing the SDK takes seconds
    from databricks.sdk.core import Config

    sdk = {"host": host, "token": token, "auth_type": "pat"} if host else {}
    try:
        workspace = WorkspaceClient(config=Config(retry_timeout_seconds=config.jobs_retry_seconds, **sdk))
    except ValueError as e:  # the SDK's "cannot configure default credentials", "more than one ... method"
        raise ConfigError(f"Databricks auth: {e}") from e
    lakebase.add_secrets(*lakebase.sdk_secrets(workspace.config))  # a profile's token, too
    chat = config.chat.client(workspace.config)
    pool = lakebase.open_pool(config.database, workspace, migrated=True, max_size=config.pool_size)
    log.info("agent with job %s, Databricks auth %s, chat at %s", config.job_id, workspace.config.auth_type,
             lakebase.redact(chat.url))
    return PrimaryAgent(chat, workspace, pool, config.job_id, genie_space_id=config.genie_space_id,
                        jobs_auth_hint=runs.jobs_auth_hint(workspace.config, config.job_id), span=span)


@dataclass(frozen=True)
class Caller:
    """A caller whose identity was verified from their own token (serving.py, with on-behalf-of-user
    authorization): their user name, and a databricks.sdk.WorkspaceClient that acts as them."""
    user_id: str
    workspace: object


class PrimaryAgent:
    """The agent. `chat`: llm.ChatClient; `workspace`: databricks.sdk.WorkspaceClient; `db`: a
    psycopg_pool.ConnectionPool (lakebase.open_pool, migrated); `job_id`: the worker job; `span`: the tool loop's
    span factory, if the turns are traced. Thread-safe."""

    def __init__(self, chat, workspace, db, job_id, *, window=DEFAULT_WINDOW, max_calls=DEFAULT_MAX_CALLS,
                 system_prompt=SYSTEM_PROMPT, jobs_auth_hint=runs.PERMISSION_FIX, genie_space_id="", span=None):
        self.chat, self.db, self.jobs = chat, db, runs.Jobs(workspace, job_id, jobs_auth_hint)
        self.window, self.max_calls, self.system_prompt, self.span = window, max_calls, system_prompt, span
        self.genie_space_id = genie_space_id  # checked as a verified caller before a job starts for them

    def predict(self, request: dict, caller: Caller | None = None) -> dict:
        """One turn: {"output": [items], "custom_outputs": {"thread_id", "turn", "run_ids"}}. `caller`: who asks,
        verified (then context.user_id is ignored)."""
        output = []
        final, custom = self._turn(request, lambda event: output.append(event["item"]) if "item" in event else None,
                                   caller)
        return {"output": [*output, final], "custom_outputs": custom}

    def predict_stream(self, request: dict, caller: Caller | None = None) -> Iterator[dict]:
        """One turn as ResponsesAgent stream events, as they happen: the model's text as it arrives, each tool call
        and result; the last event carries custom_outputs. A failure before the first event is raised; a failure
        after it ends the stream with an `error` event saying what to check and whether the turn was stored (not, but
        when the connection was lost while storing it: then it may have been)."""
        events = queue.Queue()

        def work():
            try:
                final, custom = self._turn(request, events.put, caller)
                events.put(item_done(final, custom))
            except BaseException as e:  # handed to the consumer
                events.put(e)
            events.put(None)

        # the turn's thread runs in the caller's context, so a tracer's current span (the turn's trace) is its parent
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name="primary-turn", daemon=True).start()
        sent = False
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                if not sent:
                    raise event
                event = _error_event(event)
            sent = True
            yield event

    def _turn(self, request, emit, caller=None) -> tuple[dict, dict]:
        """Check the request, open the turn, run its loop (emit(event) as it streams), store it: (the final
        message's item, custom_outputs)."""
        request = parse_request(request)
        if caller is not None:  # verified: whatever context.user_id claims, the token says who asks
            request.user_id = caller.user_id
        turn = None
        with _failures_explained(getattr(self.db, "bounds", None), lambda: turn.started if turn else []):
            with self.db.connection() as conn:  # the owner is decided here, once; every later write holds to it
                if not request.named:  # a client that resends the conversation: the thread that issued its items
                    request.thread_id = (lakebase.thread_of_items(conn, request.item_ids, request.user_id)
                                         or request.thread_id)
                owner, turns = lakebase.claim_thread(conn, request.thread_id, request.user_id)
                history = lakebase.load_window(conn, request.thread_id, self.window)
                untold = lakebase.undelivered_runs(conn, request.thread_id, limit=MAX_DELIVERIES)
            news = self.finished_runs(request.thread_id, candidates=untold) if untold else []
            turn = Turn(self, request, turns + 1, history, owner, caller, news=news)
            final = turn.run(emit)
            turn.number = self._store(turn)
        return final, turn.custom_outputs()

    def _store(self, turn) -> int:
        """Append the turn under its key: the client's request id makes it, so a retried request is stored once;
        else one chosen now. A lost connection leaves unknown whether the append was committed: it is tried once
        more on another connection, where the key keeps it from being stored twice."""
        request = turn.request
        key = (hashlib.sha256(f"{request.thread_id}\x00request {request.request_id}".encode()).hexdigest()
               if request.request_id else uuid.uuid4().hex)

        def append():
            with self.db.connection() as conn:
                return lakebase.append_turn(conn, request.thread_id, turn.new_messages(), seed=turn.seed, key=key,
                                            owner=turn.owner, item_ids=turn.item_ids,
                                            delivered=turn.delivered)
        try:
            return append()
        except psycopg.OperationalError as e:
            if not lakebase.connection_lost(e):
                raise  # the server refused it and rolled it back: nothing was stored
            log.warning("thread %s: lost the database connection while storing the turn; trying again",
                        request.thread_id)
            try:
                return append()
            except (psycopg.Error, psycopg_pool.PoolTimeout, lakebase.LakebaseError) as again:
                raise MaybeStored(lakebase.explain(e)) from again

    def finished_runs(self, thread_id: str, *, skip=(), candidates=None) -> list[dict]:
        """Reports (run_report) of the thread's runs that have ended and whose outcome no turn has given the user,
        oldest first. Bounded: it reads at most MAX_DELIVERIES runs from the Jobs API, and stops at the first
        failure (logged), so a failing Jobs API delays the news rather than failing the turn. A run the Jobs API no
        longer has is reported once as such, so it never holds back the news of later runs. `skip`: run ids not to
        read; `candidates`: the undelivered runs, if the caller has just read them (lakebase.undelivered_runs)."""
        if candidates is None:
            with self.db.connection() as conn:
                candidates = lakebase.undelivered_runs(conn, thread_id, limit=MAX_DELIVERIES, skip=skip)
        if not candidates:
            return []
        from databricks.sdk.errors import DatabricksError, NotFound  # loaded already: the SDK started the runs

        reports = []
        for run_id in candidates:
            try:
                run = self.jobs.get(run_id)
                if runs.summarize(run).finished:  # its worker may have logged its outcome a bit earlier
                    reports.append(self.run_report(run_id, run))
            except (llm.ToolError, DatabricksError, OSError) as e:
                if isinstance(e.__cause__, NotFound):  # gone (its job deleted, or past the Jobs API's retention)
                    reports.append({"run_id": run_id, "state": "UNKNOWN", "error": "the Jobs API no longer has this "
                                    "run (its job was deleted, or the run is older than the Jobs API keeps runs), "
                                    "so its outcome can't be read"})
                    continue
                log.warning("could not read run %s to tell its outcome, next turn will: %s", run_id, e)
                break
        return reports

    def run_report(self, run_id: str, run) -> dict:
        """What poll_databricks_job returns (runs.report): `run` is the Jobs API's Run, read before the steps (a run
        that has ended has logged all it will)."""
        with self.db.connection() as conn:
            progress = lakebase.run_progress(conn, run_id, recent=RECENT_STEPS)
        return runs.report(run_id, run, progress, self.jobs)

    def own_run(self, thread_id: str, run_id) -> str:
        """The run id as text, if this thread started that run; else a ToolError."""
        text = str(run_id).strip() if isinstance(run_id, (str, int)) and not isinstance(run_id, bool) else ""
        if not text.isdigit():
            raise llm.ToolError(f"run_id must be the number start_databricks_job returned, e.g. \"123\"; got "
                                f"{run_id!r}")
        with self.db.connection() as conn:
            if lakebase.find_run(conn, thread_id, run_id=text):
                return text
            ours = [run["run_id"] for run in lakebase.list_runs(conn, thread_id)]
        raise llm.ToolError(f"run {text} was not started in this conversation, so it can't be read or cancelled "
                            f"here. Runs started in this conversation: {', '.join(ours) or 'none'}")


def _error_event(e: BaseException) -> dict:
    """The event that ends a stream whose turn failed after its first event: the client shows it under the part of
    the answer it already has."""
    if isinstance(e, TurnFailed):
        log.warning("a streamed turn failed: %s", e)
        return error_event(str(e), "TEMPORARILY_UNAVAILABLE")
    log.error("a streamed turn failed", exc_info=e)
    return error_event(f"the agent failed ({type(e).__name__}) and nothing of this turn was stored. Send the "
                       f"message again; if it fails again, the agent's logs say why", "INTERNAL_ERROR")


@contextlib.contextmanager
def _failures_explained(bounds, started):
    """What the user can't fix in the turn becomes a BadRequest, or a TurnFailed saying what happened, what to do
    and which job runs the turn had started (`started()`): they keep going."""
    try:
        yield
    except lakebase.UserIdRequired as e:
        raise BadRequest(f"{e}: send it as context.user_id, or start a new thread (no thread_id)") from None
    except PermissionError as e:
        raise BadRequest(f"{e}: start a new thread (no thread_id) or use one of yours") from None
    except (MaybeStored, llm.LLMError, psycopg_pool.PoolTimeout, psycopg.Error, lakebase.LakebaseError) as e:
        raise TurnFailed(_failure(e, bounds).rstrip(".") + "".join(_still_running(run) for run in started())) from e


def _failure(e: Exception, bounds) -> str:
    if isinstance(e, MaybeStored):
        return (f"the database connection was lost while this turn was being stored, so it may or may not have "
                f"been stored: {e}. Check that Postgres (Lakebase) is up and reachable, and send the message again "
                f"only if the conversation does not show it")
    if isinstance(e, llm.LLMError):
        return (f"the chat model failed and nothing was stored: {lakebase.redact(str(e))}. Check that the model "
                f"endpoint is up and reachable, then send the message again")
    if isinstance(e, psycopg_pool.PoolTimeout):  # lakebase.Pool says why: connections failing, or all busy
        return f"the database failed and nothing was stored: {e}"
    if lakebase.timed_out(e):
        return (f"the database did not answer in time and nothing was stored: {lakebase.explain(e, bounds)}. "
                f"Send the message again in a moment")
    return (f"the database failed and nothing was stored: {lakebase.explain(e)}. Check that Postgres (Lakebase) "
            f"is up and reachable, then send the message again")


def _still_running(run: dict) -> str:
    if run["recorded"]:
        return f". Job run {run['run_id']} had already started and keeps going: ask about run {run['run_id']} later"
    return (f". Job run {run['run_id']} had already started and keeps going, but is not recorded in this "
            f"conversation: send the message again to record it (no second run starts)")


class Turn:
    """One turn of a thread: the request, the turn's number, the messages the model sees, the runs it started.
    Its methods named like the tools are the tools."""

    def __init__(self, agent: PrimaryAgent, request: TurnRequest, number: int, history: list, owner=None,
                 caller: Caller | None = None, news=()):
        self.agent, self.request, self.number, self.started = agent, request, number, []
        self.owner = owner  # the thread's owner, decided when the turn began (None: anonymous)
        self.caller, self.genie_checked = caller, False
        self.item_ids = []  # of the output items issued, stored with the turn
        # a new thread: the client's earlier messages, as many as the window holds (stored with the turn)
        self.seed = _window(request.history, agent.window) if number == 1 else []
        system = agent.system_prompt + (f"\n\n{INSTRUCTIONS}\n{request.instructions}" if request.instructions else "")
        context = _window(history, agent.window) if history else self.seed  # a new thread has no history
        self.messages = [{"role": "system", "content": system}, *context, {"role": "user", "content": request.text}]
        self.first = len(self.messages) - 1  # where this turn's own messages start
        self.news = list(news)  # reports of runs that ended unasked: the model is handed them as polls of its own
        self.messages += _news_messages(self.news)
        self.delivered = [report["run_id"] for report in self.news]  # runs whose outcome this turn tells

    def run(self, emit) -> dict:
        """The bounded tool loop, streamed: emit(event) gets the model's text as it arrives and each tool call and
        result. A job start or the bound ends it with our own final message. Returns the final message's item, under
        the id its text was streamed with."""
        text_id = None  # the message item the text of the current model call streams into

        def on_text(delta):
            nonlocal text_id
            text_id = text_id or message_id()
            emit(text_delta(text_id, delta))

        def on_message(message, info):
            nonlocal text_id
            if message["role"] == "tool" or message.get("tool_calls"):
                for item in self.items(message, item_id=text_id):
                    emit(item_done(item))
                text_id = None

        for message in self.messages[self.first + 1:]:  # the news, as the tool calls they are
            on_message(message, {})
        try:
            llm.run_tools(self.agent.chat, self.messages, self.tools(), max_calls=self.agent.max_calls,
                          on_message=on_message, on_text=on_text, span=self.agent.span,
                          fatal=(psycopg.Error, lakebase.LakebaseError, PermissionError))
        except llm.EndTurn:
            self.messages.append({"role": "assistant", "content": _started_reply(self.started) + self._untold()})
            on_text(self.messages[-1]["content"])
        except llm.LimitReached:
            self.messages.append({"role": "assistant", "content": f"I could not finish this within "
                                  f"{self.agent.max_calls} steps. Please ask again, perhaps more narrowly."
                                  + self._untold()})
            on_text(self.messages[-1]["content"])
        return self.items(self.messages[-1], final=True, item_id=text_id)[0]

    def items(self, message: dict, final=False, item_id=None) -> list[dict]:
        """The message as output items, keeping their ids: a client that sends them back finds this thread."""
        items = output_items(message, final, item_id)
        self.item_ids += [item["id"] for item in items if "id" in item]
        return items

    def _untold(self) -> str:
        """The news in our own words, when the turn ends in a reply of ours and the model wrote nothing itself."""
        told = any(m["role"] == "assistant" and m.get("content") for m in self.messages[self.first:])
        return "" if told or not self.news else "\n\n" + "\n\n".join(runs.outcome(report) for report in self.news)

    def new_messages(self) -> list[dict]:
        """What the turn stores: the user's message and all that followed (and, if it creates the thread, the
        seed before them: append_turn decides that)."""
        return self.messages[self.first:]

    def custom_outputs(self) -> dict:
        return {"thread_id": self.request.thread_id, "turn": self.number,
                "run_ids": [run["run_id"] for run in self.started], "delivered_run_ids": list(self.delivered)}

    def tools(self) -> list[llm.Tool]:
        return [
            llm.Tool("start_databricks_job", "Start a background job that answers a data question with the "
                     "company's data. Use it for any question that needs numbers or tables. The turn ends once "
                     "it has started; the user gets the run id.", START_SCHEMA, self.start_databricks_job),
            llm.Tool("poll_databricks_job", "Get a job run's state, its progress (steps so far, the latest "
                     "ones) and, once it has finished, its answer or error.", RUN_SCHEMA, self.poll_databricks_job),
            llm.Tool("terminate_databricks_job", "Cancel a job run that is still queued or running.", RUN_SCHEMA,
                     self.terminate_databricks_job)]

    def start_databricks_job(self, request) -> str:
        if not isinstance(request, str) or not request.strip():
            raise llm.ToolError("request must be the user's data question, as a non-empty string")
        request = lakebase.UNSTORABLE.sub("\ufffd", request.strip())  # a job parameter, an argv entry, a hash
        run = next((run for run in self.started if run["request"] == request), None)  # repeated in one reply
        if run:
            raise llm.EndTurn(_start_result(run))
        if len(self.started) >= MAX_STARTS:
            raise llm.ToolError(f"this turn has already started {MAX_STARTS} jobs, the most one turn may start: "
                                f"combine the questions into one request, or ask for the rest in the next turn")
        if len(request) > MAX_REQUEST_CHARS:
            raise llm.ToolError(f"the request has {len(request):,} characters; a job takes at most "
                                f"{MAX_REQUEST_CHARS:,}: restate it more briefly")
        thread_id, db = self.request.thread_id, self.agent.db
        with db.connection() as conn:  # a retry of this turn gets the key its first try reserved, so the same run
            key = lakebase.reserve_run(conn, thread_id, self._slot(), self._idempotency_key(request),
                                       owner=self.owner)
            known = lakebase.find_run(conn, thread_id, idempotency_key=key)
        if known:
            run_id = known["run_id"]
        else:
            run_id = str(self.agent.jobs.start({"request": request, "thread_id": thread_id, **self._on_behalf()},
                                               key))
        run = {"run_id": run_id, "run_page_url": self.agent.jobs.page_url(run_id), "request": request,
               "recorded": bool(known)}
        self.started.append(run)
        if not known:
            with db.connection() as conn:
                lakebase.record_run(conn, thread_id, run_id, key, request, owner=self.owner)
            run["recorded"] = True
        raise llm.EndTurn(_start_result(run))

    def _slot(self) -> str:
        """Which start of which turn this is: a retry of the turn (the same request id, or the same turn number
        and user message) has the same slots, whatever the model calls the request this time."""
        basis = ([f"request {self.request.request_id}"] if self.request.request_id
                 else [f"turn {self.number}", self.request.text])
        return hashlib.sha256("\x00".join([self.request.thread_id, *basis, str(len(self.started))]).encode()
                              ).hexdigest()

    def _on_behalf(self) -> dict:
        """The run's parameters naming who asked (asked_by), and, for a verified caller, the Genie space checked as
        them: the job answers as its own identity, so never for someone who could not ask Genie themselves."""
        asked = {"asked_by": self.request.user_id} if self.request.user_id else {}
        space = self.agent.genie_space_id
        if self.caller is None:
            return asked
        if not space:
            raise llm.ToolError(f"no Genie space is configured (GENIE_SPACE_ID), so {self.caller.user_id}'s access to "
                                f"it can't be checked and no job was started")
        if not self.genie_checked:
            from databricks.sdk.errors import NotFound, PermissionDenied

            try:
                self.caller.workspace.genie.get_space(space)
            except (NotFound, PermissionDenied) as e:
                raise llm.ToolError(f"{self.caller.user_id} may not use the Genie space that answers data questions "
                                    f"({space}: {e}), so no job was started for them. They can ask the space's owner "
                                    f"for access (Can Run)") from None
            self.genie_checked = True
        return {**asked, "genie_space_id": space}

    def _idempotency_key(self, request: str) -> str:
        """The key for a start with no reservation yet: the same for a retry of this request (the Jobs API's
        idempotency token covers a crash between run_now and record_run)."""
        request_id = self.request.request_id
        basis = ([self.request.thread_id, f"request {request_id}", str(len(self.started))] if request_id
                 else [self.request.thread_id, f"turn {self.number}", request])
        return hashlib.sha256("\x00".join(basis).encode()).hexdigest()

    def poll_databricks_job(self, run_id) -> str:
        run_id = self.agent.own_run(self.request.thread_id, run_id)
        report = self.agent.run_report(run_id, self.agent.jobs.get(run_id))
        if runs.ended(report) and run_id not in self.delivered:  # a poll the user asked for delivers the outcome too
            self.delivered.append(run_id)
        return json.dumps(report, ensure_ascii=False)

    def terminate_databricks_job(self, run_id) -> str:
        run_id = self.agent.own_run(self.request.thread_id, run_id)
        summary = runs.summarize(self.agent.jobs.get(run_id))
        if summary.finished:
            how = f": {summary.message}" if summary.message else ""
            raise llm.ToolError(f"run {run_id} has already finished ({summary.state}{how}); there is nothing to "
                                f"cancel")
        if summary.state != "TERMINATING":
            self.agent.jobs.cancel(run_id)  # an UNKNOWN run too: cancelling a run that has ended changes nothing
        note = "cancellation requested; the run stops within seconds"
        if summary.state == "UNKNOWN":
            note += " (its state could not be read: if it had already ended, it stays as it ended)"
        return json.dumps({"run_id": run_id, "state": "TERMINATING", "was": summary.state, "note": note})


def _window(messages: list, limit: int) -> list:
    """The last `limit` messages, starting at a user message: never with a tool result, nor a tool call whose
    results were cut. With no user message among them, the latest one before them leads what is left."""
    tail = messages[max(0, len(messages) - limit):] if limit > 0 else []
    start = next((i for i, m in enumerate(tail) if m.get("role") == "user"), None)
    if start is not None:
        return tail[start:]
    asked = next((m for m in reversed(messages[:len(messages) - len(tail)]) if m.get("role") == "user"), None)
    start = next((i for i, m in enumerate(tail) if m.get("role") != "tool"), len(tail))
    return [asked, *tail[start:]] if asked else []


def _start_result(run: dict) -> str:
    return json.dumps({"run_id": run["run_id"], "run_page_url": run["run_page_url"], "status": "started"})


def _news_messages(reports: list) -> list[dict]:
    """Runs that ended unasked, as one assistant message polling them and the poll results, marked "unasked"."""
    if not reports:
        return []
    calls = [{"id": f"unasked_{r['run_id']}", "type": "function", "function": {
        "name": "poll_databricks_job", "arguments": json.dumps({"run_id": r["run_id"]})}} for r in reports]
    return [{"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": f"unasked_{r['run_id']}",
               "content": json.dumps({**r, "unasked": True}, ensure_ascii=False)} for r in reports)]


def _started_reply(started: list) -> str:
    named = ", ".join(f"run {r['run_id']}" + (f" ({r['run_page_url']})" if r["run_page_url"] else "")
                      for r in started)
    return (f"I've started a job to answer this: {named}. It works in the background, so you can go on "
            f"chatting: once it has ended, my next reply brings you its outcome, whatever you write. To see how it "
            f"is going meanwhile, ask me about run {started[-1]['run_id']}.")


if __name__ == "__main__":
    import terminal

    sys.exit(terminal.main())
