"""genie.py, the worker's query_genie tool, driven through the real databricks-sdk over HTTP against the local
emulator's Genie Conversation API (localws.Emulator), with its scripted faults, its rate limit and the quirks of the
real Genie (a test names the ones it needs with `@pytest.mark.parametrize("quirks", [...])`)."""
import json
import logging
import time

import pytest
from helpers import GENIE, SQL, Answerer, make_genie, workspace

from genie import DEFAULT_DESCRIPTION, LOG_CHARS, MAX_QUESTION_CHARS, Genie, GenieConfig, GenieUnavailable, table
from llm import ToolError
from localws.genie_server import ATTEMPT_TEXT, SUGGESTED


def ask(genie, question):
    """(what the model sees, what the step log keeps) of one question; a ToolError's detail is on the error."""
    result = genie.query_genie(question)
    return result.content, result.detail


def failing(genie, question, match):
    """The step log's detail of a question that fails with a ToolError matching `match`."""
    with pytest.raises(ToolError, match=match) as caught:
        genie.query_genie(question)
    return caught.value.detail


def genie_calls(emu):
    return [(r.method, r.path, r.status) for r in emu.calls(path_prefix="/api/2.0/genie")]


def query_attachment(w, detail):
    message = w.genie.get_message("space", detail["conversation_id"], detail["message_id"])
    return next(a.attachment_id for a in message.attachments if a.query)


# ------------------------------------------------------------------ asking

def test_answer_text_sql_and_rows_with_the_attachment_query_result_call(emu, w):
    genie = make_genie(w)
    output, last = ask(genie, "  total sales by region ")
    assert output == ("Genie: Answer to total sales by region\n\n"
                      f"SQL:\n{SQL}\n\n"
                      "Rows (2 in all):\nregion | total\neast | 10.50\nwest | ")
    assert (last["question"], last["status"], last["query"]) == ("total sales by region", "COMPLETED", SQL)
    assert (last["columns"], last["rows"], last["row_count"]) == (["region", "total"],
                                                                  [["east", "10.50"], ["west", None]], 2)
    assert last["conversation_id"] == genie.conversation_id and last["message_id"]
    assert (last["attempts"], last["rows_left_out"], last["result_state"]) == ([], 0, "SUCCEEDED")
    calls = genie_calls(emu)
    message = f"{GENIE}/conversations/{last['conversation_id']}/messages/{last['message_id']}"
    assert calls[0] == ("POST", f"{GENIE}/start-conversation", 200)
    assert {c[:2] for c in calls[1:-1]} == {("GET", message)}  # polled until COMPLETED
    attachment = query_attachment(w, last)
    assert calls[-1] == ("GET", f"{message}/attachments/{attachment}/query-result", 200)


def test_a_text_only_answer_has_no_sql_and_no_rows(emu, w):
    genie = make_genie(w)
    output, detail = ask(genie, "explain what sales are")
    assert output == "Genie: Sales are completed orders."
    assert (detail["query"], detail["columns"], detail["rows"]) == ("", [], [])
    assert not [c for c in genie_calls(emu) if "/attachments/" in c[1]]


def test_a_follow_up_is_asked_in_the_same_conversation(emu, w, answerer):
    genie = make_genie(w)
    _, first = ask(genie, "total sales by region")
    _, second = ask(genie, "and by month?")
    assert second["conversation_id"] == first["conversation_id"] and second["message_id"] != first["message_id"]
    posts = [c[1] for c in genie_calls(emu) if c[0] == "POST"]
    assert posts == [f"{GENIE}/start-conversation", f"{GENIE}/conversations/{first['conversation_id']}/messages"]
    assert answerer.questions() == [("total sales by region", []), ("and by month?", ["total sales by region"])]
    make_genie(w).query_genie("another run")  # another run, another Genie: a new conversation
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
    detail = failing(make_genie(w), "total sales", r"^Genie could not answer: the warehouse is stopped\. Rephrase")
    assert detail["status"] == "FAILED" and detail["message_id"]  # kept for the step log
    assert "the warehouse is stopped" in detail["error"]


def test_cancelled_message_is_an_error_for_the_model(emu, w):
    emu.genie_fault("space", "cancelled")
    genie = make_genie(w)
    started = time.monotonic()
    detail = failing(genie, "total sales", "cancelled before it finished")
    assert time.monotonic() - started < 3  # not polled on until the timeout, as the SDK's waiter would
    assert detail["status"] == "CANCELLED"


def test_a_hanging_message_times_out(emu, w):
    emu.genie_fault("space", "hang")
    genie = make_genie(w, timeout=0.6)
    started = time.monotonic()
    detail = failing(genie, "total sales", r"did not answer within 0\.6 s \(last status EXECUTING_QUERY\)")
    assert 0.6 <= time.monotonic() - started < 3
    assert detail["status"] == "EXECUTING_QUERY"


@pytest.mark.parametrize("fault", ["expired", "closed"])  # the message says so, or only its result does
def test_an_expired_result_is_re_executed(emu, w, fault):
    emu.genie_fault("space", fault)
    genie = make_genie(w)
    output, detail = ask(genie, "total sales by region")
    assert output.endswith("Rows (2 in all):\nregion | total\neast | 10.50\nwest | ")
    assert detail["rows"] == [["east", "10.50"], ["west", None]]
    message = f"{GENIE}/conversations/{genie.conversation_id}/messages/{detail['message_id']}"
    attachment = query_attachment(w, detail)
    assert ("POST", f"{message}/attachments/{attachment}/execute-query", 200) in genie_calls(emu)


# ------------------------------------------------------------------ the real Genie's other answers

ROWS_SHOWN = "Rows (2 in all):\nregion | total\neast | 10.50\nwest | "


@pytest.mark.parametrize("quirks", [{"genie_self_correction", "genie_summary_without_id",
                                     "genie_suggested_questions"}])
def test_a_self_corrected_answer_is_its_last_query_and_the_attempt_stays_in_the_step_log(emu, w):
    output, detail = ask(make_genie(w), "total sales by region")
    assert output == (f"Genie: Answer to total sales by region\n\nSQL:\n{SQL}\n\n{ROWS_SHOWN}\n\n"
                      f"Genie suggests asking next: {' | '.join(SUGGESTED)}")
    message = w.genie.get_message("space", detail["conversation_id"], detail["message_id"])
    attempt, attempt_text, query, summary, suggested = message.attachments  # as the real Genie sends them
    assert summary.attachment_id is None and summary.text.content == "Answer to total sales by region"
    assert detail["attempts"] == [{"attachment_id": attempt.attachment_id, "query": attempt.query.query,
                                   "description": attempt.query.description, "text": ATTEMPT_TEXT}]
    assert "missing_column" in attempt.query.query and (detail["query"], detail["suggested"]) == (SQL, SUGGESTED)
    results = [c for c in genie_calls(emu) if c[1].endswith("/query-result")]
    assert results == [("GET", f"{GENIE}/conversations/{detail['conversation_id']}/messages/{detail['message_id']}"
                               f"/attachments/{query.attachment_id}/query-result", 200)]  # the answer's only


@pytest.mark.parametrize("quirks", [{"genie_description_only"}])
def test_an_answer_without_text_is_explained_by_its_query_s_description(emu, w):
    genie = make_genie(w)
    ask(genie, "total sales by region")
    output, detail = ask(genie, "and by month?")  # every second answer has no text attachment
    message = w.genie.get_message("space", detail["conversation_id"], detail["message_id"])
    assert [a.text for a in message.attachments] == [None]
    assert output == f"Genie: Answer to and by month?\n\nSQL:\n{SQL}\n\n{ROWS_SHOWN}"
    assert (detail["text"], detail["description"]) == ("", "Answer to and by month?")


@pytest.mark.parametrize("quirks", [{"genie_clarifying_question"}])
def test_a_clarifying_question_is_shown_as_a_question_genie_asks_back(emu, w):
    output, detail = ask(make_genie(w), "will it rain tomorrow? weather")
    assert output == ("Genie asks back: I can only answer questions about sales. Which of these would you like to "
                      "know?\n(Ask again with what it needs, or say in your answer what is missing.)")
    assert (detail["status"], detail["text"], detail["query"], detail["error"]) == ("COMPLETED", "", "", "")


@pytest.mark.parametrize("quirks", [{"genie_pending_results"}])
def test_a_re_executed_result_is_polled_while_pending_until_it_succeeds(emu, w):
    emu.genie_fault("space", "expired")
    emu.genie_result_delay = 0.3  # the re-executed query is PENDING, then RUNNING, for 0.3 s
    output, detail = ask(make_genie(w), "total sales by region")
    assert output.endswith(ROWS_SHOWN) and detail["result_state"] == "SUCCEEDED"
    calls = [c[1].rsplit("/", 1)[1] for c in genie_calls(emu) if "/attachments/" in c[1]]
    assert calls[0] == "execute-query" and len(calls) > 2 and set(calls[1:]) == {"query-result"}


@pytest.mark.parametrize("quirks", [{"genie_pending_results"}])
def test_a_result_still_pending_at_the_deadline_is_an_error_in_time(emu, w):
    emu.genie_fault("space", "expired")
    emu.genie_result_delay = 60.0  # the re-executed query stays PENDING
    detail = failing(make_genie(w, timeout=1.0), "total sales",  # polling past it would hit bounded_sleep's limit
                     r"query result was not ready within 1 s \(state PENDING\)")
    assert detail["result_state"] == "PENDING"


def test_an_api_error_while_polling_is_an_error_for_the_model_with_the_reason(emu, w):
    emu.inject("GET", f"{GENIE}/conversations/", 500, "INTERNAL_ERROR", "the backend fell over", times=None)
    detail = failing(make_genie(w), "total sales", "^Genie failed while we waited for its answer: INTERNAL_ERROR: the "
                                             "backend fell over. Ask the question again")
    assert detail["status"] == "SUBMITTED" and "the backend fell over" in detail["error"]


def test_an_unknown_status_is_logged_once_and_polled_within_the_deadline(emu, w, caplog):
    emu.genie_delay = 0.6  # FUTURE_STATUS from 0.2 s to 0.8 s: several polls see it
    emu.genie_fault("space", "new_status")
    with caplog.at_level(logging.WARNING, logger="genie"):
        output, detail = ask(make_genie(w), "total sales by region")
    assert output.endswith(ROWS_SHOWN) and detail["status"] == "COMPLETED"
    assert len([c for c in genie_calls(emu) if c[1].endswith(detail["message_id"])]) > 5
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"Genie message {detail['message_id']} has a status this client does not know; "
                              f"polling on for at most ")
    emu.genie_fault("space", "new_status")
    failing(make_genie(w, timeout=0.5), "and again?", r"did not answer within 0\.5 s \(last status UNKNOWN\)")


def test_a_huge_result_is_bounded_in_the_step_log_and_cut_for_the_model(emu, w, answerer):
    answerer.rows = [[f"r{i:04d}", "x" * 2000] for i in range(5000)]  # 10 MB
    output, detail = ask(make_genie(w, max_chars=6000), "sales per order")
    assert len(output.split("Rows (5000 in all):\n", 1)[1]) <= 6000
    kept = len(detail["rows"])
    assert 50 < kept < 5000 and detail["rows"] == answerer.rows[:kept] and detail["rows_left_out"] == 5000 - kept
    assert len(json.dumps(detail)) < LOG_CHARS + 2000
    assert detail["note"] == (f"the step log keeps {kept} of the 5,000 rows (at most 1,000 rows and 200,000 "
                              f"characters)")


# ------------------------------------------------------------------ rate limit and unusable spaces

def test_rate_limit_is_retried_then_the_question_succeeds(make_emulator):
    emu = make_emulator(genie_delay=0.03, genie_rate_limit=1, genie_rate_window=1.0)
    emu.add_genie_space("space", Answerer())
    genie = make_genie(workspace(emu, retry_timeout=15))
    genie.query_genie("first")
    started = time.monotonic()
    assert ask(genie, "and the second?")[0].startswith("Genie: Answer to and the second?")
    assert time.monotonic() - started >= 0.5  # waited for Retry-After
    assert [c[2] for c in genie_calls(emu) if c[0] == "POST"] == [200, 429, 200]


def test_rate_limit_past_the_retry_budget_is_a_clear_error_for_the_model(emu):
    emu.inject("POST", f"{GENIE}/start-conversation", 429, "RESOURCE_EXHAUSTED", "too many questions",
               times=None, retry_after=1)
    genie = make_genie(workspace(emu, retry_timeout=2))
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"rate limited \(about 5 questions a minute.*Wait a minute"):
        genie.query_genie("total sales")
    assert time.monotonic() - started < 8
    assert [c[2] for c in genie_calls(emu)] == [429, 429]  # retried after Retry-After, within the 2 s budget


def test_rate_limit_while_polling_past_the_retry_budget_says_so(emu):
    emu.inject("GET", f"{GENIE}/conversations/", 429, "RESOURCE_EXHAUSTED", "too many requests", times=None,
               retry_after=1)
    detail = failing(make_genie(workspace(emu, retry_timeout=1)), "total sales",
                     r"^Genie is rate limited \(about 5 questions a minute.*\) while we waited for its answer: too "
                     r"many requests\. Wait a minute")
    assert detail["status"] == "SUBMITTED"


def test_other_refusals_are_errors_for_the_model(emu, w):
    emu.inject("POST", f"{GENIE}/start-conversation", 400, "INVALID_PARAMETER_VALUE", "question too vague")
    with pytest.raises(ToolError, match="Genie refused the question: question too vague"):
        make_genie(w).query_genie("total sales")
    emu.inject("POST", f"{GENIE}/start-conversation", 503, times=None)
    with pytest.raises(ToolError, match="did not respond") as caught:
        make_genie(workspace(emu, retry_timeout=1)).query_genie("total sales")
    assert "rate limited" not in str(caught.value)


@pytest.mark.parametrize("status, code", [(404, "RESOURCE_DOES_NOT_EXIST"), (403, "PERMISSION_DENIED"),
                                          (401, "UNAUTHENTICATED")])
def test_a_missing_or_forbidden_space_is_genie_unavailable(emu, w, status, code):
    emu.inject("POST", f"{GENIE}/start-conversation", status, code, "no such space, or no access to it")
    with pytest.raises(GenieUnavailable, match="Genie space 'space' can't be used: no such space"):
        make_genie(w).query_genie("total sales")


def test_an_unknown_space_is_genie_unavailable(emu, w):
    with pytest.raises(GenieUnavailable, match="Genie space 'nope' can't be used"):
        make_genie(w, space="nope").query_genie("total sales")


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
        make_genie(w).query_genie(question)
    assert genie_calls(emu) == []


# ------------------------------------------------------------------ what the model sees of a large result

def test_a_large_result_is_cut_to_a_head_and_a_tail_with_a_note(emu, w, answerer):
    answerer.rows = [[f"r{i:04d}", str(i)] for i in range(1000)]
    genie = make_genie(w, max_chars=600)
    output, detail = ask(genie, "sales per order")
    shown = output.split("Rows (1000 in all):\n", 1)[1]
    assert len(shown) <= 600
    lines = shown.split("\n")
    note = next(i for i, line in enumerate(lines) if line.startswith("..."))
    head, tail = lines[1:note], lines[note + 1:]
    row = lambda i: f"r{i:04d} | {i}"  # noqa: E731
    assert lines[0] == "region | total" and len(head) >= 10 and abs(len(head) - len(tail)) <= 1
    assert head == [row(i) for i in range(len(head))]
    assert tail == [row(i) for i in range(1000 - len(tail), 1000)]
    left = range(len(head), 1000 - len(tail))
    assert lines[note] == f"... {len(left)} rows ({sum(len(row(i)) + 1 for i in left)} characters) left out ..."
    assert detail["rows"] == answerer.rows and detail["row_count"] == 1000  # within the step log's bounds


def test_a_table_that_fits_exactly_is_not_cut():
    whole = "a\n1\n22\n333"
    assert table(["a"], [["1"], ["22"], ["333"]], len(whole)) == whole
    cut = table(["a"], [["1"], ["22"], ["333"]], len(whole) - 1)
    assert "left out" in cut and len(cut) <= 100


def test_a_value_with_line_breaks_stays_on_its_row():
    assert table(["note", "n"], [["two\nlines", "1"], ["x", "2"]], 1000) == "note | n\ntwo lines | 1\nx | 2"
