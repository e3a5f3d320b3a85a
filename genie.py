"""The worker's `query_genie` tool: natural-language questions to a Genie space (Genie Conversation API).

One `Genie` per worker run keeps the conversation, so a follow-up ("and by month?") is asked in the same
conversation. Each question: start the conversation or add a message, poll the message with backoff
until a final status, then fetch the SQL result with the attachment query-result call, re-executing
the query when its result has expired. We poll ourselves rather than use the SDK's waiter, which keeps
polling CANCELLED and QUERY_RESULT_EXPIRED messages until its 20-minute timeout.

The model sees Genie's text answer, the SQL it ran and the rows as a compact table cut to a head and a
tail within a character budget; the full result (or how far a failed question got) is kept on `Genie.last`
for the step log. Rate limits (about 5 questions a minute) are retried by the SDK itself, honouring
Retry-After, for its `retry_timeout_seconds`; past that the model is told to wait.
"""
import logging
import time
from dataclasses import dataclass, field

from llm import Tool, ToolError

log = logging.getLogger(__name__)

DEFAULT_DESCRIPTION = (
    "Ask a natural-language question about the data in the Genie space and get back Genie's answer, "
    "the SQL it ran and the result rows. Ask one precise question per call; a follow-up question is "
    "asked in the same conversation, so 'and by month?' refers to the previous question."
)
IN_PROGRESS = {"SUBMITTED", "FETCHING_METADATA", "FILTERING_CONTEXT", "ASKING_AI", "PENDING_WAREHOUSE",
               "EXECUTING_QUERY"}
MAX_QUESTION_CHARS = 4000


class GenieUnavailable(Exception):
    """Genie can't be used at all (space missing, no permission): not something the model can fix."""


@dataclass
class GenieConfig:
    space_id: str
    description: str = DEFAULT_DESCRIPTION  # GENIE_DESCRIPTION, the tool description the model sees
    poll_first: float = 1.0  # seconds before the first status poll; grows x1.5 per poll
    poll_max: float = 5.0  # longest wait between polls
    timeout: float = 600.0  # give up on one question after this many seconds
    max_chars: int = 6000  # budget for the table the model sees


@dataclass
class Answer:
    """One question's full outcome, as the step log keeps it."""
    question: str
    conversation_id: str
    message_id: str
    status: str
    text: str = ""
    query: str = ""
    columns: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    row_count: int = 0
    error: str = ""  # why the question failed (the model saw "Error: <error>")

    def as_dict(self):
        return dict(self.__dict__)


class Genie:
    def __init__(self, workspace, config: GenieConfig, *, sleep=time.sleep, clock=time.monotonic):
        self.w = workspace
        self.config = config
        self.sleep, self.clock = sleep, clock
        self.conversation_id = None
        self.last: Answer | None = None

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

    def query_genie(self, question: str) -> str:
        if not isinstance(question, str):
            raise ToolError(f"the question must be a string, not {type(question).__name__}.")
        question = question.strip()
        if not question:
            raise ToolError("the question is empty; ask a question in plain words.")
        if len(question) > MAX_QUESTION_CHARS:
            raise ToolError(f"the question is {len(question)} characters; keep it under {MAX_QUESTION_CHARS}.")
        self.last = answer = Answer(question, "", "", "NOT_SENT")
        try:
            self.ask(answer)
        except ToolError as e:  # the step log keeps how far the question got
            answer.error = str(e)
            raise
        return render(answer, self.config.max_chars)

    def ask(self, answer: Answer) -> Answer:
        answer.conversation_id, answer.message_id = self._send(answer.question)
        answer.status = "SUBMITTED"
        message = self._wait(answer)
        answer.text = "\n".join(a.text.content for a in message.attachments or [] if a.text and a.text.content)
        query = next((a for a in message.attachments or [] if a.query), None)
        if query is not None:
            answer.query = query.query.query or ""
            self._fetch_rows(answer, query.attachment_id, expired=answer.status == "QUERY_RESULT_EXPIRED")
        return answer

    def _send(self, question):
        from databricks.sdk.errors import DatabricksError, NotFound, PermissionDenied, TooManyRequests, Unauthenticated

        space = self.config.space_id
        try:
            if self.conversation_id is None:
                waiter = self.w.genie.start_conversation(space, question)
                self.conversation_id = waiter.conversation_id
            else:
                waiter = self.w.genie.create_message(space, self.conversation_id, question)
        except (NotFound, PermissionDenied, Unauthenticated) as e:
            raise GenieUnavailable(f"Genie space {space!r} can't be used: {e}") from e
        except TimeoutError as e:  # the SDK retried 429s, 503s and connection errors for its whole budget
            if isinstance(e.__cause__, TooManyRequests):
                raise ToolError(f"Genie is rate limited (about 5 questions a minute per workspace) and still "
                                f"refused after retrying ({e}): {e.__cause__}. Wait a minute before asking "
                                f"again.") from e
            raise ToolError(f"Genie did not respond ({e}): {e.__cause__}. Try again later.") from e
        except DatabricksError as e:
            raise ToolError(f"Genie refused the question: {e}") from e
        return waiter.conversation_id, waiter.message_id

    def _wait(self, answer: Answer):
        """Poll the message until a final status; raise ToolError for FAILED, CANCELLED and the timeout."""
        deadline = self.clock() + self.config.timeout
        delay = self.config.poll_first
        while True:
            self.sleep(min(delay, max(0.0, deadline - self.clock())))
            message = self.w.genie.get_message(self.config.space_id, answer.conversation_id, answer.message_id)
            answer.status = message.status.value if message.status else "UNKNOWN"
            if answer.status in ("COMPLETED", "QUERY_RESULT_EXPIRED"):
                return message
            if answer.status == "FAILED":
                error = message.error.error if message.error and message.error.error else "no reason given"
                raise ToolError(f"Genie could not answer: {error}. Rephrase the question or ask something simpler.")
            if answer.status == "CANCELLED":
                raise ToolError("the Genie question was cancelled before it finished; ask it again if still needed.")
            if answer.status not in IN_PROGRESS:
                log.warning("unexpected Genie status %s; still polling", answer.status)
            if self.clock() >= deadline:
                raise ToolError(f"Genie did not answer within {self.config.timeout:g} s "
                                f"(last status {answer.status}); try a simpler question.")
            delay = min(delay * 1.5, self.config.poll_max)

    def _fetch_rows(self, answer: Answer, attachment_id: str, expired: bool):
        from databricks.sdk.errors import DatabricksError

        ids = (self.config.space_id, answer.conversation_id, answer.message_id, attachment_id)
        try:
            result = None if expired else self.w.genie.get_message_attachment_query_result(*ids)
            if result is None or not _succeeded(result.statement_response):
                log.info("query result of message %s expired or missing; re-executing", answer.message_id)
                result = self.w.genie.execute_message_attachment_query(*ids)
        except DatabricksError as e:
            raise ToolError(f"Genie answered but its query result could not be read: {e}") from e
        statement = result.statement_response
        if not _succeeded(statement):
            state = statement.status.state.value if statement and statement.status and statement.status.state else "?"
            raise ToolError(f"Genie's query did not succeed (state {state}).")
        columns = statement.manifest.schema.columns if statement.manifest and statement.manifest.schema else []
        answer.columns = [c.name for c in columns or []]
        answer.rows = statement.result.data_array if statement.result and statement.result.data_array else []
        answer.row_count = (statement.manifest.total_row_count if statement.manifest else None) or len(answer.rows)


def _succeeded(statement) -> bool:
    return bool(statement and statement.status and statement.status.state
                and statement.status.state.value == "SUCCEEDED")


def render(answer: Answer, max_chars: int) -> str:
    """The tool output the model sees: answer, SQL, and the rows cut to a head and a tail within max_chars."""
    parts = [f"Genie: {answer.text or '(no text answer)'}"]
    if answer.query:
        parts.append(f"SQL:\n{answer.query}")
    if answer.columns:
        parts.append(f"Rows ({answer.row_count} in all):\n" + _table(answer.columns, answer.rows, max_chars))
    return "\n\n".join(parts)


def _table(columns, rows, max_chars) -> str:
    def line(values):
        return " | ".join("" if v is None else " ".join(str(v).splitlines()) for v in values)
    lines = [line(r) for r in rows]
    header = line(columns)
    budget = max_chars - len(header)  # each row costs its length + 1 for the line break before it
    if sum(len(s) + 1 for s in lines) <= budget:
        return "\n".join([header, *lines])
    head, tail, used = [], [], 0
    budget -= 80  # room for the note
    for i in range(len(lines)):  # alternate head and tail until the budget is spent
        take = lines[i // 2] if i % 2 == 0 else lines[-1 - i // 2]
        if used + len(take) + 1 > budget:
            break
        (head if i % 2 == 0 else tail).append(take)
        used += len(take) + 1
    left = lines[len(head):len(lines) - len(tail)]
    note = f"... {len(left)} rows ({sum(len(s) + 1 for s in left)} characters) left out ..."
    return "\n".join([header, *head, note, *reversed(tail)])
