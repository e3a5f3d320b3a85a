"""The worker's `query_genie` tool: natural-language questions to a Genie space (Genie Conversation API).

One `Genie` per worker run keeps the conversation, so a follow-up ("and by month?") is asked in the same
conversation. Each question: start the conversation or add a message, poll the message with backoff until a final
status, then read the answer Genie settled on. Genie self-corrects: a completed message may hold several query
attachments, and the last one is the answer (the earlier ones are kept for the step log only). A text attachment
is the answer or, by its `purpose`, a question Genie asks back; with no text, the query's description is the only
explanation. The rows come from the attachment query-result call, polled while the statement is PENDING or
RUNNING and re-executed when the result has expired (CLOSED, or the message QUERY_RESULT_EXPIRED). Every poll,
of the message and of its result, stays within the question's deadline. We poll ourselves rather than use the
SDK's waiter, which keeps polling CANCELLED and QUERY_RESULT_EXPIRED messages until its 20-minute timeout.

The model sees Genie's answer, the SQL it ran and the rows as a compact table cut to a head and a tail within a
character budget. The tool returns an `llm.ToolResult` (or raises a `ToolError`) whose detail, `Answer.as_dict()`,
is what the step log keeps: the ids, the status, superseded attempts, and the rows up to LOG_ROWS and LOG_CHARS
with a note of what was left out. Only that much of a result is held once it has been read. Rate limits (about 5
questions a minute) are retried by the SDK itself, honouring Retry-After, for its `retry_timeout_seconds`; past
that, or when the API fails while we wait, the model is told what happened.
"""
import json
import logging
import time
from dataclasses import dataclass, field

from llm import Tool, ToolError, ToolResult

log = logging.getLogger(__name__)

DEFAULT_DESCRIPTION = (
    "Ask a natural-language question about the data in the Genie space and get back Genie's answer, "
    "the SQL it ran and the result rows. Ask one precise question per call; a follow-up question is "
    "asked in the same conversation, so 'and by month?' refers to the previous question."
)
IN_PROGRESS = {"SUBMITTED", "FETCHING_METADATA", "FILTERING_CONTEXT", "ASKING_AI", "PENDING_WAREHOUSE",
               "EXECUTING_QUERY"}
MAX_QUESTION_CHARS = 4000
MAX_RERUNS = 2  # re-executions of a result that expired (again) before we read it
LOG_ROWS = 1000  # the step log keeps at most this many rows of a result...
LOG_CHARS = 200_000  # ...and at most this many characters of them as JSON (ASCII, so bytes too)


class GenieUnavailable(Exception):
    """Genie can't be used at all (space missing, no permission): not something the model can fix."""


@dataclass
class GenieConfig:
    space_id: str
    description: str = DEFAULT_DESCRIPTION  # GENIE_DESCRIPTION, the tool description the model sees
    poll_first: float = 1.0  # seconds before the first status poll; grows x1.5 per poll
    poll_max: float = 5.0  # longest wait between polls
    timeout: float = 600.0  # give up on a sent question (its message and its result) after this many seconds
    max_chars: int = 6000  # budget for the table the model sees


@dataclass
class Answer:
    """One question's outcome; `as_dict()` is what the step log keeps."""
    question: str
    conversation_id: str = ""
    message_id: str = ""
    status: str = "NOT_SENT"  # the message's last status
    text: str = ""  # Genie's answer (its text attachments but the questions it asks back)
    asks_back: str = ""  # a clarifying question Genie asks back (text purpose FOLLOW_UP_QUESTION)
    suggested: list = field(default_factory=list)  # follow-up questions Genie suggests
    query: str = ""  # the SQL of the last query attachment: the one Genie settled on
    description: str = ""  # that query's description (the only explanation when there is no text)
    attempts: list = field(default_factory=list)  # superseded query attachments, when Genie self-corrected
    result_state: str = ""  # the query result's statement state
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # the first rows, within LOG_ROWS and LOG_CHARS
    row_count: int = 0
    rows_left_out: int = 0  # rows of the result the step log does not keep
    error: str = ""  # why the question failed (the model saw "Error: <error>")
    table: str = field(default="", repr=False)  # the rows as the model sees them (the step log has them as output)

    def as_dict(self):
        detail = {k: v for k, v in self.__dict__.items() if k != "table"}
        if self.rows_left_out:
            detail["note"] = (f"the step log keeps {len(self.rows):,} of the {self.row_count:,} rows (at most "
                              f"{LOG_ROWS:,} rows and {LOG_CHARS:,} characters)")
        return detail


class Genie:
    def __init__(self, workspace, config: GenieConfig, *, sleep=time.sleep, clock=time.monotonic):
        self.w = workspace
        self.config = config
        self.sleep, self.clock = sleep, clock
        self.conversation_id = None

    def tool(self) -> Tool:
        return Tool(
            name="query_genie",
            description=self.config.description,
            parameters={
                "type": "object",
                "properties": {"question": {"type": "string", "description": "One question, in plain words."}},
                "required": ["question"],
            },
            fn=self.query_genie,
        )

    def query_genie(self, question: str) -> ToolResult:
        if not isinstance(question, str):
            raise ToolError(f"the question must be a string, not {type(question).__name__}.")
        question = question.strip()
        if not question:
            raise ToolError("the question is empty; ask a question in plain words.")
        if len(question) > MAX_QUESTION_CHARS:
            raise ToolError(f"the question is {len(question)} characters; keep it under {MAX_QUESTION_CHARS}.")
        answer = Answer(question)
        try:
            self.ask(answer)
        except ToolError as e:  # the step log keeps how far the question got
            answer.error = str(e)
            e.detail = answer.as_dict()
            raise
        return ToolResult(render(answer), answer.as_dict())

    def ask(self, answer: Answer) -> Answer:
        answer.conversation_id, answer.message_id = self._send(answer.question)  # bounded by the SDK's retries
        answer.status = "SUBMITTED"
        deadline = self.clock() + self.config.timeout
        message = self._wait(answer, deadline)
        attachment_id = read_attachments(answer, message.attachments or [])
        if attachment_id:
            self._keep_rows(answer, self._result(answer, attachment_id, deadline))
        elif not (answer.text or answer.asks_back or answer.query):
            raise ToolError("Genie completed without an answer (no text and no query); rephrase the question.")
        return answer

    def _send(self, question):
        """Start the conversation, or add the question to it: (conversation id, message id)."""
        if self.conversation_id is None:
            waiter = self._call("we sent the question", self.w.genie.start_conversation, question, sending=True)
            self.conversation_id = waiter.conversation_id
        else:
            waiter = self._call("we sent the question", self.w.genie.create_message, self.conversation_id, question,
                                sending=True)
        return waiter.conversation_id, waiter.message_id

    def _call(self, doing, method, *args, sending=False):
        """One Genie API call: no access to the space (or, `sending` a question, no such space) is GenieUnavailable;
        anything else that fails is a ToolError, the model's to explain."""
        from databricks.sdk.errors import (
            BadRequest,
            DatabricksError,
            NotFound,
            PermissionDenied,
            TooManyRequests,
            Unauthenticated,
        )

        unavailable = (PermissionDenied, Unauthenticated, *((NotFound,) if sending else ()))
        try:
            return method(self.config.space_id, *args)
        except unavailable as e:
            raise GenieUnavailable(f"Genie space {self.config.space_id!r} can't be used: {e}") from e
        except TimeoutError as e:  # the SDK retried 429s, 503s and connection errors for its whole budget
            if isinstance(e.__cause__, TooManyRequests):
                raise ToolError(f"Genie is rate limited (about 5 questions a minute per workspace) and still "
                                f"refused after retrying ({e}) while {doing}: {e.__cause__}. Wait a minute before "
                                f"asking again.") from e
            raise ToolError(f"Genie did not respond while {doing} ({e}): {e.__cause__}. Ask again later.") from e
        except BadRequest as e:
            raise ToolError(f"Genie refused the question: {e}. Rephrase it, or answer without it.") from e
        except DatabricksError as e:  # e.g. a 500, which the SDK does not retry
            raise ToolError(f"Genie failed while {doing}: {e.error_code or type(e).__name__}: {e}. Ask the "
                            f"question again, or answer without it.") from e

    def _polls(self, deadline):
        """Yields True before each poll, after a wait growing from poll_first to poll_max; stops at the deadline."""
        delay = self.config.poll_first
        while self.clock() < deadline:
            self.sleep(min(delay, max(0.0, deadline - self.clock())))
            yield True
            delay = min(delay * 1.5, self.config.poll_max)

    def _wait(self, answer: Answer, deadline: float):
        """Poll the message until a final status; raise ToolError for FAILED, CANCELLED and the deadline."""
        unknown_logged = False
        for _ in self._polls(deadline):
            message = self._call("we waited for its answer", self.w.genie.get_message, answer.conversation_id,
                                 answer.message_id)
            answer.status = message.status.value if message.status else "UNKNOWN"
            if answer.status in ("COMPLETED", "QUERY_RESULT_EXPIRED"):
                return message
            if answer.status == "FAILED":
                error = message.error.error if message.error and message.error.error else "no reason given"
                raise ToolError(f"Genie could not answer: {error}. Rephrase the question or ask something simpler.")
            if answer.status == "CANCELLED":
                raise ToolError("the Genie question was cancelled before it finished; ask it again if still needed.")
            if answer.status not in IN_PROGRESS and not unknown_logged:  # a status newer than this SDK
                log.warning("Genie message %s has a status this client does not know; polling on for at most "
                            "%.0f s more", answer.message_id, max(0.0, deadline - self.clock()))
                unknown_logged = True
        raise ToolError(f"Genie did not answer within {self.config.timeout:g} s (last status {answer.status}); "
                        f"try a simpler question.")

    def _result(self, answer: Answer, attachment_id: str, deadline: float):
        """The query result's statement once SUCCEEDED: polled while PENDING or RUNNING, re-executed when expired."""
        ids = (answer.conversation_id, answer.message_id, attachment_id)
        get, execute = self.w.genie.get_message_attachment_query_result, self.w.genie.execute_message_attachment_query
        reruns, polls = 0, self._polls(deadline)
        response = None if answer.status == "QUERY_RESULT_EXPIRED" else self._call("reading its result", get, *ids)
        while True:
            statement = response.statement_response if response else None
            state = _state(statement) if response else "CLOSED"
            answer.result_state = state
            if state == "SUCCEEDED":
                return statement
            if state == "CLOSED" and reruns < MAX_RERUNS:  # the result expired: run the query again
                log.info("query result of message %s expired; re-executing", answer.message_id)
                reruns, polls = reruns + 1, self._polls(deadline)  # the new run's waits start short again
                response = self._call("re-running its query", execute, *ids)
                continue
            if state in ("FAILED", "CANCELED", "CLOSED"):
                error = statement.status.error if statement and statement.status else None
                why = f": {error.message}" if error and error.message else ""
                raise ToolError(f"Genie's query did not succeed (state {state}{why}). Rephrase the question or "
                                f"ask something simpler.")
            if not next(polls, False):  # PENDING or RUNNING (the warehouse is starting), or a newer state
                raise ToolError(f"Genie's query result was not ready within {self.config.timeout:g} s (state "
                                f"{state}); ask again later.")
            response = self._call("we waited for its result", get, *ids)

    def _keep_rows(self, answer: Answer, statement):
        """The table the model sees, and the rows the step log keeps; nothing more of the result is held."""
        manifest = statement.manifest
        columns = manifest.schema.columns if manifest and manifest.schema and manifest.schema.columns else []
        rows = statement.result.data_array if statement.result and statement.result.data_array else []
        answer.columns = [c.name for c in columns]
        answer.row_count = (manifest.total_row_count if manifest else None) or len(rows)
        answer.table = table(answer.columns, rows, self.config.max_chars)
        answer.rows = _log_rows(rows)
        answer.rows_left_out = answer.row_count - len(answer.rows)


def _state(statement) -> str:
    state = statement.status.state if statement and statement.status else None
    return state.value if state else "UNKNOWN"


def read_attachments(answer: Answer, attachments) -> str | None:
    """Fill in what Genie settled on from a completed message's attachments; returns the attachment id of its
    query (the last query attachment), if any. Text between the first and the last query explains a superseded
    attempt, as in Databricks' own client (databricks-ai-bridge)."""
    queries = [i for i, a in enumerate(attachments) if a.query]
    texts, questions = [], []
    for i, a in enumerate(attachments):
        if a.query and i != queries[-1]:
            answer.attempts.append({"attachment_id": a.attachment_id, "query": a.query.query or "",
                                    "description": a.query.description or "", "text": ""})
        elif a.text and a.text.content:
            if queries and queries[0] < i < queries[-1]:
                answer.attempts[-1]["text"] = "\n\n".join(filter(None, [answer.attempts[-1]["text"], a.text.content]))
            elif a.text.purpose and a.text.purpose.value == "FOLLOW_UP_QUESTION":
                questions.append(a.text.content)
            else:  # the answer or its summary (or a text of no stated purpose)
                texts.append(a.text.content)
        elif a.suggested_questions and a.suggested_questions.questions:
            answer.suggested = list(a.suggested_questions.questions)
    answer.text, answer.asks_back = "\n\n".join(texts), "\n\n".join(questions)
    if not queries:
        return None
    last = attachments[queries[-1]]
    answer.query, answer.description = last.query.query or "", last.query.description or ""
    return last.attachment_id


def render(answer: Answer) -> str:
    """The tool output the model sees: Genie's answer or its question back, the SQL, the rows, its suggestions."""
    parts = []
    if answer.text or answer.description or not answer.asks_back:
        parts.append(f"Genie: {answer.text or answer.description or 'no explanation, only the query below.'}")
    if answer.asks_back:
        parts.append(f"Genie asks back: {answer.asks_back}\n(Ask again with what it needs, or say in your answer "
                     f"what is missing.)")
    if answer.query:
        parts.append(f"SQL:\n{answer.query}")
    if answer.columns:
        parts.append(f"Rows ({answer.row_count} in all):\n{answer.table}")
    if answer.suggested:
        parts.append("Genie suggests asking next: " + " | ".join(answer.suggested))
    return "\n\n".join(parts)


def table(columns, rows, max_chars) -> str:
    """The rows as text lines within max_chars: whole, or a head and a tail with a note of what was left out.
    Every row's line is measured (the note counts the characters left out), but only the rows shown are kept,
    so a large result is not copied."""
    def line(values):
        return " | ".join("" if v is None else " ".join(str(v).splitlines()) for v in values)
    header = line(columns)
    budget = max_chars - len(header)  # each row costs its length + 1 for the line break before it
    total = sum(len(line(r)) + 1 for r in rows)
    if total <= budget:
        return "\n".join([header, *map(line, rows)])
    head, tail, used = [], [], 0
    budget -= 80  # room for the note
    for i in range(len(rows)):  # alternate head and tail until the budget is spent
        take = line(rows[i // 2] if i % 2 == 0 else rows[-1 - i // 2])
        if used + len(take) + 1 > budget:
            break
        (head if i % 2 == 0 else tail).append(take)
        used += len(take) + 1
    note = f"... {len(rows) - len(head) - len(tail)} rows ({total - used} characters) left out ..."
    return "\n".join([header, *head, note, *reversed(tail)])


def _log_rows(rows) -> list:
    """The first rows, at most LOG_ROWS of them and LOG_CHARS characters as JSON."""
    kept, size = [], 0
    for row in rows[:LOG_ROWS]:
        size += len(json.dumps(row)) + 1
        if size > LOG_CHARS:
            break
        kept.append(row)
    return kept
