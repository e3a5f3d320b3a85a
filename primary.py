"""The primary agent users talk to: small talk answered directly, data questions delegated to a Databricks Job.

`PrimaryAgent(chat, workspace, db, job_id).predict(request)` takes and returns MLflow ResponsesAgent shapes as
plain dicts (serving.py wraps it for Model Serving). A turn is one bounded tool loop over the thread's recent
messages with three tools built for that thread: start_databricks_job (ends the turn with the run id),
poll_databricks_job (run state + the worker's steps and answer from task_logs) and terminate_databricks_job.
The turn is stored in one append at its end; nothing of a failed turn is stored.

`python primary.py` is a terminal chat on a workspace, or on the local stand-in workspace (see --help): it lives
in terminal.py. The request and response shapes are in agent_io.py.
"""
import hashlib
import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import psycopg_pool

import lakebase
import llm
from agent_io import BadRequest, Turn, output_items, parse_request, stream_events

log = logging.getLogger("primary")

MAX_REQUEST_CHARS = 20_000  # a job's request: worker.py refuses longer ones
DEFAULT_WINDOW = 40  # stored messages sent to the model as context
DEFAULT_MAX_CALLS = 6  # model calls per turn
DEFAULT_ENDPOINT = llm.DEFAULT_ENDPOINT
RECENT_STEPS = 5  # steps of a run shown by poll
MAX_STARTS = 3  # job runs one turn may start: a runaway model can't flood the job queue
MAX_ANSWER_CHARS = 8_000  # a worker answer longer than this is cut to a head and a tail for the model
FINISHED = {"TERMINATED", "SKIPPED", "INTERNAL_ERROR"}  # life cycle states of a run that has ended
SYSTEM_PROMPT = """You are the assistant people chat with about their company's data.
Answer greetings, small talk and questions about this conversation yourself, briefly.
For a question that needs data (numbers, tables, trends), call start_databricks_job with the request restated \
completely: the job's worker does not see this conversation. The job runs in the background.
When the user asks how a job is doing or for its answer, call poll_databricks_job with its run id and give them \
the answer, or its state and progress, in plain words. To stop a job, call terminate_databricks_job.
Never invent numbers. When a tool returns an error, say what went wrong and what to do about it."""
PERMISSION_FIX = ("the identity the agent runs as needs CAN_MANAGE_RUN on the job; on Model Serving that is the "
                  "service principal of DATABRICKS_CLIENT_ID (python primary.py deploy --secret-scope): Model "
                  "Serving's automatic credentials and on-behalf-of-user tokens do not cover Jobs")
RUN_SCHEMA = {"type": "object", "required": ["run_id"], "properties": {"run_id": {
    "type": "string", "description": "the run id that start_databricks_job returned, e.g. \"123\""}}}
START_SCHEMA = {"type": "object", "required": ["request"], "properties": {"request": {
    "type": "string", "description": "the user's data question, restated so that it stands on its own"}}}




class TurnFailed(RuntimeError):
    """The chat model or the database failed: nothing of the turn was stored; the message says what to check."""


@dataclass
class AgentConfig:
    """The agent's settings, read from the environment once (the terminal and serving add their own)."""
    job_id: str = ""  # DATABRICKS_JOB_ID: the worker job
    chat: llm.ChatConfig = field(default_factory=llm.ChatConfig)  # LLM_ENDPOINT_NAME, LLM_BASE_URL, ...
    database: lakebase.LakebaseConfig = field(default_factory=lakebase.LakebaseConfig)  # LAKEBASE_*, PG*
    jobs_retry_seconds: int = 60  # the SDK's retry budget: a throttled Jobs API fails one tool call, not the turn

    @classmethod
    def from_env(cls, env=os.environ):
        return cls(job_id=env.get("DATABRICKS_JOB_ID", "").strip(), chat=llm.ChatConfig.from_env(env),
                   database=lakebase.LakebaseConfig.from_env(env))

    def problems(self, env=os.environ) -> list[str]:
        """What is missing or wrong for an agent on a workspace, one phrase each."""
        db = self.database
        database = db.dsn or db.instance or db.endpoint or any(env.get(v) for v in lakebase.PG_VARS)
        return [problem for problem, bad in (
            ("DATABRICKS_JOB_ID (the worker job's id) is not set", not self.job_id),
            (f"DATABRICKS_JOB_ID must be a job id (a number), not {self.job_id!r}",
             self.job_id and not self.job_id.isdigit()),
            ("no database is set: set LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT (or LAKEBASE_DSN)", not database)) if bad]


def _window(messages: list) -> list:
    """Start the context at a user message: never with a tool result, nor a tool call whose results were cut."""
    start = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))
    return messages[start:]


class PrimaryAgent:
    """The agent. `chat`: llm.ChatClient; `workspace`: databricks.sdk.WorkspaceClient; `db`: a
    psycopg_pool.ConnectionPool (lakebase.open_pool, migrated); `job_id`: the worker job. Thread-safe."""

    def __init__(self, chat, workspace, db, job_id, *, window=DEFAULT_WINDOW, max_calls=DEFAULT_MAX_CALLS,
                 system_prompt=SYSTEM_PROMPT, jobs_auth_hint=PERMISSION_FIX):
        self.chat, self.workspace, self.db, self.job_id = chat, workspace, db, int(job_id)
        self.window, self.max_calls, self.system_prompt = window, max_calls, system_prompt
        self.jobs_auth_hint = jobs_auth_hint  # what to fix when the Jobs API refuses this agent's identity

    def predict(self, request: dict) -> dict:
        """One turn: {"output": [items], "custom_outputs": {"thread_id", "turn", "run_ids"}}."""
        output = []
        final, custom = self._turn(request, output.append)
        return {"output": [*output, final], "custom_outputs": custom}

    def predict_stream(self, request: dict) -> Iterator[dict]:
        """One turn as ResponsesAgent stream events, as they happen; the last one carries custom_outputs."""
        events = queue.Queue()

        def work():
            try:
                final, custom = self._turn(request, lambda item: [events.put(e) for e in stream_events(item)])
                for event in stream_events(final, custom):
                    events.put(event)
            except BaseException as e:  # handed to the consumer, which raises it
                events.put(e)
            events.put(None)

        threading.Thread(target=work, name="primary-turn", daemon=True).start()
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event

    # ---------------------------------------------------------------- the turn

    def _turn(self, request, emit) -> tuple[dict, dict]:
        """Check the request, run the loop (emit(item) for each tool call and result), store the turn."""
        turn, started = parse_request(request), []
        try:
            with self.db.connection() as conn:
                owner = lakebase.thread_owner(conn, turn.thread_id)
                if owner is not lakebase.NO_THREAD and owner != turn.user_id:
                    raise PermissionError(f"thread {turn.thread_id} belongs to someone else")
                number = lakebase.thread_turns(conn, turn.thread_id) + 1
                history = lakebase.load_messages(conn, turn.thread_id, last=self.window)
            seed = turn.history if number == 1 else []
            messages = [{"role": "system", "content": self.system_prompt},
                        *_window((history + seed)[-self.window:]), {"role": "user", "content": turn.text}]
            first = len(messages) - 1
            final = self._loop(messages, self._tools(turn, number, started), started, emit)
            with self.db.connection() as conn:
                number = lakebase.append_turn(conn, turn.thread_id, seed + messages[first:], owner=turn.user_id)
        except PermissionError as e:
            raise BadRequest(f"{e}: start a new thread (no thread_id) or use one of yours") from None
        except psycopg_pool.PoolTimeout as e:  # before psycopg.Error, its base class
            why = getattr(self.db, "last_error", None)
            problem = (f"new database connections fail: {why}" if why else
                       f"all {self.db.max_size} database connections of this process stayed busy for "
                       f"{self.db.timeout:g} s")
            fix = ("Check that Postgres (Lakebase) is up and reachable and that its credentials are valid, then send "
                   "the message again") if why else "Send the message again in a moment"
            raise TurnFailed(f"the database failed and nothing was stored: {problem}. {fix}") from e
        except llm.LLMError as e:
            raise TurnFailed(f"the chat model failed and nothing was stored: {e}. Check that the model "
                             f"endpoint is up and reachable, then send the message again") from e
        except (psycopg.Error, lakebase.LakebaseError) as e:
            raise TurnFailed(f"the database failed and nothing was stored: {lakebase.redact(str(e))}. Check that "
                             f"Postgres (Lakebase) is up and reachable, then send the message again") from e
        custom = {"thread_id": turn.thread_id, "turn": number, "run_ids": [run["run_id"] for run in started]}
        return output_items(final, final=True)[0], custom

    def _loop(self, messages, tools, started, emit) -> dict:
        """The bounded tool loop; a job start or the bound ends it with our own final message."""
        def on_message(message, info):
            if message["role"] == "tool" or message.get("tool_calls"):
                for item in output_items(message):
                    emit(item)

        try:
            llm.run_tools(self.chat, messages, tools, max_calls=self.max_calls, on_message=on_message,
                          fatal=(psycopg.Error, lakebase.LakebaseError, PermissionError))
        except llm.EndTurn:
            messages.append({"role": "assistant", "content": _started_reply(started)})
        except llm.LimitReached:
            messages.append({"role": "assistant", "content": f"I could not finish this within {self.max_calls} "
                             f"steps. Please ask again, perhaps more narrowly."})
        return messages[-1]

    # ---------------------------------------------------------------- tools

    def _tools(self, turn: Turn, number: int, started: list) -> list:
        def start_databricks_job(request):
            return self._start(turn, number, started, request)

        def poll_databricks_job(run_id):
            return self._poll(turn, run_id)

        def terminate_databricks_job(run_id):
            return self._terminate(turn, run_id)

        return [
            llm.Tool("start_databricks_job", "Start a background job that answers a data question with the "
                     "company's data. Use it for any question that needs numbers or tables. The turn ends once "
                     "it has started; the user gets the run id.", START_SCHEMA, start_databricks_job),
            llm.Tool("poll_databricks_job", "Get a job run's state, its progress (steps so far, the latest "
                     "ones) and, once it has finished, its answer or error.", RUN_SCHEMA, poll_databricks_job),
            llm.Tool("terminate_databricks_job", "Cancel a job run that is still queued or running.", RUN_SCHEMA,
                     terminate_databricks_job)]

    def _start(self, turn, number, started, request) -> str:
        if not isinstance(request, str) or not request.strip():
            raise llm.ToolError("request must be the user's data question, as a non-empty string")
        if len(started) >= MAX_STARTS:
            raise llm.ToolError(f"this turn has already started {MAX_STARTS} jobs, the most one turn may start: "
                                f"combine the questions into one request, or ask for the rest in the next turn")
        request = lakebase.UNSTORABLE.sub("\ufffd", request.strip())  # a job parameter, an argv entry, a hash
        if len(request) > MAX_REQUEST_CHARS:
            raise llm.ToolError(f"the request has {len(request):,} characters; a job takes at most "
                                f"{MAX_REQUEST_CHARS:,}: restate it more briefly")
        # The same key for a retry of this request, so it never starts a second run (the Jobs API's
        # idempotency token covers a crash between run_now and record_run).
        basis = ([turn.thread_id, f"request {turn.request_id}", str(len(started))] if turn.request_id
                 else [turn.thread_id, f"turn {number}", request])
        key = hashlib.sha256("\x00".join(basis).encode()).hexdigest()
        with self.db.connection() as conn:
            known = lakebase.find_run(conn, turn.thread_id, idempotency_key=key)
        if known:
            run_id = known["run_id"]
        else:
            wait = self._jobs(f"starting job {self.job_id}", f"job {self.job_id} does not exist: check "
                              f"DATABRICKS_JOB_ID", self.workspace.jobs.run_now, self.job_id,
                              job_parameters={"request": request, "thread_id": turn.thread_id}, idempotency_token=key)
            with self.db.connection() as conn:  # the run holding the key: this one, as run_now got the same token
                run_id = lakebase.record_run(conn, turn.thread_id, str(wait.run_id), key, request,
                                             owner=turn.user_id)["run_id"]
        run = next((run for run in started if run["run_id"] == run_id), None)  # a call repeated in one message
        if run is None:
            run = {"run_id": run_id, "run_page_url": self._run_url(run_id)}
            started.append(run)
        raise llm.EndTurn(json.dumps({**run, "status": "started"}))

    def _poll(self, turn, run_id) -> str:
        run_id = self.own_run(turn.thread_id, run_id)
        run = self.get_run(run_id)
        with self.db.connection() as conn:
            progress = lakebase.run_progress(conn, run_id, recent=RECENT_STEPS)
        report = {"run_id": run_id, "state": run_state(run), "state_message": run.state.state_message or None,
                  "run_page_url": run.run_page_url, "steps": progress["steps"],
                  "recent_steps": [describe_step(step) for step in progress["recent"]]}
        final = progress["final"] or {"status": None, "payload": {}}
        payload = final["payload"]
        if final["status"] == "completed":
            report["answer"] = _cut(str(payload.get("answer")), MAX_ANSWER_CHARS)
        elif final["status"] == "failed":
            report["error"] = payload.get("error")
        elif final["status"] == "cancelled":
            report["cancelled"] = payload.get("reason") or "cancelled"
        return json.dumps({k: v for k, v in report.items() if v is not None}, ensure_ascii=False)

    def _terminate(self, turn, run_id) -> str:
        run_id = self.own_run(turn.thread_id, run_id)
        run = self.get_run(run_id)
        state = run_state(run)
        if state.split()[0] in FINISHED:
            how = f": {run.state.state_message}" if run.state.state_message else ""
            raise llm.ToolError(f"run {run_id} has already finished ({state}{how}); there is nothing to cancel")
        if state != "TERMINATING":
            self._jobs(f"cancelling run {run_id}", f"run {run_id} no longer exists", self.workspace.jobs.cancel_run,
                       int(run_id))  # not waited on: the worker stops within seconds
        return json.dumps({"run_id": run_id, "state": "TERMINATING", "was": state,
                           "note": "cancellation requested; the run stops within seconds"})

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

    def get_run(self, run_id):
        """The run from the Jobs API (a ToolError saying what to do if that fails)."""
        return self._jobs(f"reading run {run_id}", f"run {run_id} no longer exists in the workspace",
                          self.workspace.jobs.get_run, int(run_id))

    def _run_url(self, run_id) -> str | None:
        from databricks.sdk.errors import DatabricksError

        try:
            return self.workspace.jobs.get_run(int(run_id)).run_page_url
        except (DatabricksError, TimeoutError) as e:  # the run started; only its link is missing
            log.warning("no run page URL for run %s: %s", run_id, e)
            return None

    def _jobs(self, what, missing, fn, *args, **kwargs):
        """Call the Jobs API; failures the user must act on become ToolErrors saying what to do."""
        from databricks.sdk.errors import BadRequest as InvalidRequest
        from databricks.sdk.errors import NotFound, PermissionDenied, TooManyRequests, Unauthenticated

        try:
            return fn(*args, **kwargs)
        except TimeoutError as e:  # the SDK's retries ran out (429, 503, no connection)
            if isinstance(e.__cause__, TooManyRequests):
                raise llm.ToolError(f"{what}: too many job runs at the moment; try again in a few minutes") from e
            raise llm.ToolError(f"{what}: the Jobs API did not answer in time ({e}); try again later") from e
        except (PermissionDenied, Unauthenticated) as e:
            refused = "permission denied" if isinstance(e, PermissionDenied) else "not authenticated"
            reason = str(e).split(". Config: ")[0]  # the SDK appends its config to 401/403 messages
            raise llm.ToolError(f"{what}: {refused} ({reason}): {self.jobs_auth_hint}") from e
        except TooManyRequests as e:
            raise llm.ToolError(f"{what}: too many job runs at the moment ({e}); try again in a few minutes") from e
        except (NotFound, InvalidRequest) as e:
            if isinstance(e, NotFound) or "does not exist" in str(e):
                raise llm.ToolError(f"{what}: {missing} ({e})") from e
            raise


def run_state(run) -> str:
    """"RUNNING", "TERMINATED SUCCESS", ...: the life cycle state, and the result state once there is one."""
    state = run.state
    life = state.life_cycle_state.value if state and state.life_cycle_state else "UNKNOWN"
    return f"{life} {state.result_state.value}" if state and state.result_state else life


def describe_step(step: dict) -> str:
    """One task_logs step as one readable line."""
    status, p = step["status"], step["payload"]
    if status == "tool_call":
        arguments = p.get("arguments")
        text = f"calls {p.get('name')} {arguments if isinstance(arguments, str) else json.dumps(arguments)}"
    elif status == "tool_result":
        outcome = "failed" if p.get("error") else "answered"
        text = f"{p.get('name')} {outcome} in {(p.get('duration_ms') or 0) / 1000:.1f} s: {p.get('output')}"
    else:
        text = {"started": f"started: {p.get('request')}", "completed": f"answer: {p.get('answer')}",
                "failed": f"failed: {p.get('error')}", "cancelled": f"cancelled: {p.get('reason')}"}.get(status, status)
    return f"#{step['step']} {one_line(text, 160)}"


def one_line(text, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half:,} characters left out ...]\n{text[-half:]}"


def _started_reply(started: list) -> str:
    runs = ", ".join(f"run {r['run_id']}" + (f" ({r['run_page_url']})" if r["run_page_url"] else "") for r in started)
    return (f"I've started a job to answer this: {runs}. It usually takes a minute or two; ask me about "
            f"run {started[-1]['run_id']} to see how it is going and to get the answer.")


if __name__ == "__main__":
    import terminal

    sys.exit(terminal.main())
