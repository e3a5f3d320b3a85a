"""genie.py, the worker's query_genie tool, driven through the real databricks-sdk over HTTP against the local
emulator's Genie Conversation API (localws.Emulator), with its scripted faults and rate limit."""
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.config import Config

import localws
import localws.emulator
from genie import DEFAULT_DESCRIPTION, MAX_QUESTION_CHARS, Answer, Genie, GenieConfig, GenieUnavailable, render
from llm import ToolError

ROOT = Path(__file__).resolve().parents[1]
GENIE = "/api/2.0/genie/spaces/space"
SQL = "SELECT region, SUM(amount) AS total FROM sales GROUP BY 1"


class Answerer:
    """A Genie answerer for tests: answers every question from `rows`, records (question, earlier questions)."""

    def __init__(self, rows=None):
        self.asked = []
        self.rows = rows if rows is not None else [["east", "10.50"], ["west", None]]

    def answer(self, question, history):
        self.asked.append((question, [h["question"] for h in history]))
        if "explain" in question:
            return SimpleNamespace(text="Sales are completed orders.", sql=None, columns=[], rows=[])
        return SimpleNamespace(text=f"Answer to {question}", sql=SQL, rows=self.rows,
                               columns=[{"name": "region", "type_name": "STRING"},
                                        {"name": "total", "type_name": "DECIMAL"}])


def client(emu, retry_timeout=10):
    return WorkspaceClient(config=Config(host=emu.url, token=localws.emulator.TOKEN, auth_type="pat",
                                         retry_timeout_seconds=retry_timeout))


def bounded_sleep(limit=20.0):
    """time.sleep for Genie's polling that fails the test, rather than hang it, if polling outlasts `limit`."""
    deadline = time.monotonic() + limit

    def sleep(seconds):
        assert time.monotonic() < deadline, f"Genie still polling after {limit} s: its timeout did not work"
        time.sleep(seconds)
    return sleep


def make(w, space="space", **settings):
    """A Genie with test-sized polling (the defaults are 1 s growing to 5 s, 10 minutes overall)."""
    settings = {"poll_first": 0.01, "poll_max": 0.05, "timeout": 10.0, **settings}
    return Genie(w, GenieConfig(space, **settings), sleep=bounded_sleep())


@pytest.fixture
def answerer():
    return Answerer()


@pytest.fixture
def emu(tmp_path, answerer):
    with localws.Emulator(project_dir=ROOT, log_dir=tmp_path, genie_delay=0.03) as emulator:
        emulator.add_genie_space("space", answerer)
        yield emulator


@pytest.fixture
def w(emu):
    return client(emu)


def genie_calls(emu):
    return [(r.method, r.path, r.status) for r in emu.calls(path_prefix="/api/2.0/genie")]


def query_attachment(w, answer):
    message = w.genie.get_message("space", answer.conversation_id, answer.message_id)
    return next(a.attachment_id for a in message.attachments if a.query)


# ------------------------------------------------------------------ asking

def test_answer_text_sql_and_rows_with_the_attachment_query_result_call(emu, w):
    genie = make(w)
    output = genie.query_genie("  total sales by region ")
    assert output == ("Genie: Answer to total sales by region\n\n"
                      f"SQL:\n{SQL}\n\n"
                      "Rows (2 in all):\nregion | total\neast | 10.50\nwest | ")
    last = genie.last
    assert (last.question, last.status, last.query) == ("total sales by region", "COMPLETED", SQL)
    assert (last.columns, last.rows, last.row_count) == (["region", "total"], [["east", "10.50"], ["west", None]], 2)
    assert last.conversation_id == genie.conversation_id and last.message_id
    calls = genie_calls(emu)
    message = f"{GENIE}/conversations/{last.conversation_id}/messages/{last.message_id}"
    assert calls[0] == ("POST", f"{GENIE}/start-conversation", 200)
    assert {c[:2] for c in calls[1:-1]} == {("GET", message)}  # polled until COMPLETED
    attachment = query_attachment(w, last)
    assert calls[-1] == ("GET", f"{message}/attachments/{attachment}/query-result", 200)


def test_a_text_only_answer_has_no_sql_and_no_rows(emu, w):
    genie = make(w)
    assert genie.query_genie("explain what sales are") == "Genie: Sales are completed orders."
    assert (genie.last.query, genie.last.columns, genie.last.rows) == ("", [], [])
    assert not [c for c in genie_calls(emu) if "/attachments/" in c[1]]


def test_a_follow_up_is_asked_in_the_same_conversation(emu, w, answerer):
    genie = make(w)
    genie.query_genie("total sales by region")
    first = genie.last
    genie.query_genie("and by month?")
    assert genie.last.conversation_id == first.conversation_id and genie.last.message_id != first.message_id
    posts = [c[1] for c in genie_calls(emu) if c[0] == "POST"]
    assert posts == [f"{GENIE}/start-conversation", f"{GENIE}/conversations/{first.conversation_id}/messages"]
    assert answerer.asked == [("total sales by region", []), ("and by month?", ["total sales by region"])]
    make(w).query_genie("another run")  # another run, another Genie: a new conversation
    assert [c[1] for c in genie_calls(emu) if c[0] == "POST"][-1] == f"{GENIE}/start-conversation"


def test_polls_with_backoff_from_the_first_delay_up_to_the_longest(emu, w):
    assert (GenieConfig("s").poll_first, GenieConfig("s").poll_max, GenieConfig("s").timeout) == (1.0, 5.0, 600.0)
    emu.genie_delay = 0.9  # the answer is ready after about 0.9 s
    sleeps = []
    genie = Genie(w, GenieConfig("space", poll_first=0.02, poll_max=0.08),
                  sleep=lambda seconds: (sleeps.append(seconds), time.sleep(seconds)))
    genie.query_genie("total sales")
    assert sleeps[:4] == pytest.approx([0.02, 0.03, 0.045, 0.0675])
    assert sleeps[4:] == pytest.approx([0.08] * len(sleeps[4:])) and len(sleeps) > 6
    polls = [c for c in genie_calls(emu) if c[0] == "GET" and c[1].count("/") == 9]
    assert len(polls) == len(sleeps)  # one status poll after each wait


# ------------------------------------------------------------------ final statuses

def test_failed_message_is_an_error_for_the_model_with_genie_s_reason(emu, w):
    emu.genie_fault("space", "failed", "the warehouse is stopped")
    genie = make(w)
    with pytest.raises(ToolError, match=r"^Genie could not answer: the warehouse is stopped\. Rephrase"):
        genie.query_genie("total sales")
    assert genie.last.status == "FAILED" and genie.last.message_id  # kept for the step log
    assert "the warehouse is stopped" in genie.last.error


def test_cancelled_message_is_an_error_for_the_model(emu, w):
    emu.genie_fault("space", "cancelled")
    genie = make(w)
    started = time.monotonic()
    with pytest.raises(ToolError, match="cancelled before it finished"):
        genie.query_genie("total sales")
    assert time.monotonic() - started < 3  # not polled on until the timeout, as the SDK's waiter would
    assert genie.last.status == "CANCELLED"


def test_a_hanging_message_times_out(emu, w):
    emu.genie_fault("space", "hang")
    genie = make(w, timeout=0.6)
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"did not answer within 0\.6 s \(last status EXECUTING_QUERY\)"):
        genie.query_genie("total sales")
    assert 0.6 <= time.monotonic() - started < 3
    assert genie.last.status == "EXECUTING_QUERY"


@pytest.mark.parametrize("fault", ["expired", "closed"])  # the message says so, or only its result does
def test_an_expired_result_is_re_executed(emu, w, fault):
    emu.genie_fault("space", fault)
    genie = make(w)
    output = genie.query_genie("total sales by region")
    assert output.endswith("Rows (2 in all):\nregion | total\neast | 10.50\nwest | ")
    assert genie.last.rows == [["east", "10.50"], ["west", None]]
    message = f"{GENIE}/conversations/{genie.conversation_id}/messages/{genie.last.message_id}"
    attachment = query_attachment(w, genie.last)
    assert ("POST", f"{message}/attachments/{attachment}/execute-query", 200) in genie_calls(emu)


# ------------------------------------------------------------------ rate limit and unusable spaces

def test_rate_limit_is_retried_then_the_question_succeeds(tmp_path):
    with localws.Emulator(project_dir=ROOT, log_dir=tmp_path, genie_delay=0.03, genie_rate_limit=1,
                        genie_rate_window=1.0) as emu:
        emu.add_genie_space("space", Answerer())
        genie = make(client(emu, retry_timeout=15))
        genie.query_genie("first")
        started = time.monotonic()
        assert genie.query_genie("and the second?").startswith("Genie: Answer to and the second?")
        assert time.monotonic() - started >= 0.5  # waited for Retry-After
        assert [c[2] for c in genie_calls(emu) if c[0] == "POST"] == [200, 429, 200]


def test_rate_limit_past_the_retry_budget_is_a_clear_error_for_the_model(emu):
    emu.inject("POST", f"{GENIE}/start-conversation", 429, "RESOURCE_EXHAUSTED", "too many questions",
               times=None, retry_after=1)
    genie = make(client(emu, retry_timeout=2))
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"rate limited \(about 5 questions a minute.*Wait a minute"):
        genie.query_genie("total sales")
    assert time.monotonic() - started < 8
    assert [c[2] for c in genie_calls(emu)] == [429, 429]  # retried after Retry-After, within the 2 s budget


def test_other_refusals_are_errors_for_the_model(emu, w):
    emu.inject("POST", f"{GENIE}/start-conversation", 400, "INVALID_PARAMETER_VALUE", "question too vague")
    with pytest.raises(ToolError, match="Genie refused the question: question too vague"):
        make(w).query_genie("total sales")
    emu.inject("POST", f"{GENIE}/start-conversation", 503, times=None)
    with pytest.raises(ToolError, match="did not respond") as caught:
        make(client(emu, retry_timeout=1)).query_genie("total sales")
    assert "rate limited" not in str(caught.value)


@pytest.mark.parametrize("status, code", [(404, "RESOURCE_DOES_NOT_EXIST"), (403, "PERMISSION_DENIED"),
                                          (401, "UNAUTHENTICATED")])
def test_a_missing_or_forbidden_space_is_genie_unavailable(emu, w, status, code):
    emu.inject("POST", f"{GENIE}/start-conversation", status, code, "no such space, or no access to it")
    with pytest.raises(GenieUnavailable, match="Genie space 'space' can't be used: no such space"):
        make(w).query_genie("total sales")


def test_an_unknown_space_is_genie_unavailable(emu, w):
    with pytest.raises(GenieUnavailable, match="Genie space 'nope' can't be used"):
        make(w, space="nope").query_genie("total sales")


# ------------------------------------------------------------------ the tool and its input

def test_tool_schema_and_description():
    genie = Genie(None, GenieConfig("space", description="Sales 2024-2025 by region and product."))
    assert genie.tool().schema() == {"type": "function", "function": {
        "name": "query_genie", "description": "Sales 2024-2025 by region and product.",
        "parameters": {"type": "object", "required": ["question"],
                       "properties": {"question": {"type": "string", "description": "One question, in plain words."}}}}}
    assert genie.tool().fn == genie.query_genie
    assert Genie(None, GenieConfig("space")).tool().description == DEFAULT_DESCRIPTION


@pytest.mark.parametrize("question, problem", [(" \n", "the question is empty"),
                                               ("x" * (MAX_QUESTION_CHARS + 1), "keep it under 4000"),
                                               (42, "the question must be a string")])
def test_a_bad_question_is_an_error_for_the_model_and_never_sent(emu, w, question, problem):
    with pytest.raises(ToolError, match=problem):
        make(w).query_genie(question)
    assert genie_calls(emu) == []


# ------------------------------------------------------------------ what the model sees of a large result

def test_a_large_result_is_cut_to_a_head_and_a_tail_with_a_note(emu, w, answerer):
    answerer.rows = [[f"r{i:04d}", str(i)] for i in range(1000)]
    genie = make(w, max_chars=600)
    output = genie.query_genie("sales per order")
    table = output.split("Rows (1000 in all):\n", 1)[1]
    assert len(table) <= 600
    lines = table.split("\n")
    note = next(i for i, line in enumerate(lines) if line.startswith("..."))
    head, tail = lines[1:note], lines[note + 1:]
    row = lambda i: f"r{i:04d} | {i}"  # noqa: E731
    assert lines[0] == "region | total" and len(head) >= 10 and abs(len(head) - len(tail)) <= 1
    assert head == [row(i) for i in range(len(head))]
    assert tail == [row(i) for i in range(1000 - len(tail), 1000)]
    left = range(len(head), 1000 - len(tail))
    assert lines[note] == f"... {len(left)} rows ({sum(len(row(i)) + 1 for i in left)} characters) left out ..."
    assert genie.last.rows == answerer.rows and genie.last.row_count == 1000  # the step log gets them all


def test_a_table_that_fits_exactly_is_not_cut():
    answer = Answer("q", "c", "m", "COMPLETED", text="t", columns=["a"], rows=[["1"], ["22"], ["333"]], row_count=3)
    table = "a\n1\n22\n333"
    assert render(answer, len(table)).endswith("Rows (3 in all):\n" + table)
    cut = render(answer, len(table) - 1).split("Rows (3 in all):\n", 1)[1]
    assert "left out" in cut and len(cut) <= 100


def test_a_value_with_line_breaks_stays_on_its_row():
    answer = Answer("q", "c", "m", "COMPLETED", columns=["note", "n"], rows=[["two\nlines", "1"], ["x", "2"]],
                    row_count=2)
    assert render(answer, 1000).endswith("Rows (2 in all):\nnote | n\ntwo lines | 1\nx | 2")
