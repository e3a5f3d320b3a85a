"""The primary agent against real Postgres, the scripted model over HTTP and the local emulator's Jobs API (the real
SDK over HTTP), whose runs are real subprocesses of tests/fixtures/step_worker.py logging steps to task_logs."""
import io
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import (
    ROOT,
    WAIT,
    ask,
    clean_env,
    count_threads,
    last_tool_result,
    open_db,
    refuse_inserts,
    step_job,
    stored,
    terminal,
    terminal_env,
    texts,
    tool_results,
    wait_ended,
    workspace,
)
from pg_fixture import wait_for

import lakebase
import llm
import primary
from primary import BadRequest, PrimaryAgent, TurnFailed


@pytest.fixture
def emu(make_emulator, pg_dsn):
    """The local workspace, its job runs logging to the test's database."""
    return make_emulator(cancel_grace=3, env={"LAKEBASE_DSN": pg_dsn})


@pytest.fixture
def agent(chat, w, db, job_id):
    return PrimaryAgent(chat, w, db, job_id)


def start(agent, scripted_model, request, thread=None, **extra):
    """A turn in which the model starts a job; returns (response, run id)."""
    scripted_model.call_tool("start_databricks_job", {"request": request})
    response = agent.predict(ask("please find out: " + request, thread, **extra))
    return response, response["custom_outputs"]["run_ids"][0]


# ------------------------------------------------------------------ triage

def test_greeting_is_answered_directly(agent, scripted_model, db, emu):
    scripted_model.reply("Hello! Ask me about your data.")
    response = agent.predict(ask("hi there"))
    custom = response["custom_outputs"]
    assert texts(response) == ["Hello! Ask me about your data."]
    assert [item["type"] for item in response["output"]] == ["message"]
    item = response["output"][0]
    assert item["role"] == "assistant" and item["id"] and item["content"][0]["annotations"] == []
    assert len(custom["thread_id"]) == 32 and custom["turn"] == 1 and custom["run_ids"] == []
    assert stored(db, custom["thread_id"]) == [{"role": "user", "content": "hi there"},
                                               {"role": "assistant", "content": "Hello! Ask me about your data."}]
    sent = scripted_model.requests[0].body
    assert sent["messages"][0] == {"role": "system", "content": primary.SYSTEM_PROMPT}
    assert {t["function"]["name"] for t in sent["tools"]} == {
        "start_databricks_job", "poll_databricks_job", "terminate_databricks_job"}
    assert not emu.calls("POST", "/api/2.2/jobs/run-now")


def test_data_question_starts_a_job_and_the_turn_ends_there(agent, scripted_model, db, emu, w, job_id):
    # one scripted response: a second model call in this turn would fail the test
    response, run_id = start(agent, scripted_model, "total revenue in 2025", thread="t-data")
    assert [item["type"] for item in response["output"]] == ["function_call", "function_call_output", "message"]
    call, result, reply = response["output"]
    assert call["name"] == "start_databricks_job" and json.loads(call["arguments"]) == {
        "request": "total revenue in 2025"}
    assert result["call_id"] == call["call_id"] and json.loads(result["output"])["run_id"] == run_id
    url = f"{emu.url}/?o=1#job/{job_id}/run/{run_id}"
    assert f"run {run_id} ({url})" in reply["content"][0]["text"]
    assert response["custom_outputs"] == {"thread_id": "t-data", "turn": 1, "run_ids": [run_id],
                                          "delivered_run_ids": []}
    run = w.jobs.get_run(int(run_id))
    assert {p.name: p.value for p in run.job_parameters} == {"request": "total revenue in 2025",
                                                             "thread_id": "t-data", "asked_by": ""}  # anonymous
    messages = stored(db, "t-data")
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"]
    assert messages[3]["content"] == reply["content"][0]["text"]
    with db.connection() as conn:
        assert lakebase.find_run(conn, "t-data", run_id=run_id)["request"] == "total revenue in 2025"


def test_the_next_turn_polls_the_answer_in_another_process(agent, scripted_model, db, w, job_id, pg_dsn, chat):
    _, run_id = start(agent, scripted_model, "[steps] revenue by region", thread="t-next")
    wait_ended(w, run_id)
    # a second agent with its own pool and clients, as another serving replica or a restart would have
    pool = open_db(pg_dsn)
    try:
        other = PrimaryAgent(llm.openai_chat(scripted_model.base_url, "m"), w, pool, job_id)
        scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).reply("Revenue: 42.")
        response = other.predict(ask("is it done?", "t-next"))
        report = json.loads(last_tool_result(scripted_model))
        sent = scripted_model.requests[-2].body["messages"]
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user",
                                             "assistant", "tool"]  # the run's outcome, handed over unasked
        scripted_model.reply("You're welcome!")
        again = other.predict(ask("thanks", "t-next"))
    finally:
        pool.close()
    assert texts(response) == ["Revenue: 42."] and texts(again) == ["You're welcome!"]
    assert response["custom_outputs"] == {"thread_id": "t-next", "turn": 2, "run_ids": [],
                                          "delivered_run_ids": [run_id]}
    assert again["custom_outputs"]["turn"] == 3
    assert report["state"] == "TERMINATED SUCCESS" and report["steps"] == 4
    assert report["answer"] == "Answer to: [steps] revenue by region"
    assert report["run_page_url"].endswith(f"/run/{run_id}")
    assert report["recent_steps"][0].startswith("#1 started: [steps] revenue")
    assert report["recent_steps"][2] == "#3 query_genie answered in 1.2 s: Genie: 42 Rows (1): 42"
    assert len(stored(db, "t-next")) == 4 + 6 + 2


def test_poll_of_a_running_run_and_of_a_failed_run(agent, scripted_model, w):
    _, slow = start(agent, scripted_model, "[slow] churn by month", thread="t-poll")
    wait_for(lambda: w.jobs.get_run(int(slow)).state.life_cycle_state.value == "RUNNING", "the run to run")
    scripted_model.call_tool("poll_databricks_job", {"run_id": int(slow)}).reply("Still running.")
    agent.predict(ask("how is it going?", "t-poll"))
    running = json.loads(last_tool_result(scripted_model))
    assert running["state"] == "RUNNING" and "answer" not in running and "error" not in running
    _, failed = start(agent, scripted_model, "[fail] margin by product", thread="t-poll")
    wait_ended(w, failed)
    scripted_model.call_tool("poll_databricks_job", {"run_id": failed}).reply("It failed.")
    agent.predict(ask("and the other one?", "t-poll"))
    report = json.loads(last_tool_result(scripted_model))
    assert report["state"] == "TERMINATED FAILED" and "Workload failed" in report["state_message"]
    assert report["error"] == "Genie could not answer: the table sales is missing" and report["steps"] == 2
    assert "answer" not in report and "note" not in report  # the failed step says why: no need of the output


def poll(agent, scripted_model, run_id, thread):
    """The report poll_databricks_job gives the model, as a dict."""
    scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).reply("Here is what I know.")
    agent.predict(ask(f"how is run {run_id}?", thread))
    return json.loads(last_tool_result(scripted_model))


@pytest.mark.parametrize("omitted", [(), ("state",), ("status",), ("state", "status")])
def test_poll_reads_status_first_then_state_and_says_why_a_run_is_queued(agent, scripted_model, emu, w, db, chat,
                                                                         omitted):
    one_slot = PrimaryAgent(chat, w, db, emu.add_job(step_job(max_concurrent_runs=1)))
    _, slow = start(one_slot, scripted_model, "[slow] all orders ever", thread="t-queue")
    _, queued = start(one_slot, scripted_model, "orders by month", thread="t-queue")
    _, done = start(agent, scripted_model, "[steps] revenue", thread="t-done")
    wait_ended(w, done)
    emu.omitted_run_fields = set(omitted)  # as a Jobs API that sends only one of them (or neither) would
    report = poll(one_slot, scripted_model, queued, "t-queue")
    if len(omitted) == 2:  # nothing to read the state from: said so, and no crash
        assert report["state"] == "UNKNOWN" and "queued" not in report and report["steps"] == 0
    else:
        reason = "Queued due to reaching maximum concurrent runs of 1."
        assert report["state"] == "QUEUED" and report["steps"] == 0
        assert report["queued"] == (reason if omitted == ("status",) else f"MAX_CONCURRENT_RUNS_REACHED: {reason}")
    report = poll(agent, scripted_model, done, "t-done")
    assert report["state"] == ("UNKNOWN" if len(omitted) == 2 else "TERMINATED SUCCESS")
    assert report["answer"] == "Answer to: [steps] revenue" and report["steps"] == 4
    w.jobs.cancel_run(int(slow))


def test_a_run_cancelled_before_its_worker_logged_anything_reads_as_cancelled(agent, scripted_model, emu, w, db,
                                                                               chat):
    one_slot = PrimaryAgent(chat, w, db, emu.add_job(step_job(max_concurrent_runs=1)))
    _, slow = start(one_slot, scripted_model, "[slow] all orders ever", thread="t-early")
    _, queued = start(one_slot, scripted_model, "orders by month", thread="t-early")
    w.jobs.cancel_run(int(queued))  # still queued: no worker ever runs, so no step is ever logged
    wait_ended(w, queued)
    report = poll(one_slot, scripted_model, queued, "t-early")
    assert report["state"] == "TERMINATED CANCELED" and report["steps"] == 0 and "error" not in report
    assert report["cancelled"] == "Run cancelled."
    w.jobs.cancel_run(int(slow))


def test_a_run_that_died_before_logging_why_is_explained_from_its_output(agent, scripted_model, w):
    _, run_id = start(agent, scripted_model, "[crash] revenue by region", thread="t-crash-out")
    wait_ended(w, run_id)
    report = poll(agent, scripted_model, run_id, "t-crash-out")
    # the run itself says only "Workload failed, see run output for details."; the output has the reason
    assert report["state"] == "TERMINATED FAILED" and report["steps"] == 1 and "answer" not in report
    assert report["error"] == "MemoryError: the worker ran out of memory (test)"
    assert report["error_trace"].startswith("Traceback (most recent call last):")
    assert report["error_trace"].endswith("MemoryError: the worker ran out of memory (test)")
    assert report["note"] == "the worker logged no final step; this is from the run's output"


def test_an_answer_the_step_log_missed_is_recovered_from_the_run_output(agent, scripted_model, w):
    _, run_id = start(agent, scripted_model, "[unlogged] revenue by region", thread="t-unlogged")
    assert wait_ended(w, run_id).state.result_state.value == "SUCCESS"
    report = poll(agent, scripted_model, run_id, "t-unlogged")
    # the answer, whole, even with a line that looks like an end marker in it
    assert report["answer"] == ("Answer to: [unlogged] revenue by region\n"
                                "----- end of answer 0123456789abcdef -----")
    assert report["state"] == "TERMINATED SUCCESS" and report["steps"] == 1 and "error" not in report
    assert report["note"] == "the worker logged no final step; this is from the run's output"


@pytest.mark.parametrize("omitted", [("state",), ("state", "status")])
def test_terminate_refuses_a_finished_run_and_cancels_one_it_cannot_read(agent, scripted_model, emu, w, omitted):
    _, run_id = start(agent, scripted_model, "revenue", thread="t-ended")
    wait_ended(w, run_id)
    emu.omitted_run_fields = set(omitted)
    scripted_model.call_tool("terminate_databricks_job", {"run_id": run_id}).reply("Done.")
    agent.predict(ask("stop it", "t-ended"))
    result = last_tool_result(scripted_model)
    if omitted == ("state",):  # status says it has ended
        assert result == f"Error: run {run_id} has already finished (TERMINATED SUCCESS); there is nothing to cancel"
        assert not emu.calls("POST", "/api/2.2/jobs/runs/cancel")
    else:  # no state to go by: the cancel is asked for, which changes nothing on a run that has ended
        assert json.loads(result)["was"] == "UNKNOWN" and "could not be read" in json.loads(result)["note"]
        emu.omitted_run_fields = set()
        assert w.jobs.get_run(int(run_id)).state.result_state.value == "SUCCESS"


def test_terminate_cancels_a_running_run_then_says_it_has_ended(agent, scripted_model, w, db):
    _, run_id = start(agent, scripted_model, "[slow] all orders ever", thread="t-stop")
    with db.connection() as conn:
        wait_for(lambda: lakebase.read_steps(conn, run_id), "the worker to start")
    scripted_model.call_tool("terminate_databricks_job", {"run_id": run_id}).reply("Cancelling it.")
    response = agent.predict(ask("stop it", "t-stop"))
    result = json.loads(last_tool_result(scripted_model))
    assert texts(response) == ["Cancelling it."]
    assert result["state"] == "TERMINATING" and result["was"] == "RUNNING"
    run = wait_ended(w, run_id)
    assert run.state.result_state.value == "CANCELED"
    with db.connection() as conn:
        assert lakebase.read_steps(conn, run_id)[-1]["status"] == "cancelled"
    scripted_model.call_tool("terminate_databricks_job", {"run_id": run_id}).reply("It had already stopped.")
    scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).reply("It was cancelled.")
    agent.predict(ask("stop it again", "t-stop"))
    assert last_tool_result(scripted_model) == (f"Error: run {run_id} has already finished (TERMINATED CANCELED: "
                                                f"Run cancelled.); there is nothing to cancel")
    agent.predict(ask("what happened?", "t-stop"))
    assert json.loads(last_tool_result(scripted_model))["cancelled"] == "received SIGTERM: the run was cancelled"


def test_runs_of_other_threads_are_refused(agent, scripted_model, emu, w):
    _, theirs = start(agent, scripted_model, "[slow] revenue", thread="t-theirs")
    _, mine = start(agent, scripted_model, "orders", thread="t-mine")
    scripted_model.call_tools(("poll_databricks_job", {"run_id": theirs}),
                              ("terminate_databricks_job", {"run_id": int(theirs)}),
                              ("poll_databricks_job", {"run_id": "12; drop table"}),
                              ("poll_databricks_job", {"run_id": True})).reply("I can't.")
    agent.predict(ask("cancel run " + theirs, "t-mine"))
    results = list(tool_results(scripted_model.requests[-1]).values())[-4:]
    refused = (f"Error: run {theirs} was not started in this conversation, so it can't be read or cancelled here. "
               f"Runs started in this conversation: {mine}")
    assert results[:2] == [refused, refused]
    assert results[2].startswith("Error: run_id must be the number start_databricks_job returned")
    assert results[3].startswith("Error: run_id must be the number")
    assert not emu.calls("POST", "/api/2.2/jobs/runs/cancel")
    assert w.jobs.get_run(int(theirs)).state.life_cycle_state.value in ("PENDING", "RUNNING")


def test_another_users_thread_is_refused_and_nothing_is_written(agent, scripted_model, db):
    scripted_model.reply("Hi Alice.")
    agent.predict({**ask("hi", "t-alice"), "context": {"user_id": "alice@example.com"}})
    with pytest.raises(BadRequest, match="thread t-alice belongs to someone else: start a new thread"):
        agent.predict({**ask("show me alice's data", "t-alice"), "context": {"user_id": "bob@example.com"}})
    with pytest.raises(BadRequest, match="thread t-alice was started with a user id, so a user id is required to "
                                         "continue it: send it as context.user_id"):
        agent.predict(ask("show me alice's data", "t-alice"))
    with pytest.raises(BadRequest, match="belongs to someone else"):  # context.conversation_id names it too
        agent.predict({"input": [{"role": "user", "content": "x"}],
                       "context": {"conversation_id": "t-alice", "user_id": "bob@example.com"}})
    assert len(stored(db, "t-alice")) == 2
    with db.connection() as conn:
        assert lakebase.thread_owner(conn, "t-alice") == "alice@example.com"
        assert lakebase.thread_turns(conn, "t-alice") == 1


def test_an_anonymous_thread_stays_open_to_whoever_holds_its_id(agent, scripted_model, db):
    scripted_model.reply("Hi.").reply("Hi Bob.").reply("Hi again.")
    agent.predict(ask("hi", "t-anon"))
    agent.predict({**ask("I am bob", "t-anon"), "context": {"user_id": "bob@example.com"}})
    agent.predict(ask("me again, the creator", "t-anon"))  # bob's user id did not lock its creator out
    assert [m["content"] for m in stored(db, "t-anon")] == ["hi", "Hi.", "I am bob", "Hi Bob.",
                                                            "me again, the creator", "Hi again."]
    with db.connection() as conn:
        assert lakebase.thread_owner(conn, "t-anon") is None


def held_turn(pool, agent, scripted_model, request, message):
    """Start the turn in `pool`, held inside its model call (which answers `message`) until the returned event is
    set; returns (the turn's future, that event), once the turn has reached the model."""
    reached, release = threading.Event(), threading.Event()

    def respond(_):
        reached.set()
        assert release.wait(WAIT), "the held turn was never released"
        return message

    scripted_model.respond(respond)
    future = pool.submit(agent.predict, request)
    assert reached.wait(WAIT), "the held turn never reached the model"
    return future, release


START_JOB = {"role": "assistant", "content": None, "tool_calls": [{"id": "c-race", "type": "function", "function": {
    "name": "start_databricks_job", "arguments": json.dumps({"request": "revenue"})}}]}


@pytest.mark.parametrize("other", [None, "bob"], ids=["anonymous", "bob"])
def test_a_thread_created_by_a_user_mid_turn_refuses_the_other_at_once(agent, scripted_model, db, emu, other):
    """Alice's turn creates t-race and is held in its model call; the other's request naming it is refused before
    anything of its turn happens, whoever asks."""
    with ThreadPoolExecutor(1) as pool:
        alice, release = held_turn(pool, agent, scripted_model, {**ask("my secret plan", "t-race"),
                                                                 "context": {"user_id": "alice"}}, "Noted, Alice.")
        refused = "a user id is required" if other is None else "belongs to someone else"
        with pytest.raises(BadRequest, match=refused):
            agent.predict({**ask("[slow] what is alice planning?", "t-race"), "context": {"user_id": other}})
        release.set()
        alice.result(WAIT)
    assert [m["content"] for m in stored(db, "t-race")] == ["my secret plan", "Noted, Alice."]
    assert not emu.calls("POST", "/api/2.2/jobs/run-now")
    with db.connection() as conn:
        assert lakebase.thread_owner(conn, "t-race") == "alice"


@pytest.mark.parametrize("other", [None, "bob"], ids=["anonymous", "bob"])
def test_a_thread_created_first_by_the_other_keeps_its_owner_and_its_run(agent, scripted_model, db, emu, w, other):
    """The other's turn creates t-race and is held in its model call (which then starts a job); Alice names t-race
    meanwhile: she may continue an anonymous thread (it stays anonymous), and is refused bob's. The job the held
    turn starts is recorded in t-race either way."""
    with ThreadPoolExecutor(1) as pool:
        first, release = held_turn(pool, agent, scripted_model, {**ask("revenue?", "t-race"),
                                                                 "context": {"user_id": other}}, START_JOB)
        alice = {**ask("hi, it's alice", "t-race"), "context": {"user_id": "alice"}}
        if other is None:
            scripted_model.reply("Hi Alice.")
            agent.predict(alice)
        else:
            with pytest.raises(BadRequest, match="thread t-race belongs to someone else"):
                agent.predict(alice)
        release.set()
        run_ids = first.result(WAIT)["custom_outputs"]["run_ids"]
    with db.connection() as conn:
        assert lakebase.thread_owner(conn, "t-race") == other
        assert [run["run_id"] for run in lakebase.list_runs(conn, "t-race")] == run_ids
    assert len(run_ids) == len(emu.calls("POST", "/api/2.2/jobs/run-now")) == 1
    contents = [m["content"] for m in stored(db, "t-race") if m["role"] == "user"]
    assert sorted(contents) == (["hi, it's alice", "revenue?"] if other is None else ["revenue?"])


def test_a_job_started_in_a_new_thread_is_owned_at_once(agent, scripted_model, db, emu):
    scripted_model.call_tool("start_databricks_job", {"request": "revenue"})
    with db.connection() as conn:  # the turn's own write fails; the run record already made the thread Alice's
        refuse_inserts(conn, "thread_messages", "disk full (test)")
    with pytest.raises(TurnFailed, match="the database failed and nothing was stored: disk full") as failed:
        agent.predict({**ask("revenue?", "t-own"), "context": {"user_id": "alice"}})
    # the run goes on, recorded for the thread: the user is told which it is
    assert re.search(r"Job run (\d+) had already started and keeps going: ask about run \1 later", str(failed.value))
    [run_now] = emu.calls("POST", "/api/2.2/jobs/run-now")  # who asked, as the request named them
    assert run_now.body["job_parameters"] == {"request": "revenue", "thread_id": "t-own", "asked_by": "alice"}
    with pytest.raises(BadRequest, match="belongs to someone else"):
        agent.predict({**ask("revenue?", "t-own"), "context": {"user_id": "mallory"}})
    assert stored(db, "t-own") == []


def test_a_verified_caller_gets_no_job_when_no_genie_space_is_configured_to_check(agent, scripted_model, emu, w):
    scripted_model.call_tool("start_databricks_job", {"request": "revenue"}).reply("I can't.")
    agent.predict(ask("revenue?", "t-nospace"), caller=primary.Caller("ada@example.com", w))
    assert last_tool_result(scripted_model) == ("Error: no Genie space is configured (GENIE_SPACE_ID), so ada@example"
                                                ".com's access to it can't be checked and no job was started")
    assert not emu.calls("POST", "/api/2.2/jobs/run-now")


# ------------------------------------------------------------------ runs that end between turns

def news_sent(request):
    """The poll results a model request carried after the user's message, unasked: {run id: report}."""
    messages = request.body["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    reports = [json.loads(m["content"]) for m in messages[last_user + 1:] if m["role"] == "tool"]
    return {r["run_id"]: r for r in reports if r.get("unasked")}


def run_for(w, db, job_id, thread_id, request) -> str:
    """A run of the thread started as the agent starts one, outside a turn (so no turn hears of it early)."""
    run_id = str(w.jobs.run_now(job_id, job_parameters={"request": request, "thread_id": thread_id}).run_id)
    with db.connection() as conn:
        lakebase.record_run(conn, thread_id, run_id, f"key {run_id}", request)
    return run_id


def delivered_turns(db, thread_id):
    with db.connection() as conn:
        return dict(conn.execute("select run_id, delivered_turn from thread_runs where thread_id = %s",
                                 (thread_id,)).fetchall())


def test_a_run_that_ended_between_turns_is_told_once_whatever_the_user_says(agent, scripted_model, db, w, job_id):
    scripted_model.reply("Hi.")
    agent.predict(ask("hi", "t-news"))
    done, failed, slow = (run_for(w, db, job_id, "t-news", request)
                          for request in ("revenue by region", "[fail] margin", "[slow] churn"))
    wait_ended(w, done), wait_ended(w, failed)
    scripted_model.reply("You're welcome! Also: run 1 answered, run 2 failed.")
    response = agent.predict(ask("thanks", "t-news"))
    news = news_sent(scripted_model.requests[-1])
    assert set(news) == {done, failed}, news
    assert news[done]["answer"] == "Answer to: revenue by region" and news[done]["state"] == "TERMINATED SUCCESS"
    assert news[failed]["error"] == "Genie could not answer: the table sales is missing"
    assert [item["type"] for item in response["output"]] == ["function_call"] * 2 + ["function_call_output"] * 2 + [
        "message"]
    assert response["custom_outputs"]["delivered_run_ids"] == [done, failed]
    assert delivered_turns(db, "t-news") == {done: 2, failed: 2, slow: None}

    scripted_model.reply("Sure.")
    again = agent.predict(ask("ok", "t-news"))  # told once: not again
    assert news_sent(scripted_model.requests[-1]) == {} and again["custom_outputs"]["delivered_run_ids"] == []
    assert scripted_model.requests[-1].body["messages"][-1] == {"role": "user", "content": "ok"}


def test_a_run_that_ended_between_turns_is_told_once_when_streaming(agent, scripted_model, db, w):
    _, run_id = start(agent, scripted_model, "orders by month", thread="t-news-stream")
    wait_ended(w, run_id)
    scripted_model.reply("Hello! Your orders-by-month job has finished: ...")
    events = list(agent.predict_stream(ask("hello", "t-news-stream")))
    assert set(news_sent(scripted_model.requests[-1])) == {run_id}
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [(i["type"], i.get("name")) for i in items] == [("function_call", "poll_databricks_job"),
                                                         ("function_call_output", None), ("message", None)]
    assert json.loads(items[1]["output"])["answer"] == "Answer to: orders by month"
    assert events[-1]["custom_outputs"]["delivered_run_ids"] == [run_id]
    scripted_model.reply("Hi again.")
    events = list(agent.predict_stream(ask("hello again", "t-news-stream")))
    assert news_sent(scripted_model.requests[-1]) == {} and events[-1]["custom_outputs"]["delivered_run_ids"] == []
    assert delivered_turns(db, "t-news-stream") == {run_id: 2}


def test_news_reads_a_few_runs_per_turn_and_a_poll_counts_as_telling(agent, scripted_model, db, w, emu, job_id):
    started = [run_for(w, db, job_id, "t-many", f"question {i}") for i in range(5)]
    for run_id in started:
        wait_ended(w, run_id)
    reads = len(emu.calls("GET", "/api/2.2/jobs/runs/get"))
    scripted_model.call_tool("poll_databricks_job", {"run_id": started[4]}).reply("Here are four of them.")
    response = agent.predict(ask("what's new?", "t-many"))
    assert list(news_sent(scripted_model.requests[-2])) == started[:primary.MAX_DELIVERIES]  # oldest first
    assert len(emu.calls("GET", "/api/2.2/jobs/runs/get")) - reads == primary.MAX_DELIVERIES + 1  # + the poll
    assert response["custom_outputs"]["delivered_run_ids"] == [*started[:primary.MAX_DELIVERIES], started[4]]
    scripted_model.reply("The last one too.")
    agent.predict(ask("and?", "t-many"))
    assert list(news_sent(scripted_model.requests[-1])) == [started[3]]


def test_a_failing_jobs_api_delays_the_news_but_not_the_turn(agent, scripted_model, db, w, emu):
    _, run_id = start(agent, scripted_model, "revenue", thread="t-news-fault")
    wait_ended(w, run_id)
    emu.inject("GET", "/api/2.2/jobs/runs/get", 500, "INTERNAL_ERROR", "the Jobs API is down")
    scripted_model.reply("Hi.")
    response = agent.predict(ask("hi", "t-news-fault"))
    assert texts(response) == ["Hi."] and response["custom_outputs"]["delivered_run_ids"] == []
    assert news_sent(scripted_model.requests[-1]) == {}
    scripted_model.reply("Hi, and your job has finished.")
    response = agent.predict(ask("hi again", "t-news-fault"))  # the next turn tells it
    assert set(news_sent(scripted_model.requests[-1])) == {run_id}
    assert response["custom_outputs"]["delivered_run_ids"] == [run_id]


def test_a_run_the_jobs_api_no_longer_has_does_not_hold_back_later_news(agent, scripted_model, db, w, job_id):
    with db.connection() as conn:  # recorded, then gone: its job deleted, or past the Jobs API's retention
        lakebase.record_run(conn, "t-gone", "987654321", "key gone", "revenue last year")
    run_id = run_for(w, db, job_id, "t-gone", "revenue by region")
    wait_ended(w, run_id)
    scripted_model.reply("Hi, and your job has finished.")
    response = agent.predict(ask("hi", "t-gone"))
    news = news_sent(scripted_model.requests[-1])
    assert set(news) == {"987654321", run_id}  # the gone one said as such, once
    assert news["987654321"]["error"].startswith("the Jobs API no longer has this run")
    assert response["custom_outputs"]["delivered_run_ids"] == ["987654321", run_id]
    scripted_model.reply("Anything else?")
    assert agent.predict(ask("thanks", "t-gone"))["custom_outputs"]["delivered_run_ids"] == []


def test_a_job_started_while_news_arrives_says_the_news_in_its_reply(agent, scripted_model, db, w):
    _, first = start(agent, scripted_model, "revenue by region", thread="t-news-start")
    wait_ended(w, first)
    response, second = start(agent, scripted_model, "orders by month", thread="t-news-start")
    reply = texts(response)[-1]
    assert reply.startswith(f"I've started a job to answer this: run {second}") and "a minute or two" not in reply
    assert f"Run {first} has finished. Its answer:\nAnswer to: revenue by region" in reply, reply
    assert response["custom_outputs"]["delivered_run_ids"] == [first]


# ------------------------------------------------------------------ idempotency

def test_a_retried_request_id_starts_one_run(agent, scripted_model, emu, w, job_id):
    request = ask("revenue by month, please", "t-retry")
    request["custom_inputs"]["request_id"] = "req-17"
    scripted_model.call_tool("start_databricks_job", {"request": "revenue by month"})
    first = agent.predict(request)
    # the model words the request differently on the retry: the request id still makes it the same run
    scripted_model.call_tool("start_databricks_job", {"request": "monthly revenue"})
    again = agent.predict(request)
    run_ids = first["custom_outputs"]["run_ids"]
    assert again["custom_outputs"]["run_ids"] == run_ids
    assert [r.run_id for r in w.jobs.list_runs(job_id=job_id)] == [int(run_ids[0])]
    assert len(emu.calls("POST", "/api/2.2/jobs/run-now")) == 1  # the thread's run record answered the retry


def test_a_retried_request_id_stores_the_turn_once(agent, scripted_model, db):
    request = ask("hi", "t-stored-once")
    request["custom_inputs"]["request_id"] = "req-5"
    scripted_model.reply("Hello!").reply("Hello again!").reply("Hi.")
    first = agent.predict(request)
    again = agent.predict(request)  # its response was lost, say: the client sends it again
    assert first["custom_outputs"]["turn"] == again["custom_outputs"]["turn"] == 1
    assert [m["content"] for m in stored(db, "t-stored-once")] == ["hi", "Hello!"]
    request["custom_inputs"]["request_id"] = "req-6"  # another request: another turn
    assert agent.predict(request)["custom_outputs"]["turn"] == 2
    assert [m["content"] for m in stored(db, "t-stored-once")] == ["hi", "Hello!", "hi", "Hi."]


def test_a_retry_after_a_failed_turn_starts_no_second_run(agent, scripted_model, db, emu, w, job_id):
    with db.connection() as conn:
        refuse_inserts(conn, "thread_messages", "connection lost (test)")
    scripted_model.call_tool("start_databricks_job", {"request": "top products"})
    with pytest.raises(TurnFailed, match="nothing was stored"):
        agent.predict(ask("top products?", "t-again"))
    with db.connection() as conn:
        conn.execute("drop trigger refuse on thread_messages")
    assert stored(db, "t-again") == []
    _, run_id = start(agent, scripted_model, "top products", thread="t-again")
    assert [str(r.run_id) for r in w.jobs.list_runs(job_id=job_id)] == [run_id]
    assert len(emu.calls("POST", "/api/2.2/jobs/run-now")) == 1


def test_a_crash_between_run_now_and_record_run_starts_no_second_run(agent, scripted_model, db, w, job_id):
    with db.connection() as conn:  # the run starts, then recording it fails: the Jobs API's token covers it
        refuse_inserts(conn, "thread_runs", "crash (test)")
    scripted_model.call_tool("start_databricks_job", {"request": "customers by segment"})
    with pytest.raises(TurnFailed, match="crash"):
        agent.predict(ask("customers by segment?", "t-crash"))
    assert len(list(w.jobs.list_runs(job_id=job_id))) == 1
    with db.connection() as conn:
        conn.execute("drop trigger refuse on thread_runs")
    _, run_id = start(agent, scripted_model, "customers by segment", thread="t-crash")
    assert [str(r.run_id) for r in w.jobs.list_runs(job_id=job_id)] == [run_id]


# ------------------------------------------------------------------ job errors the user must act on

@pytest.mark.parametrize("fault, expected", [
    ((403, "PERMISSION_DENIED", "no CAN_MANAGE_RUN"), "permission denied (no CAN_MANAGE_RUN): the identity the "
                                                     "agent runs as needs CAN_MANAGE_RUN on the job"),
    ((401, "UNAUTHENTICATED", "bad token"), "not authenticated (bad token): the identity the agent runs as needs"),
    ((429, "REQUEST_LIMIT_EXCEEDED", "too many"), "too many job runs at the moment; try again in a few minutes"),
    (None, "job 999 does not exist: check DATABRICKS_JOB_ID"),
])
def test_job_errors_go_to_the_model_with_the_fix(fault, expected, chat, scripted_model, emu, db):
    job = 999
    if fault:
        job = emu.add_job(step_job())
        emu.inject("POST", "/api/2.2/jobs/run-now", *fault, times=None, retry_after=1)
    agent = PrimaryAgent(chat, workspace(emu, retry_timeout=2), db, job)
    scripted_model.call_tool("start_databricks_job", {"request": "revenue"}).reply("I could not start it.")
    response = agent.predict(ask("revenue?", "t-err"))
    assert expected in last_tool_result(scripted_model)
    assert texts(response) == ["I could not start it."] and response["custom_outputs"]["run_ids"] == []
    assert len(stored(db, "t-err")) == 4


def test_one_turn_starts_at_most_max_starts_jobs(agent, scripted_model, emu):
    questions = [f"revenue in 20{year}" for year in range(20, 25)]
    scripted_model.call_tools(*[("start_databricks_job", {"request": q}, f"c{i}") for i, q in enumerate(questions)])
    response = agent.predict(ask("revenue for each year since 2020"))
    run_ids = response["custom_outputs"]["run_ids"]
    assert len(run_ids) == primary.MAX_STARTS == len(emu.calls("POST", "/api/2.2/jobs/run-now")) == 3
    refused = [item["output"] for item in response["output"] if item["type"] == "function_call_output"][3:]
    assert len(refused) == 2 and all("already started 3 jobs, the most one turn may start" in r for r in refused)
    assert all(f"run {run_id}" in texts(response)[-1] for run_id in run_ids)


def test_a_bad_job_request_goes_back_to_the_model(agent, scripted_model, emu):
    scripted_model.call_tools(("start_databricks_job", {"request": "  "}),
                              ("start_databricks_job", {"request": "x" * 20_001}),
                              ("start_databricks_job", {})).reply("Let me rephrase.")
    agent.predict(ask("revenue?", "t-badjob"))
    results = list(tool_results(scripted_model.requests[-1]).values())
    assert results[0] == "Error: request must be the user's data question, as a non-empty string"
    assert results[1] == ("Error: the request has 20,001 characters; a job takes at most 20,000: restate it more "
                          "briefly")
    assert results[2].startswith("Error: start_databricks_job got missing required argument(s) request")
    assert not emu.calls("POST", "/api/2.2/jobs/run-now")


# ------------------------------------------------------------------ bounds and failures

def test_the_loop_bound_answers_clearly_and_is_stored(chat, w, db, job_id, scripted_model):
    agent = PrimaryAgent(chat, w, db, job_id, max_calls=2)
    scripted_model.call_tool("poll_databricks_job", {"run_id": "1"}).call_tool("poll_databricks_job", {"run_id": "2"})
    response = agent.predict(ask("status?", "t-limit"))
    assert texts(response) == ["I could not finish this within 2 steps. Please ask again, perhaps more narrowly."]
    assert [m["role"] for m in stored(db, "t-limit")] == ["user", "assistant", "tool", "assistant", "tool",
                                                          "assistant"]


def test_a_failing_model_raises_and_stores_nothing(agent, scripted_model, db):
    scripted_model.fault(401, body={"error_code": "UNAUTHENTICATED", "message": "bad token"})
    with pytest.raises(TurnFailed, match="the chat model failed and nothing was stored: .*HTTP 401.*bad token"):
        agent.predict(ask("hi", "t-down"))
    assert stored(db, "t-down") == []  # the thread's id stays claimed by whoever named it first
    with db.connection() as conn:
        assert lakebase.thread_turns(conn, "t-down") == 0


def test_a_database_that_is_gone_raises_a_clear_error(chat, w, job_id, pg_server, scripted_model):
    dsn = pg_server.fresh_database()
    pool = lakebase.open_pool(lakebase.LakebaseConfig(dsn=dsn), timeout=2)
    try:
        pg_server.drop_database(dsn)  # its sessions are terminated, and no new one can start
        with pytest.raises(TurnFailed, match="the database failed and nothing was stored: .*Check that Postgres"):
            PrimaryAgent(chat, w, pool, job_id).predict(ask("hi"))
    finally:
        pool.close()


# ------------------------------------------------------------------ context window and history

def test_the_window_keeps_tool_calls_and_results_paired(chat, w, db, job_id, scripted_model):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "poll_databricks_job", "arguments": "{}"}}
             for i in (1, 2)]
    turn = [{"role": "user", "content": "first"}, {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "r1"}, {"role": "tool", "tool_call_id": "c2",
                                                                      "content": "r2"},
            {"role": "assistant", "content": "done"}]
    for window in range(1, 9):
        with db.connection() as conn:
            lakebase.append_turn(conn, f"t-win{window}", turn)
            lakebase.append_turn(conn, f"t-win{window}", [{"role": "user", "content": "second"},
                                                          {"role": "assistant", "content": "ok"}])
        scripted_model.reply(f"w{window}")
        PrimaryAgent(chat, w, db, job_id, window=window).predict(ask("next", f"t-win{window}"))
        sent = scripted_model.requests[-1].body["messages"][1:-1]
        assert not sent or sent[0]["role"] == "user", (window, sent)
        ids = [c["id"] for m in sent for c in m.get("tool_calls", [])]
        assert ids == [m["tool_call_id"] for m in sent if m["role"] == "tool"], (window, sent)
        # the window starts at the last user message it reaches: "second" (2..6), or "first" (7 and more); with
        # none among its messages, the latest user message before them leads: "second" before "ok" (1)
        assert len(sent) == {7: 7, 8: 7}.get(window, 2), (window, sent)
    assert sent[0]["content"] == "first" and sent[-1]["content"] == "ok"


def test_input_history_seeds_a_new_thread_only(agent, scripted_model, db):
    request = {"input": [
        {"role": "system", "content": "ignored: we have our own"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "my name is Ada"}]},
        {"type": "message", "id": "m1", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hi Ada", "annotations": []}]},
        {"type": "function_call", "id": "f1", "call_id": "x1", "name": "poll_databricks_job", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "x1", "output": "{}"},
        {"role": "user", "content": "what is my name?"}], "context": {"conversation_id": "t-seed"}}
    scripted_model.reply("Ada.")
    assert agent.predict(request)["custom_outputs"]["thread_id"] == "t-seed"
    assert [m["content"] for m in scripted_model.requests[0].body["messages"][1:]] == [
        "my name is Ada", "Hi Ada", "what is my name?"]
    # an existing thread: only the last user message is new, whatever history the client resends
    request["input"][-1] = {"role": "user", "content": "and again?"}
    request["input"].insert(1, {"role": "user", "content": "not stored"})
    scripted_model.reply("Still Ada.")
    agent.predict(request)
    assert [m["content"] for m in stored(db, "t-seed")] == [
        "my name is Ada", "Hi Ada", "what is my name?", "Ada.", "and again?", "Still Ada."]


def test_seeded_history_is_bounded_by_the_window(agent, scripted_model, db):
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(1_000)]
    scripted_model.reply("ok")
    agent.predict({"input": [*history, {"role": "user", "content": "and now?"}],
                   "context": {"conversation_id": "t-big"}})
    sent = [m["content"] for m in scripted_model.requests[0].body["messages"][1:]]
    assert sent == [f"m{i}" for i in range(960, 1_000)] + ["and now?"]
    assert len(stored(db, "t-big")) == primary.DEFAULT_WINDOW + 2  # not the 1,002 rows of the whole history


def test_system_and_developer_messages_are_the_turns_instructions(agent, scripted_model, db):
    request = {"input": [{"role": "system", "content": "Answer in French."},
                         {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}]},
                         {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
                         {"role": "user", "content": "hi"}], "custom_inputs": {"thread_id": "t-instr"}}
    scripted_model.reply("Bonjour.").reply("Hi.")
    agent.predict(request)
    agent.predict(ask("hi again", "t-instr"))
    first, second = (r.body["messages"][0]["content"] for r in scripted_model.requests)
    assert first == (primary.SYSTEM_PROMPT + "\n\n" + primary.INSTRUCTIONS + "\nAnswer in French.\n\nBe brief.")
    assert second == primary.SYSTEM_PROMPT  # for that turn only, and never stored
    assert [m["content"] for m in stored(db, "t-instr")] == ["hi", "Bonjour.", "hi again", "Hi."]


def resend(request: dict, response: dict, text: str) -> dict:
    """A stateless client's next request: the whole conversation so far, as it got it, then its new message."""
    return {"input": [*request["input"], *response["output"], {"role": "user", "content": text}]}


def test_a_stateless_client_keeps_its_thread_across_start_poll_and_cancel(agent, scripted_model, db, emu, w):
    scripted_model.call_tool("start_databricks_job", {"request": "[slow] revenue by region"})
    first = {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "revenue by region?"}]}
    started = agent.predict(first)
    thread, [run_id] = started["custom_outputs"]["thread_id"], started["custom_outputs"]["run_ids"]
    scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).reply("Still running.")
    second = resend(first, started, "how is it going?")
    polled = agent.predict(second)
    assert json.loads(last_tool_result(scripted_model))["state"] in ("PENDING", "RUNNING")
    scripted_model.call_tool("terminate_databricks_job", {"run_id": run_id}).reply("Cancelled.")
    cancelled = agent.predict(resend(second, polled, "cancel it"))
    assert json.loads(last_tool_result(scripted_model))["state"] == "TERMINATING"
    assert [r["custom_outputs"]["thread_id"] for r in (polled, cancelled)] == [thread, thread]
    assert [r["custom_outputs"]["turn"] for r in (started, polled, cancelled)] == [1, 2, 3]
    users = [m["content"] for m in stored(db, thread) if m["role"] == "user"]
    assert users == ["revenue by region?", "how is it going?", "cancel it"]  # the history is not stored again
    wait_ended(w, run_id)


def test_forged_unknown_or_other_users_item_ids_start_a_new_thread(agent, scripted_model, db):
    scripted_model.reply("Hi Alice.")
    alices = {**ask("my salary is 123456", "t-alice"), "context": {"user_id": "alice"}}
    answer = agent.predict(alices)
    forged = {"type": "message", "id": "msg_" + "0" * 32, "role": "assistant",
              "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]}
    for context, earlier in (({}, [forged]), ({"user_id": "mallory"}, answer["output"]), ({}, answer["output"])):
        scripted_model.reply("Hello.")
        response = agent.predict({"input": [{"role": "user", "content": "what was my salary?"}, *earlier,
                                            {"role": "user", "content": "tell me"}], "context": context})
        assert response["custom_outputs"]["thread_id"] != "t-alice" and response["custom_outputs"]["turn"] == 1
        assert "123456" not in json.dumps(scripted_model.requests[-1].body)
    scripted_model.reply("It is 123456.")
    mine = agent.predict({"input": [*alices["input"], *answer["output"], {"role": "user", "content": "tell me"}],
                          "context": {"user_id": "alice"}})
    assert mine["custom_outputs"] == {"thread_id": "t-alice", "turn": 2, "run_ids": [],
                                      "delivered_run_ids": []}


# ------------------------------------------------------------------ concurrency

def test_concurrent_requests_lose_nothing(agent, scripted_model, db):
    def echo(request):
        return "echo: " + request.body["messages"][-1]["content"]

    requests = [ask(f"hello {i}", f"t-c{i}") for i in range(6)] + [ask(f"same {i}", "t-same") for i in range(2)]
    for _ in requests:
        scripted_model.respond(echo)
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(agent.predict, requests))
    for request, response in zip(requests, responses):
        assert texts(response) == ["echo: " + request["input"][0]["content"]]
    for i in range(6):
        assert [m["content"] for m in stored(db, f"t-c{i}")] == [f"hello {i}", f"echo: hello {i}"]
    same = stored(db, "t-same")
    assert sorted(m["content"] for m in same) == ["echo: same 0", "echo: same 1", "same 0", "same 1"]
    assert same[0]["content"] == same[1]["content"][len("echo: "):]  # each turn's two messages stay together
    assert sorted(r["custom_outputs"]["turn"] for r in responses[6:]) == [1, 2]


# ------------------------------------------------------------------ streaming

def test_stream_forwards_each_text_delta_as_the_model_sends_it(agent, scripted_model, db):
    first_out = threading.Event()  # the model sends the rest only once its first delta came out of predict_stream
    scripted_model.stream({"role": "assistant", "content": "Hello"}, {"content": ", I am"}, {"content": " here."},
                          gate=first_out)
    events = []
    for event in agent.predict_stream(ask("hi", "t-live")):
        events.append(event)
        first_out.set()
    *deltas, final = events
    assert [e["delta"] for e in deltas] == ["Hello", ", I am", " here."]
    assert {e["item_id"] for e in deltas} == {final["item"]["id"]} and final["item"]["id"].startswith("msg_")
    assert final == {"type": "response.output_item.done", "item": {
        "type": "message", "id": final["item"]["id"], "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello, I am here.", "annotations": []}]},
        "custom_outputs": {"thread_id": "t-live", "turn": 1, "run_ids": [], "delivered_run_ids": []}}
    assert [m["content"] for m in stored(db, "t-live")] == ["hi", "Hello, I am here."]  # once, at the end
    scripted_model.ignores_stream = True  # a model (or a proxy) that answers whole: one delta, as the answer came
    scripted_model.reply("All at once.")
    delta, final = agent.predict_stream(ask("and again?", "t-live"))
    assert delta == {"type": "response.output_text.delta", "item_id": final["item"]["id"], "delta": "All at once."}


def test_stream_carries_tool_calls_and_results_as_they_happen(agent, scripted_model, db):
    _, run_id = start(agent, scripted_model, "[slow] revenue", thread="t-stream")  # still running next turn
    poll = {"tool_calls": [{"index": 0, "id": "call_p", "type": "function", "function": {
        "name": "poll_databricks_job", "arguments": json.dumps({"run_id": run_id})}}]}
    scripted_model.stream({"content": "Let me "}, {"content": "check."}, poll, finish_reason="tool_calls")
    scripted_model.reply("It is still running.")
    events = list(agent.predict_stream(ask("done?", "t-stream")))
    assert [(e["type"].removeprefix("response."), e.get("item", {}).get("type")) for e in events] == [
        ("output_text.delta", None), ("output_text.delta", None), ("output_item.done", "message"),
        ("output_item.done", "function_call"), ("output_item.done", "function_call_output"),
        *[("output_text.delta", None)] * 3, ("output_item.done", "message")]  # "It is s", "till run", "ning."
    said, more, said_done, call, result, *answer, final = events
    assert said["item_id"] == more["item_id"] == said_done["item"]["id"]
    assert said_done["item"]["content"][0]["text"] == "Let me check."
    assert call["item"]["call_id"] == result["item"]["call_id"] == "call_p"
    assert json.loads(result["item"]["output"])["run_id"] == run_id
    assert {e["item_id"] for e in answer} == {final["item"]["id"]} != {said["item_id"]}
    assert "".join(e["delta"] for e in answer) == final["item"]["content"][0]["text"] == "It is still running."
    assert final["custom_outputs"] == {"thread_id": "t-stream", "turn": 2, "run_ids": [], "delivered_run_ids": []}
    assert all("custom_outputs" not in e for e in events[:-1])
    assert len(stored(db, "t-stream")) == 8


@pytest.mark.parametrize("failure", ["cut", "model_error", "database"])
def test_a_turn_failing_after_events_were_sent_ends_with_an_error_event(agent, scripted_model, db, failure):
    from mlflow.types.responses import ResponsesAgentStreamEvent

    if failure == "cut":  # the model's stream breaks off
        scripted_model.stream({"content": "Revenue was "}, {"content": "up by"}, end="cut")
    elif failure == "model_error":  # a tool call went out, then the next model call fails
        scripted_model.call_tool("poll_databricks_job", {"run_id": "7"}).fault(400)
    else:  # the answer streamed, then storing the turn fails
        scripted_model.reply("Revenue was up.")
        with db.connection() as conn:
            refuse_inserts(conn, "thread_messages", "disk full")
    events = list(agent.predict_stream(ask("revenue?", "t-broken")))
    error = events[-1]
    assert len(events) > 1 and all(e["type"] != "error" for e in events[:-1])
    assert error["type"] == "error" and error["code"] == "TEMPORARILY_UNAVAILABLE"
    ResponsesAgentStreamEvent(**error)
    check = {"cut": "the chat model failed and nothing was stored: the answer from (address withheld) stopped "
                    "mid-way", "model_error": "HTTP 400: SCRIPTED_FAULT: scripted fault 400",
             "database": "the database failed and nothing was stored: disk full"}[failure]
    assert check in error["message"] and "http" not in error["message"]
    assert "Check that" in error["message"]
    assert stored(db, "t-broken") == []  # nothing of the turn (its thread id stays claimed)


def test_stream_of_a_new_thread_tells_its_id_and_raises_errors(agent, scripted_model):
    scripted_model.reply("Hi!")
    final = list(agent.predict_stream(ask("hi")))[-1]
    assert len(final["custom_outputs"]["thread_id"]) == 32 and final["custom_outputs"]["turn"] == 1
    with pytest.raises(BadRequest, match="no input"):
        next(agent.predict_stream({"input": []}))
    scripted_model.fault(400)
    with pytest.raises(TurnFailed, match="chat model failed"):
        list(agent.predict_stream(ask("hi")))


def test_shapes_match_mlflow_responses_agent(agent, scripted_model):
    from mlflow.types import responses  # requirements-dev.txt has mlflow: this must run, not skip
    request = {"input": [{"role": "user", "content": "revenue?"}], "custom_inputs": {"thread_id": "t-mlflow"},
               "context": {"conversation_id": "c", "user_id": "u"}}
    parsed = responses.ResponsesAgentRequest(**request).model_dump(exclude_none=True)
    scripted_model.call_tool("start_databricks_job", {"request": "revenue"})
    responses.ResponsesAgentResponse(**agent.predict(parsed))
    scripted_model.reply("Hi")
    for event in agent.predict_stream({**parsed, "input": [{"role": "user", "content": "hi"}]}):
        responses.ResponsesAgentStreamEvent(**event)


# ------------------------------------------------------------------ bad requests

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("request_, problem", [
    ({}, "the request has no input"),
    ({"input": []}, "the request has no input"),
    ("hi", "the request must be an object"),
    ({"input": "hi"}, "'input' must be a list of messages, not str"),
    ({"input": ["hi"]}, r"input\[0\] must be an object, not str"),
    ({"input": [{"role": "tool", "content": "x"}]}, r"input\[0\]: role 'tool' is not one of user, assistant"),
    ({"input": [{"type": "image", "url": "x"}, USER]}, r"input\[0\]: type 'image' is not supported"),
    ({"input": [USER, {"role": "assistant", "content": "a"}]}, r"input\[1\], the last item, must be the user's"),
    ({"input": [USER, {"type": "function_call_output", "call_id": "1", "output": "x"}]}, "must be the user's"),
    ({"input": [{"role": "user", "content": " \n "}]}, r"input\[0\]: the user's message is empty"),
    ({"input": [{"role": "user", "content": None}]}, "content must be a string or a list of text parts"),
    ({"input": [{"role": "user", "content": "x" * 32_001}]}, "32,001 characters; the limit is 32,000"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "content part 'input_image' is not supported"),
    ({"input": [USER], "custom_inputs": {"thread_id": "../etc/passwd"}}, "invalid thread id '../etc/passwd'"),
    ({"input": [USER], "custom_inputs": {"thread_id": 7}}, "invalid thread id 7"),
    ({"input": [USER], "custom_inputs": "t1"}, "'custom_inputs' must be an object"),
    ({"input": [USER], "context": {"user_id": 5}}, "context.user_id must be a string"),
    ({"input": [{"role": "system", "content": "x" * 8_001}, USER]}, "8,001 characters together; the limit is 8,000"),
])
def test_bad_requests_name_the_problem_and_write_nothing(agent, db, request_, problem):
    with pytest.raises(BadRequest, match=problem):
        agent.predict(request_)
    assert isinstance(BadRequest(), ValueError) and count_threads(db) == 0


# ------------------------------------------------------------------ import time

def test_import_leaves_the_sdk_and_mlflow_out():
    """What keeps `import primary` fast: neither the SDK nor mlflow is imported (the time itself is a figure of
    benchmarks/bench.py, not a timed test)."""
    code = "import sys; import primary; print('databricks.sdk' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


# ------------------------------------------------------------------ the terminal

def test_terminal_prints_the_reply_as_it_streams(agent, scripted_model, monkeypatch):
    import terminal

    first_out = threading.Event()  # the model sends the rest once the first words are on the screen

    class Screen(io.StringIO):
        def write(self, text):
            if "Hello" in self.getvalue() + text:
                first_out.set()
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Screen())
    scripted_model.stream({"content": "Hello"}, {"content": ", I will look.\x1b[2J"}, {"tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "poll_databricks_job",
                                                                   "arguments": '{"run_id": "7"}'}}]}, gate=first_out)
    scripted_model.stream({"content": "Run 7 is "}, end="cut")
    terminal.Terminal(agent, "t-term-stream").say("is run 7 done?")
    assert sys.stdout.getvalue() == (
        "Hello, I will look.\\x1b[2J\n"
        "  [poll_databricks_job {\"run_id\": \"7\"}]\n"
        "Run 7 is \nerror: the chat model failed and nothing was stored: the answer from (address withheld) stopped "
        "mid-way: ChunkedEncodingError: Response ended prematurely. Check that the model endpoint is up and "
        "reachable, then send the message again\n")


def test_terminal_chat_runs_and_watch(emu, w, job_id, pg_dsn, db, scripted_model):
    run_id = str(w.jobs.run_now(job_id, job_parameters={"request": "[steps] revenue", "thread_id": "t-term"}).run_id)
    with db.connection() as conn:
        lakebase.record_run(conn, "t-term", run_id, "k1", "[steps] revenue")
    scripted_model.fault(400, body={"error": {"message": "model overloaded"}})
    scripted_model.reply("Hello from the agent.")
    scripted_model.call_tool("start_databricks_job", {"request": "orders by month"})
    stdin = f"first\nhello\n/runs\n/watch {run_id}\n/watch 99999\n/bogus\n/thread bad id!\norders by month\n/quit\n"
    out = terminal(terminal_env(emu, job_id, pg_dsn, scripted_model), stdin, "--thread", "t-term")
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert f"workspace {emu.url} (DATABRICKS_HOST), job {job_id}" in lines and "thread t-term" in lines
    assert "error: the chat model failed and nothing was stored" in lines and "model overloaded" in lines
    assert "Hello from the agent." in lines
    assert f"run {run_id}  " in lines and "[steps] revenue" in lines
    assert "#1 started: [steps] revenue" in lines and "#4 answer: Answer to: [steps] revenue" in lines
    assert f"run {run_id} ended: TERMINATED SUCCESS" in lines
    assert "error: run 99999 was not started in this conversation" in lines
    assert "unknown command '/bogus'" in lines and "error: invalid thread id 'bad id!'" in lines
    assert "[start_databricks_job" in lines and "I've started a job to answer this: run" in lines
    assert "Traceback" not in out.stderr
    with db.connection() as conn:
        said = [m["content"] for m in lakebase.load_messages(conn, "t-term") if m["role"] != "tool" and m["content"]]
        assert said[:2] == ["hello", "Hello from the agent."]
        assert len(lakebase.list_runs(conn, "t-term")) == 2
    # another process continues the thread: the model sees its history
    scripted_model.reply("You said hello.")
    out = terminal(terminal_env(emu, job_id, pg_dsn, scripted_model), "what did I say first?\n", "--thread", "t-term")
    assert out.returncode == 0 and "You said hello." in out.stdout
    sent = [m["content"] for m in scripted_model.requests[-1].body["messages"] if m["role"] != "tool" and m["content"]]
    assert sent[1:3] == ["hello", "Hello from the agent."] and sent[-1] == "what did I say first?"


def test_terminal_ctrl_c_stops_watching_but_not_the_chat(emu, w, job_id, pg_dsn, db, scripted_model):
    run_id = str(w.jobs.run_now(job_id, job_parameters={"request": "[slow] x", "thread_id": "t-int"}).run_id)
    with db.connection() as conn:
        lakebase.record_run(conn, "t-int", run_id, "k1", "[slow] x")
    proc = subprocess.Popen([sys.executable, str(ROOT / "primary.py"), "--thread", "t-int"], cwd=ROOT, text=True,
                            env=terminal_env(emu, job_id, pg_dsn, scripted_model), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        proc.stdin.write(f"/watch {run_id}\n")
        proc.stdin.flush()
        deadline, seen = time.monotonic() + WAIT, ""
        while "#1 started" not in seen:
            seen += lines.get(timeout=max(0.1, deadline - time.monotonic()))
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/runs\n/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=WAIT) == 0
    finally:
        proc.kill()
    rest = ""
    while not lines.empty():
        rest += lines.get()
    assert f"stopped watching run {run_id}; it goes on" in rest
    assert f"run {run_id}  RUNNING" in rest


def test_terminal_says_what_is_missing(emu, job_id, pg_dsn, scripted_model):
    env = terminal_env(emu, job_id, pg_dsn, scripted_model)
    del env["DATABRICKS_JOB_ID"], env["LAKEBASE_DSN"]
    out = terminal(env, "")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("primary.py: a workspace is configured (DATABRICKS_HOST) but not set up for this "
                                  "agent: DATABRICKS_JOB_ID (the worker job's id) is not set; no database is set: set "
                                  "LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT (or LAKEBASE_DSN). Deploy the agent there "
                                  "and set these (README: Deploy to Databricks), or run 'python primary.py --local' "
                                  "to use the local workspace")


def test_terminal_says_in_one_line_that_traces_need_a_directory(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a directory")
    out = terminal(clean_env(), "", "--traces", str(taken))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"primary.py: --traces {taken}: File exists: give a directory you can write to\n"


def test_terminal_takes_log_level_in_any_case_and_says_in_one_line_what_it_is_not():
    unset = "DATABRICKS_JOB_ID (the worker job's id) is not set"  # the workspace's setup is checked after logging's
    for level in ("debug", "Warning"):
        out = terminal(clean_env(DATABRICKS_HOST="http://127.0.0.1:9", LOG_LEVEL=level), "")
        assert out.returncode == 2 and unset in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = terminal(clean_env(DATABRICKS_HOST="http://127.0.0.1:9", LOG_LEVEL="loud"), "")
    assert out.returncode == 2 and out.stderr == ("primary.py: LOG_LEVEL=LOUD is not a log level: set DEBUG, INFO, "
                                                  "WARNING or ERROR, or leave it unset\n")


def test_terminal_help(tmp_path):
    out = terminal(dict(os.environ, COLUMNS="80"), "", "--help")
    for word in ("/new", "/thread ID", "/runs", "/watch RUN_ID", "/last", "/quit", "--local", "--data-dir", "--thread",
                 "DATABRICKS_JOB_ID", "LAKEBASE_DSN", "LLM_BASE_URL", "LLM_ENDPOINT_NAME", "deploy"):
        assert word in out.stdout
    deploy = terminal(dict(os.environ, COLUMNS="80"), "", "deploy", "--help")
    for text in (out.stdout, deploy.stdout):  # wrapped to the terminal, the lists and the epilogs too
        assert "--help" in text and max(len(line) for line in text.splitlines()) <= 80, text


def test_terminal_shows_a_long_reply_as_its_head_and_tail(capsys):
    import terminal as chat

    reply = "\n".join(f"line {i}" for i in range(269))
    clip = chat.Clip()
    for start in range(0, len(reply), 7):  # as it streams in
        clip.feed(reply[start:start + 7])
    assert clip.end() == reply
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == chat.HEAD_LINES + 1 + chat.TAIL_LINES and shown[0] == "line 0" and shown[-1] == "line 268"
    assert shown[chat.HEAD_LINES] == f"[... {269 - chat.HEAD_LINES - chat.TAIL_LINES} more lines: /last shows the " \
                                     f"whole reply ...]"
    short = chat.Clip()
    short.feed("short\nreply")
    assert short.end() == "short\nreply" and capsys.readouterr().out == "short\nreply"


def test_terminal_says_each_kind_of_warning_once_in_words():
    import terminal as chat

    notes, said = chat.Notes(), []
    notes.sink = said.append
    log = logging.getLogger("test-notes")
    log.addHandler(notes)
    try:
        log.warning("the local workspace stops, and with it %s %s", "run", "5")
        log.warning("the local workspace stops, and with it %s %s", "runs", "5, 7")
        log.info("not for the user")
        log.warning("replaced \x1b[31m characters")
    finally:
        log.removeHandler(notes)
    assert said == ["note: the local workspace stops, and with it run 5", "note: replaced \\x1b[31m characters"]


def test_terminal_notices_say_how_a_run_ended_in_one_line():
    from terminal import notice

    answered = {"run_id": "5", "state": "TERMINATED SUCCESS", "answer": "Total revenue: $1.\n\nRows (1 in all): ..."}
    assert notice(answered) == "* run 5 answered: Total revenue: $1. (ask me for the whole answer)"
    assert notice({**answered, "answer": "Total revenue: $1."}) == "* run 5 answered: Total revenue: $1."
    assert notice({**answered, "no_data": "..."}).startswith("* run 5 ended without data: Total revenue")
    assert notice({"run_id": "6", "state": "TERMINATED FAILED", "error": "x"}) == \
        "* run 6 failed: ask me for the details"
    assert notice({"run_id": "7", "state": "TERMINATED CANCELED", "cancelled": "x"}) == "* run 7 was cancelled"
    assert notice({"run_id": "8", "state": "INTERNAL_ERROR"}) == \
        "* run 8 ended without an answer (INTERNAL_ERROR): ask me for the details"


def test_terminal_local_mode(pg_dsn, tmp_path):
    out = terminal(clean_env(LAKEBASE_DSN=pg_dsn), "hello\n/quit\n", "--local", "--data-dir", str(tmp_path),
                   timeout=120)
    assert out.returncode == 0, out.stderr
    assert "local workspace: emulated Databricks API at http://127.0.0.1:" in out.stdout
    assert "offline deterministic stand-in model" in out.stdout and "Hello!" in out.stdout
