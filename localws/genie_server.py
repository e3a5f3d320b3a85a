"""The Genie side of the local workspace emulator: spaces, conversations and messages, answered in the background.

`Genie` is mixed into `localws.Emulator`, whose route table sends the Genie Conversation API requests to its
methods. A question is answered in a thread of its own by the space's pluggable answerer (`answerer.GenieAnswerer`
in local mode) through the statuses of the service; its rows come back as a SQL statement response. Tests script
the next message of a space with `genie_fault()`. The quirks named `genie_*` (localws/quirks.py) add what the real
Genie does besides: self-corrected answers, clarifying questions, suggested questions, a summary without an
attachment id, description-only answers, results that are PENDING when re-executed and that expire, and the
workspace's rate limit.
"""
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from localws.answerer import CannotAnswer
from localws.emulator import ApiError, bad, missing, now_ms

log = logging.getLogger(__name__)

GENIE_FAULTS = ("failed", "cancelled", "hang", "expired", "closed", "new_status")
NEW_STATUS = "FUTURE_STATUS"  # a status no SDK knows, as a newer service may send
RATE_LIMIT = 5  # genie_rate_limit: the real limit is about 5 questions a minute per workspace
SUGGESTED = ["And by month?", "What about 2024?"]
ATTEMPT_ERROR = ("[UNRESOLVED_COLUMN.WITHOUT_SUGGESTION] A column, variable, or function parameter with name "
                 "`missing_column` cannot be resolved. SQLSTATE: 42703")
ATTEMPT_TEXT = "The first query failed: the column `missing_column` does not exist. I corrected it and ran it again."
MAX_GENIE_ROWS = 5000  # the Genie API returns at most 5,000 rows per query result
COLUMN_TYPES = {"ARRAY", "BINARY", "BOOLEAN", "BYTE", "CHAR", "DATE", "DECIMAL", "DOUBLE", "FLOAT", "INT",
                "INTERVAL", "LONG", "MAP", "NULL", "SHORT", "STRING", "STRUCT", "TIMESTAMP", "USER_DEFINED_TYPE"}
TYPE_TEXT = {"LONG": "BIGINT", "SHORT": "SMALLINT", "BYTE": "TINYINT"}


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
    statement_id: str | None = None
    result_closed: bool = False  # COMPLETED, but its result expired since: CLOSED until execute-query
    attempt: dict | None = None  # genie_self_correction: the failed first query {id, sql, statement_id, text_id}
    texts: list = field(default_factory=list)  # the attachments after the query: summary, question back, suggestions
    ready_at: float | None = None  # monotonic time the result is (or will be) ready


@dataclass
class _Space:
    space_id: str
    answerer: object  # .answer(question, history) -> result with .text, .sql, .columns, .rows
    title: str
    description: str
    users: frozenset | None = None  # who may use it (Can run); None: everyone
    faults: deque = field(default_factory=deque)
    answered: int = 0  # answers with SQL so far, for quirks that play on every second one


class Genie:
    """Mixed into `localws.Emulator`: uses its `_lock`, `_closing` and `quirks`; `_init_genie()` is called by its
    `__init__()`. Answer threads stop at their next step once `_closing` is set."""
    SPACE = r"/api/2\.0/genie/spaces/(?P<space>[^/]+)"
    MESSAGE = SPACE + r"/conversations/(?P<cid>[^/]+)/messages/(?P<mid>[^/]+)"
    ROUTES = [
        ("GET", SPACE, "_get_space"),
        ("POST", SPACE + "/start-conversation", "_start_conversation"),
        ("POST", SPACE + r"/conversations/(?P<cid>[^/]+)/messages", "_create_message"),
        ("GET", SPACE + r"/conversations/(?P<cid>[^/]+)/messages", "_list_messages"),
        ("GET", MESSAGE, "_get_message"),
        ("GET", MESSAGE + r"/attachments/(?P<aid>[^/]+)/query-result", "_query_result"),
        ("POST", MESSAGE + r"/attachments/(?P<aid>[^/]+)/execute-query", "_execute_query"),
    ]

    def _init_genie(self, delay, rate_limit, rate_window, result_ttl):
        self.genie_delay, self.genie_result_ttl = delay, result_ttl
        self.genie_result_delay = delay  # genie_pending_results: how long a re-executed query takes
        if rate_limit is None and "genie_rate_limit" in self.quirks:
            rate_limit, rate_window = RATE_LIMIT, 60.0
        self.genie_rate_limit, self.genie_rate_window = rate_limit, rate_window
        self.spaces, self.conversations, self.messages = {}, {}, {}
        self._genie_posts = deque()  # when recent questions came, for genie_rate_limit

    def genie_fault(self, space_id, kind, message=None):
        """Script the next message in a space: failed, cancelled, hang (stays EXECUTING_QUERY), expired (ends
        QUERY_RESULT_EXPIRED), closed (ends COMPLETED, but its result reads CLOSED until re-executed) or
        new_status (reads FUTURE_STATUS, a status no SDK knows, for one Genie delay after SUBMITTED)."""
        if kind not in GENIE_FAULTS:
            raise ValueError(f"kind must be one of {GENIE_FAULTS}")
        with self._lock:
            self.spaces[space_id].faults.append((kind, message))

    def add_genie_space(self, space_id, answerer, *, title="Local Genie space", description="", users=None):
        """users: the user names that may use the space; None (the default) lets every user use it."""
        self.spaces[space_id] = _Space(space_id, answerer, title, description,
                                       None if users is None else frozenset(users))

    def _authorize(self, req, params):
        """A space the caller may not use does not exist for them: the real service answers 404, not 403."""
        super()._authorize(req, params)
        space = self.spaces.get(params.get("space"))
        if space is not None and space.users is not None and req.user.name not in space.users:
            raise missing(f"Unable to get space [{space.space_id}]. Caused by Node with resource name "
                          f"Some(datarooms/{space.space_id}) does not exist.")

    def _space(self, space_id):
        if space_id not in self.spaces:
            raise missing(f"Genie space {space_id} does not exist.")
        return self.spaces[space_id]

    def _get_space(self, req, space):
        sp = self._space(space)
        return {"space_id": sp.space_id, "title": sp.title, "description": sp.description,
                "warehouse_id": "local-warehouse"}

    def _question(self, req, space):
        self._space(space)
        content = req.body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise bad("content must be a non-empty string")
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
        now, cid = now_ms(), uuid.uuid4().hex
        with self._lock:
            self.conversations[cid] = {"space_id": space, "title": content[:100], "created": now, "messages": [],
                                       "user_id": req.user.id}
        msg = self._new_message(space, cid, content)
        return {"conversation_id": cid, "message_id": msg.message_id, "conversation": self._conversation_json(cid),
                "message": self._message_json(msg)}

    def _create_message(self, req, space, cid):
        self._conversation(space, cid)
        msg = self._new_message(space, cid, self._question(req, space))
        return self._message_json(msg)

    def _new_message(self, space, cid, content):
        now = now_ms()
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
            msg.status, msg.updated = status, now_ms()
            for k, v in changes.items():
                setattr(msg, k, v)

    def _answer(self, msg, space, fault, fault_message):
        """SUBMITTED -> ASKING_AI -> EXECUTING_QUERY -> COMPLETED (or a scripted fault), a step per delay/3."""
        step = self.genie_delay / 3
        if self._closing.wait(step):
            return
        if fault == "new_status":
            self._set(msg, NEW_STATUS)
            if self._closing.wait(self.genie_delay):
                return
        self._set(msg, "ASKING_AI")
        if fault == "failed":
            return self._set(msg, "FAILED", error={"error": fault_message or "injected failure",
                                                   "type": "SQL_EXECUTION_EXCEPTION"})
        if fault == "cancelled":
            return self._set(msg, "CANCELLED")
        try:
            result = space.answerer.answer(msg.content, self._history(msg))
        except CannotAnswer as e:
            if "genie_clarifying_question" in self.quirks:  # the real Genie asks back rather than fail
                return self._complete(msg, space, "", None, f"{e} Which of these would you like to know?")
            return self._set(msg, "FAILED", error={"error": str(e), "type": "MISSING_SQL_QUERY_EXCEPTION"})
        except Exception as e:  # a bug in the answerer: the message fails as on the service, the log keeps why
            log.exception("Genie answerer failed on %r", msg.content)
            return self._set(msg, "FAILED", error={"error": f"{type(e).__name__}: {e}",
                                                   "type": "UNEXPECTED_REPLY_PROCESS_EXCEPTION"})
        get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k, None))
        sql = get("sql")
        if self._closing.wait(step):
            return
        if sql:
            columns = [{"name": c["name"], "type_name": c.get("type_name") if c.get("type_name") in COLUMN_TYPES
                        else "STRING", **({"type_text": c["type_text"]} if c.get("type_text") else {})}
                       for c in get("columns") or []]
            rows = [[v if v is None or isinstance(v, str) else str(v) for v in row] for row in get("rows") or []]
            if "genie_self_correction" in self.quirks:  # a first query that fails, then the one that answers
                attempt = {"id": uuid.uuid4().hex, "sql": f"SELECT missing_column FROM ({sql}) AS attempt",
                           "statement_id": str(uuid.uuid4()), "text_id": uuid.uuid4().hex}
                self._set(msg, "EXECUTING_QUERY", attempt=attempt)
                if self._closing.wait(step):
                    return
            self._set(msg, "EXECUTING_QUERY", sql=sql, columns=columns, rows=rows, query_id=uuid.uuid4().hex,
                      statement_id=str(uuid.uuid4()), truncated=bool(get("truncated")) or len(rows) > MAX_GENIE_ROWS)
            if fault == "hang" or self._closing.wait(step):
                return
        self._complete(msg, space, get("text") or "", sql, "", fault)

    def _complete(self, msg, space, text, sql, asks_back, fault=None):
        """COMPLETED (QUERY_RESULT_EXPIRED for that fault), with the attachments after the query: the summary, a
        clarifying question asked back, suggested questions, as the quirks have them."""
        with self._lock:
            space.answered += bool(sql)
            no_text = bool(sql) and "genie_description_only" in self.quirks and space.answered % 2 == 0
        texts, text_id = [], uuid.uuid4().hex
        if text and not no_text:
            texts.append({"text": {"id": text_id, "content": text, "purpose": "TEXT_ATTACHMENT_PURPOSE_ANSWER"}})
            if "genie_summary_without_id" not in self.quirks:
                texts[-1]["attachment_id"] = text_id
        if asks_back:
            question_id = uuid.uuid4().hex
            texts.append({"attachment_id": question_id, "text": {"id": question_id, "content": asks_back,
                                                                 "purpose": "FOLLOW_UP_QUESTION"}})
        if "genie_suggested_questions" in self.quirks and (text or sql):
            texts.append({"attachment_id": uuid.uuid4().hex, "suggested_questions": {"questions": SUGGESTED}})
        expired = fault == "expired" and sql
        self._set(msg, "QUERY_RESULT_EXPIRED" if expired else "COMPLETED", text=text, texts=texts,
                  result_closed=fault == "closed" and bool(sql), ready_at=time.monotonic())

    def _expire(self, msg):
        """genie_result_expiry: genie_result_ttl seconds after its result was ready, the message's result expires."""
        with self._lock:
            if ("genie_result_expiry" in self.quirks and msg.status == "COMPLETED" and msg.query_id
                    and msg.ready_at is not None and time.monotonic() >= msg.ready_at + self.genie_result_ttl):
                msg.status, msg.updated = "QUERY_RESULT_EXPIRED", now_ms()

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
            raise missing(f"Conversation {cid} does not exist.")
        return conv

    def _message(self, space, cid, mid):
        self._conversation(space, cid)
        msg = self.messages.get(mid)
        if msg is None or msg.conversation_id != cid:
            raise missing(f"Message {mid} does not exist.")
        return msg

    def _conversation_json(self, cid):
        conv = self.conversations[cid]
        return {"conversation_id": cid, "id": cid, "space_id": conv["space_id"], "title": conv["title"],
                "created_timestamp": conv["created"], "last_updated_timestamp": conv["created"],
                "user_id": int(conv["user_id"])}

    def _message_json(self, msg):
        self._expire(msg)
        with self._lock:
            body = {"message_id": msg.message_id, "id": msg.message_id, "conversation_id": msg.conversation_id,
                    "space_id": msg.space_id, "content": msg.content, "status": msg.status,
                    "created_timestamp": msg.created, "last_updated_timestamp": msg.updated,
                    "user_id": int(self.conversations[msg.conversation_id]["user_id"])}
            attachments = []
            if msg.attempt:  # genie_self_correction: the failed first query, then a text about it
                attempt = msg.attempt
                attachments.append({"attachment_id": attempt["id"], "query": {
                    "id": attempt["id"], "title": msg.content[:100], "query": attempt["sql"],
                    "description": "First attempt.", "statement_id": attempt["statement_id"],
                    "last_updated_timestamp": msg.updated}})
                if msg.query_id:
                    attachments.append({"attachment_id": attempt["text_id"], "text": {
                        "id": attempt["text_id"], "content": ATTEMPT_TEXT,
                        "purpose": "TEXT_ATTACHMENT_PURPOSE_ANSWER"}})
            if msg.query_id:
                rows = len(msg.rows)
                query = {"id": msg.query_id, "title": msg.content[:100], "query": msg.sql,
                         "statement_id": msg.statement_id, "last_updated_timestamp": msg.updated,
                         "query_result_metadata": {"row_count": min(rows, MAX_GENIE_ROWS),
                                                   "is_truncated": msg.truncated}}
                if msg.text:
                    query["description"] = msg.text
                attachments.append({"attachment_id": msg.query_id, "query": query})
            attachments += msg.texts
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
        if aid not in (msg.query_id, msg.attempt and msg.attempt["id"]):
            raise missing(f"Query attachment {aid} does not exist in message {mid}.")
        return msg

    def _query_result(self, req, space, cid, mid, aid):
        msg = self._query_message(space, cid, mid, aid)
        return {"statement_response": self._statement(msg, aid)}

    def _execute_query(self, req, space, cid, mid, aid):
        msg = self._query_message(space, cid, mid, aid)
        self._expire(msg)
        if aid == msg.query_id and msg.status in ("COMPLETED", "QUERY_RESULT_EXPIRED"):  # a new statement
            delay = self.genie_result_delay if "genie_pending_results" in self.quirks else 0.0
            self._set(msg, "COMPLETED", statement_id=str(uuid.uuid4()), result_closed=False,
                      ready_at=time.monotonic() + delay)
        return {"statement_response": self._statement(msg, aid)}

    def _statement(self, msg, aid):
        """The SQL statement response: FAILED for a self-corrected first attempt, RUNNING while executing, CLOSED
        once expired, PENDING then RUNNING until a re-executed result is ready, else the rows."""
        if msg.attempt and aid == msg.attempt["id"]:
            error = {"error_code": "BAD_REQUEST", "message": ATTEMPT_ERROR}
            return {"statement_id": msg.attempt["statement_id"],
                    "status": {"state": "FAILED", "sql_state": "42703", "error": error}}
        self._expire(msg)
        wait = (msg.ready_at or 0.0) - time.monotonic()
        if msg.status in ("EXECUTING_QUERY", "QUERY_RESULT_EXPIRED") or msg.result_closed or wait > 0:
            state = ("CLOSED" if msg.status == "QUERY_RESULT_EXPIRED" or msg.result_closed
                     else "PENDING" if wait > self.genie_result_delay / 2 else "RUNNING")
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
