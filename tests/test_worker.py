"""worker.py, the job's entry point: a real subprocess (run by the emulator's job runner from job.yml, or
directly) logging to a real Postgres, its model the scripted chat server, its Genie the emulator's, reached
with the real SDK. The loop's Genie outcomes are also checked in-process through worker.run()."""
import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from helpers import (
    GENIE,
    ROOT,
    SQL,
    Answerer,
    make_genie,
    run_worker,
    start_worker,
    steps_of,
    wait_ended,
    worker_env,
    workspace,
)
from pg_fixture import wait_for
from psycopg.conninfo import make_conninfo

import lakebase
import localws.emulator
import runs
import worker
from genie import LOG_ROWS
from llm import LimitReached, openai_chat
from worker import StepLog, WorkerConfig


def job_env(**env):
    """The emulator's extra environment for job runs: none of the developer's own settings, then `env`."""
    own = ("LAKEBASE_", "GENIE_", "LLM_", "PG")
    return {**{k: None for k in os.environ if k.startswith(own)}, "DATABRICKS_CONFIG_FILE": os.devnull, **env}


def steps(dsn, run_id):
    """The run's step log as (step, status, payload)."""
    return [(s["step"], s["status"], s["payload"]) for s in steps_of(dsn, run_id)]


def last_line(stderr):
    """The message a person reads: the worker's last line on stderr, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("worker: ")][-1]


def printed_run_id(stderr):
    return next(line.split()[-1] for line in stderr.splitlines() if line.startswith("worker: run "))


# ------------------------------------------------------------------ the command line

def test_help_documents_every_flag_and_environment_variable():
    result = run_worker("--help", env=worker_env(), timeout=20)
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())
    for flag in ("--request", "--thread-id", "--run-id", "--lakebase-instance", "--lakebase-endpoint",
                 "--lakebase-database", "--genie-space-id", "--llm-endpoint", "--mlflow-experiment"):
        assert f"{flag} " in text
    for var in ("LAKEBASE_DSN", "PG", "LAKEBASE_INSTANCE", "LAKEBASE_ENDPOINT", "LAKEBASE_DATABASE", "LAKEBASE_USER",
                "GENIE_SPACE_ID", "GENIE_DESCRIPTION", "LLM_ENDPOINT_NAME", "LLM_BASE_URL", "LLM_MODEL", "LLM_API_KEY",
                "DATABRICKS_HOST", "LOG_LEVEL", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        assert var in text, f"--help does not mention {var}"
    result = run_worker("--thread-id=t1", env=worker_env(), timeout=20)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "worker.py: error: the following arguments are required: --request"


def test_empty_flags_fall_back_to_the_environment_and_flags_win():
    env = {"GENIE_SPACE_ID": "env-space", "LLM_ENDPOINT_NAME": "env-model", "LAKEBASE_DSN": "dbname=x",
           "LAKEBASE_DATABASE": "env_db", "GENIE_DESCRIPTION": "About sales."}
    args = worker.parser().parse_args(["--request=-h", "--thread-id=", "--run-id=", "--lakebase-instance=",
                                       "--lakebase-endpoint=", "--lakebase-database=", "--genie-space-id=",
                                       "--llm-endpoint="])
    config = WorkerConfig.from_args(args, env)
    assert (config.request, config.genie_space_id, config.chat.endpoint) == ("-h", "env-space", "env-model")
    assert (config.db.dsn, config.db.database, config.genie_description) == ("dbname=x", "env_db", "About sales.")
    assert config.run_id.startswith("local-")
    args = worker.parser().parse_args(["--request=q", "--run-id=7", "--lakebase-instance=inst",
                                       "--lakebase-database=other_db", "--genie-space-id=s2", "--llm-endpoint=m2"])
    config = WorkerConfig.from_args(args, env)
    assert (config.run_id, config.genie_space_id, config.chat.endpoint) == ("7", "s2", "m2")
    assert (config.db.dsn, config.db.instance, config.db.database) == ("", "inst", "other_db")


def test_lakebase_database_flag_is_the_database_the_worker_logs_in_to(make_emulator):
    emu = make_emulator(database_instances={"db1": "db1.local"})
    args = worker.parser().parse_args(["--request=q", "--lakebase-instance=db1", "--lakebase-database=agents"])
    config = WorkerConfig.from_args(args, {})
    login = lakebase.login_for(config.db, workspace(emu))()  # what worker.py connects with
    assert (login.host, login.dbname, login.user) == ("db1.local", "agents", localws.emulator.DEFAULT_USER)


# ------------------------------------------------------------------ full runs, as real subprocesses

def test_a_full_run_through_the_job_runner_logs_every_step(pg_dsn, scripted_model, answerer, make_emulator):
    scripted_model.call_tool("query_genie", {"question": "total sales by region"}, id="call_1")
    scripted_model.reply("East leads with 10.50.")
    env = job_env(LAKEBASE_DSN=pg_dsn, LLM_BASE_URL=scripted_model.base_url, LLM_MODEL="scripted",
                  GENIE_DESCRIPTION="Sales of 2024 and 2025.")
    job = localws.emulator.load_job(ROOT, {"genie_space_id": "space"})  # job.yml's parameters and task, as deployed
    emu = make_emulator(genie_delay=0.03, env=env)
    emu.add_genie_space("space", answerer)
    w = workspace(emu)
    run_id = w.jobs.run_now(emu.add_job(job), job_parameters={"request": "-5% or worse? Sales by region",
                                                              "thread_id": "-t1", "asked_by": "ada@x.org"}).run_id
    run = wait_ended(w, run_id)
    assert run.state.result_state.value == "SUCCESS", emu.run_log(run_id, "stderr")
    # the answer is in the run's output too, framed so that a poller finds it if the step log misses it
    assert runs.answer_in_logs(w.jobs.get_run_output(run.tasks[0].run_id).logs) == "East leads with 10.50."
    log = steps(pg_dsn, str(run_id))  # keyed by the id the primary polls
    detail = log[2][2]["detail"]
    asked = w.genie.get_message("space", detail["conversation_id"], detail["message_id"])
    assert [(number, status) for number, status, _ in log] == [
        (1, "started"), (2, "tool_call"), (3, "tool_result"), (4, "completed")]
    assert log[0][2] == {"request": "-5% or worse? Sales by region", "thread_id": "-t1", "asked_by": "ada@x.org"}
    assert log[1][2] == {"call_id": "call_1", "name": "query_genie", "arguments": {"question": "total sales by region"}}
    result = log[2][2]
    assert {k: result[k] for k in ("call_id", "name", "error")} == {"call_id": "call_1", "name": "query_genie",
                                                                      "error": False}
    assert result["output"] == ("Genie: Answer to total sales by region\n\nSQL:\n" + SQL
                                + "\n\nRows (2 in all):\nregion | total\neast | 10.50\nwest | ")
    assert 900 <= result["duration_ms"] < 30_000  # the first status poll waits 1 s
    assert (detail["status"], detail["query"], detail["row_count"]) == ("COMPLETED", SQL, 2)
    assert (detail["columns"], detail["rows"]) == (["region", "total"], [["east", "10.50"], ["west", None]])
    assert asked.content == "total sales by region"  # the detail names Genie's own conversation and message
    assert log[3][2] == {"answer": "East leads with 10.50."}
    first, second = (r.body for r in scripted_model.requests)
    assert first["messages"][1] == {"role": "user", "content": "-5% or worse? Sales by region"}
    assert [t["function"]["name"] for t in first["tools"]] == ["query_genie"]
    assert first["tools"][0]["function"]["description"] == "Sales of 2024 and 2025."
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": result["output"]}


def test_a_run_with_an_mlflow_experiment_is_one_trace_with_its_genie_span(pg_dsn, scripted_model, answerer, tmp_path,
                                                                          monkeypatch, make_emulator):
    import mlflow  # requirements-dev.txt has it

    scripted_model.call_tool("query_genie", {"question": "total sales by region"}, id="call_1")
    scripted_model.reply("East leads with 10.50.")
    tracking = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny's local store, for this test to read
    env = job_env(LAKEBASE_DSN=pg_dsn, LLM_BASE_URL=scripted_model.base_url, LLM_MODEL="scripted",
                  MLFLOW_TRACKING_URI=tracking, MLFLOW_ALLOW_FILE_STORE="true")
    job = localws.emulator.load_job(ROOT, {"genie_space_id": "space"})
    with make_emulator(genie_delay=0.03, env=env) as emu:
        emu.add_genie_space("space", answerer)
        w = workspace(emu)
        run_id = w.jobs.run_now(emu.add_job(job), job_parameters={
            "request": "Sales by region", "thread_id": "t1", "mlflow_experiment": "/Users/me/async-agent-runs"}).run_id
        run = wait_ended(w, run_id)
        assert run.state.result_state.value == "SUCCESS", emu.run_log(run_id, "stderr")
        token = emu.token
    log = steps(pg_dsn, str(run_id))
    store = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = store.get_experiment_by_name("/Users/me/async-agent-runs")
    [found] = store.search_traces(locations=[experiment.experiment_id])
    trace = store.get_trace(found.info.trace_id)
    assert log[0][2] == {"request": "Sales by region", "thread_id": "t1", "asked_by": None,
                         "trace_id": trace.info.trace_id}
    assert (trace.info.tags["databricks_run_id"], trace.info.tags["thread_id"]) == (str(run_id), "t1")
    assert trace.info.trace_metadata["mlflow.trace.session"] == "t1" and trace.info.state == "OK"
    spans = sorted(trace.data.spans, key=lambda span: span.start_time_ns)
    assert [(span.span_type, span.name) for span in spans] == [
        ("AGENT", "job_run"), ("CHAT_MODEL", "chat_model"), ("TOOL", "query_genie"), ("CHAT_MODEL", "chat_model")]
    root, _, genie, _ = spans
    assert (root.inputs, root.outputs) == ({"request": "Sales by region"}, "East leads with 10.50.")
    assert genie.inputs == {"name": "query_genie", "arguments": '{"question": "total sales by region"}',
                            "call_id": "call_1"}
    assert genie.outputs == log[2][2]["output"]  # what the model saw: the rows cut to a head and a tail
    detail = genie.get_attribute("detail")
    assert (detail["query"], detail["row_count"], detail["status"]) == (SQL, 2, "COMPLETED")
    assert "rows" not in detail and detail == {k: v for k, v in log[2][2]["detail"].items() if k != "rows"}
    assert token not in json.dumps(trace.to_dict())  # the workspace token the run's SDK and model calls used


WITHOUT_MLFLOW = """
import runpy, sys
sys.modules["mlflow"] = None  # as if it were not installed: importing it raises ImportError
sys.argv = ["worker.py", *sys.argv[1:]]
runpy.run_path("worker.py", run_name="__main__")
"""


def test_without_mlflow_a_run_that_names_an_experiment_runs_as_before_untraced(emu, pg_dsn, scripted_model,
                                                                                tmp_path):
    scripted_model.call_tool("query_genie", {"question": "total sales"}).reply("10.50 in all.")
    env = worker_env(emu, pg_dsn, scripted_model, MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri())
    result = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, "--request=Total sales?", "--run-id=r-plain",
                             "--mlflow-experiment=/Users/me/async-agent-runs"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and runs.answer_in_logs(result.stdout) == "10.50 in all.", result.stderr
    assert ("not tracing: the job names MLflow experiment /Users/me/async-agent-runs but mlflow is not installed"
            in result.stderr)
    log = steps(pg_dsn, "r-plain")
    assert [status for _, status, _ in log] == ["started", "tool_call", "tool_result", "completed"]
    assert log[0][2] == {"request": "Total sales?", "thread_id": None, "asked_by": None}  # no trace id
    assert not (tmp_path / "mlruns").exists()


def test_a_run_that_hits_the_loop_bound_fails_and_each_tool_error_goes_back_to_the_model(emu, pg_dsn,
                                                                                          scripted_model):
    for _ in range(WorkerConfig("q", "r").max_calls):
        scripted_model.call_tool("lookup", {"q": 1})
    result = run_worker("--request=revenue", "--run-id=r-bound", env=worker_env(emu, pg_dsn, scripted_model))
    assert result.returncode == 1
    assert last_line(result.stderr) == ("worker: failed: no final answer after 12 model calls; the request may "
                                        "need narrowing")
    log = steps(pg_dsn, "r-bound")
    assert [status for _, status, _ in log] == ["started"] + ["tool_call", "tool_result"] * 12 + ["failed"]
    assert log[-1][2]["kind"] == "LimitReached"
    error = "Error: there is no tool named 'lookup'. Use one of: query_genie."
    assert {(p["output"], p["error"], p["detail"] == {}) for _, s, p in log if s == "tool_result"} == {
        (error, True, True)}
    assert [r.body["messages"][-1]["content"] for r in scripted_model.requests[1:]] == [error] * 11


@pytest.mark.parametrize("body, error", [
    (None, "SCRIPTED_FAULT: scripted fault 400"),
    ("<html>\n<h1>400 Bad Request</h1>\n</html>", "<html> <h1>400 Bad Request</h1> </html>")])  # a proxy's page
def test_a_model_error_mid_run_leaves_a_failed_step(emu, pg_dsn, scripted_model, body, error):
    scripted_model.call_tool("query_genie", {"question": "total sales"}).fault(400, body=body)
    result = run_worker("--request=total sales", "--run-id=r-4xx", env=worker_env(emu, pg_dsn, scripted_model))
    assert result.returncode == 1
    message = last_line(result.stderr).removeprefix("worker: failed: ")
    assert message == f"the chat model failed: POST {scripted_model.base_url}/chat/completions failed with HTTP 400: " \
                      f"{error}"
    log = steps(pg_dsn, "r-4xx")
    assert [status for _, status, _ in log] == ["started", "tool_call", "tool_result", "failed"]
    assert log[-1][2] == {"error": message, "kind": "LLMHTTPError"}


def test_a_missing_genie_space_ends_the_run(emu, pg_dsn, scripted_model):
    scripted_model.call_tool("query_genie", {"question": "total sales"})
    env = worker_env(emu, pg_dsn, scripted_model, GENIE_SPACE_ID="nope")
    result = run_worker("--request=total sales", "--run-id=r-nospace", env=env)
    assert result.returncode == 1
    assert last_line(result.stderr) == ("worker: failed: Genie space 'nope' can't be used: Genie space nope does "
                                        "not exist.")
    log = steps(pg_dsn, "r-nospace")
    assert [status for _, status, _ in log] == ["started", "tool_call", "failed"]
    assert log[-1][2]["kind"] == "GenieUnavailable"


# ------------------------------------------------------------------ bad input: one line, non-zero, a final row

@pytest.mark.parametrize("request_text, message", [
    ("", "the request is empty: pass the question with --request"),
    (" \n ", "the request is empty: pass the question with --request"),
    ("x" * 20_001, "the request is 20,001 characters; the limit is 20,000")])
def test_a_bad_request_fails_with_one_line(pg_dsn, request_text, message):
    result = run_worker(f"--request={request_text}", env=worker_env(dsn=pg_dsn, GENIE_SPACE_ID="space"))
    assert result.returncode == 2 and last_line(result.stderr) == f"worker: failed: {message}"
    run_id = printed_run_id(result.stderr)
    assert run_id.startswith("local-")
    log = steps(pg_dsn, run_id)
    assert [status for _, status, _ in log] == ["started", "failed"]
    assert log[0][2]["request"] == request_text[:20_000] and log[1][2] == {"error": message, "kind": "UsageError"}


def test_missing_genie_space_configuration_fails_with_one_line(emu, pg_dsn, scripted_model):
    result = run_worker("--request=total sales", "--run-id=r-1", env=worker_env(emu, pg_dsn, scripted_model,
                                                                              GENIE_SPACE_ID=None))
    assert result.returncode == 2
    assert last_line(result.stderr) == "worker: failed: no Genie space: set GENIE_SPACE_ID or pass --genie-space-id"
    assert [status for _, status, _ in steps(pg_dsn, "r-1")] == ["started", "failed"]


def test_missing_workspace_configuration_fails_with_one_line(pg_dsn, scripted_model):
    result = run_worker("--request=total sales", "--run-id=r-1", env=worker_env(None, pg_dsn, scripted_model,
                                                                              GENIE_SPACE_ID="space"))
    assert result.returncode == 1
    assert last_line(result.stderr).startswith("worker: failed: default auth: cannot configure default credentials")
    assert [status for _, status, _ in steps(pg_dsn, "r-1")] == ["started", "failed"]


def test_an_unreachable_database_fails_with_one_line(pg_dsn):
    missing = make_conninfo(pg_dsn, dbname="no_such_database")
    result = run_worker("--request=total sales", env=worker_env(dsn=missing))
    assert result.returncode == 3
    line = last_line(result.stderr)
    assert line.startswith("worker: cannot reach the step-log database: cannot connect to Postgres: ")
    assert line.endswith('FATAL: database "no_such_database" does not exist; check LAKEBASE_DSN or the PG* variables')
    result = run_worker("--request=total sales", env=worker_env())
    assert result.returncode == 3 and last_line(result.stderr).startswith(
        "worker: cannot reach the step-log database: no database configured: set LAKEBASE_DSN")


def test_log_level_is_a_level_name_in_any_case_and_an_unknown_one_is_one_line(pg_dsn):
    result = run_worker("--request=", env=worker_env(dsn=pg_dsn, GENIE_SPACE_ID="space", LOG_LEVEL="debug"))
    assert result.returncode == 2, result.stderr
    assert "worker: failed: the request is empty: pass the question with --request" in result.stderr.splitlines()
    assert " DEBUG worker: run failed" in result.stderr  # the level took effect (DEBUG shows the traceback)
    result = run_worker("--request=q", env=worker_env(dsn=pg_dsn, GENIE_SPACE_ID="space", LOG_LEVEL="loud"))
    assert result.returncode == 2 and result.stderr == ("worker: LOG_LEVEL='loud' is not a log level: use DEBUG, "
                                                        "INFO, WARNING, ERROR or CRITICAL\n")


def test_reconnecting_reuses_the_login_and_its_token(lakebase_emulator):
    emu, w = lakebase_emulator
    config = WorkerConfig(request="q", run_id="r-1", db=lakebase.LakebaseConfig(instance="db1"))
    step = worker.open_step_log(config, w)
    for _ in range(2):  # as StepLog does after a lost connection
        step.conn.close()
        step.conn = step.connect()
        assert step.conn.execute("select current_user").fetchone() == (localws.emulator.DEFAULT_USER,)
    step.conn.close()
    assert len(emu.minted) == 1 and len(emu.calls("POST", "/api/2.0/database/credentials")) == 1
    assert len(emu.calls("GET", "/api/2.0/preview/scim/v2/Me")) == 1


def test_a_run_id_the_step_log_refuses_fails_with_one_line(pg_dsn):
    result = run_worker("--request=total sales", "--run-id=-5", env=worker_env(dsn=pg_dsn))
    assert result.returncode == 2
    assert last_line(result.stderr) == ("worker: invalid run id '-5': use 1-128 letters, digits or _.:-, starting with "
                                        "a letter or digit")


@pytest.mark.parametrize("run_id, final", [("4242", "completed"), ("local-0b5e2c1a-7d3f-4e8a-9c6b-5a4d3e2f1a0b",
                                                                   "failed")])
def test_a_run_that_has_ended_takes_no_more_steps(emu, pg_dsn, scripted_model, run_id, final):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        lakebase.migrate(conn)
        lakebase.log_step(conn, run_id, "started", {"request": "total sales", "thread_id": "t1"})
        lakebase.log_step(conn, run_id, final, {"answer": "East leads."} if final == "completed" else {"error": "x"})
    before = steps(pg_dsn, run_id)
    result = run_worker("--request=total sales", f"--run-id={run_id}", env=worker_env(emu, pg_dsn, scripted_model))
    assert result.returncode == 2 and result.stdout == ""
    assert [line for line in result.stderr.splitlines() if line.startswith("worker: ")] == [last_line(result.stderr)]
    assert last_line(result.stderr) == (f"worker: run {run_id} has already ended ({final} at step 2): its step log is "
                                        f"closed; a run is logged once: start a new run (without --run-id, a local "
                                        f"run gets a new id)")
    assert steps(pg_dsn, run_id) == before and not scripted_model.requests


def test_losing_the_database_mid_run_ends_with_one_line(emu, pg_server, pg_dsn, scripted_model):
    scripted_model.slow(2, "East leads.")
    proc = start_worker("--request=total sales", "--run-id=r-gone", env=worker_env(emu, pg_dsn, scripted_model))
    try:
        wait_for(lambda: scripted_model.requests, "the worker to ask the model")
        pg_server.drop_database(pg_dsn)  # terminates the worker's session; reconnecting finds no database
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3
    assert last_line(stderr).startswith("worker: could not log the run's end (completed): cannot connect to ")
    assert 'database "' in last_line(stderr) and "does not exist" in last_line(stderr)


# ------------------------------------------------------------------ cancellation (SIGTERM)

def test_cancelling_a_job_run_while_the_model_is_slow_logs_cancelled(pg_dsn, scripted_model, make_emulator):
    scripted_model.slow(30)
    env = job_env(LAKEBASE_DSN=pg_dsn, LLM_BASE_URL=scripted_model.base_url, LLM_MODEL="scripted")
    emu = make_emulator(env=env, cancel_grace=10)
    emu.add_genie_space("space", Answerer())
    w = workspace(emu)
    job_id = emu.add_job(localws.emulator.load_job(ROOT, {"genie_space_id": "space"}))
    run_id = w.jobs.run_now(job_id, job_parameters={"request": "total sales"}).run_id
    wait_for(lambda: scripted_model.requests, "the worker to ask the model")
    w.jobs.cancel_run(run_id)
    run = wait_ended(w, run_id)  # a worker killed after the 10 s grace could not log `cancelled` (below)
    assert (run.state.result_state.value, run.state.state_message) == ("CANCELED", "Run cancelled.")
    assert "Traceback" not in emu.run_log(run_id, "stderr")
    assert [(n, s, p) for n, s, p in steps(pg_dsn, str(run_id))] == [
        (1, "started", {"request": "total sales", "thread_id": None, "asked_by": None}),
        (2, "cancelled", {"reason": "received SIGTERM: the run was cancelled"})]


def test_sigterm_while_genie_hangs_logs_cancelled(emu, pg_dsn, scripted_model):
    emu.genie_fault("space", "hang")
    scripted_model.call_tool("query_genie", {"question": "total sales"})
    proc = start_worker("--request=total sales", "--run-id=r-hang", env=worker_env(emu, pg_dsn, scripted_model))
    try:
        wait_for(lambda: len(emu.calls("GET", f"{GENIE}/conversations/")) >= 1, "the worker to poll Genie")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert last_line(stderr) == "worker: received SIGTERM: the run was cancelled"
    assert [status for _, status, _ in steps(pg_dsn, "r-hang")] == ["started", "tool_call", "cancelled"]


def hold_step_lock(conn, watch, run_id):
    """In conn's transaction: take the run's step-log lock, so the worker's next step waits for it."""
    conn.execute("select pg_advisory_xact_lock(%s::int, hashtext(%s))", (lakebase._LOCK_RUN, run_id))
    worker_waits_for_a_lock(watch)


def worker_waits_for_a_lock(watch):
    wait_for(lambda: watch.execute("select 1 from pg_stat_activity where application_name = 'async-agent' "
                                   "and wait_event_type = 'Lock'").fetchone(), "the worker to wait for a lock")


def test_sigterm_while_a_step_is_being_written_logs_that_step_then_cancelled(pg_dsn, scripted_model, emu):
    def slow_tool_call(request):  # time for the test to take the lock before the worker logs the call
        time.sleep(1)
        return {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "query_genie", "arguments": '{"question": "total sales"}'}}]}

    scripted_model.respond(slow_tool_call)
    proc = start_worker("--request=total sales", "--run-id=r-lock", env=worker_env(emu, pg_dsn, scripted_model))
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn, psycopg.connect(pg_dsn, autocommit=True) as watch:
            wait_for(lambda: scripted_model.requests, "the worker to ask the model")
            with conn.transaction():  # the worker's tool_call step waits for the lock
                hold_step_lock(conn, watch, "r-lock")
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert last_line(stderr) == "worker: received SIGTERM: the run was cancelled"
    assert [status for _, status, _ in steps(pg_dsn, "r-lock")] == ["started", "tool_call", "cancelled"]
    assert not emu.calls("POST", GENIE)  # cancelled before the question was asked


def test_sigterm_while_the_answer_is_being_written_changes_nothing(pg_dsn, scripted_model, emu):
    scripted_model.slow(1, "Total sales were 42.")
    proc = start_worker("--request=total sales", "--run-id=r-late", env=worker_env(emu, pg_dsn, scripted_model))
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn, psycopg.connect(pg_dsn, autocommit=True) as watch:
            wait_for(lambda: scripted_model.requests, "the worker to ask the model")
            with conn.transaction():  # the worker's `completed` step waits for the lock
                hold_step_lock(conn, watch, "r-late")
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
        out, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert (proc.returncode, runs.answer_in_logs(out)) == (0, "Total sales were 42."), stderr
    assert [status for _, status, _ in steps(pg_dsn, "r-late")] == ["started", "completed"]


def test_sigterm_while_a_failure_is_being_written_changes_nothing(pg_dsn, scripted_model, emu):
    with psycopg.connect(pg_dsn) as lock, psycopg.connect(pg_dsn, autocommit=True) as watch:
        def lock_then_break(request):  # the worker's `failed` step will wait for the lock
            lock.execute("select pg_advisory_xact_lock(%s::int, hashtext(%s))", (lakebase._LOCK_RUN, "r-fail"))
            return {"role": "assistant", "content": 42}  # not a chat message: the run fails

        scripted_model.respond(lock_then_break)
        proc = start_worker("--request=total sales", "--run-id=r-fail", env=worker_env(emu, pg_dsn, scripted_model))
        try:
            worker_waits_for_a_lock(watch)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            lock.commit()
            _, stderr = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert proc.returncode == 1, stderr
    assert last_line(stderr).startswith("worker: failed: the chat model failed: ") and "42" in last_line(stderr)
    assert [status for _, status, _ in steps(pg_dsn, "r-fail")] == ["started", "failed"]


def test_sigterm_during_start_up_is_logged_once_the_step_log_is_ready(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn, psycopg.connect(pg_dsn, autocommit=True) as watch:
        with conn.transaction():  # hold the migration lock: the worker waits for it at start-up
            conn.execute("select pg_advisory_xact_lock(%s::bigint)", (lakebase._LOCK_MIGRATE,))
            proc = start_worker("--request=total sales", "--run-id=r-early",
                                env=worker_env(dsn=pg_dsn, GENIE_SPACE_ID="space"))
            try:
                worker_waits_for_a_lock(watch)
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
            except BaseException:
                proc.kill()
                raise
        try:
            _, stderr = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert last_line(stderr) == "worker: received SIGTERM: the run was cancelled"
    assert [status for _, status, _ in steps(pg_dsn, "r-early")] == ["started", "cancelled"]


# ------------------------------------------------------------------ the loop and Genie, in-process

@pytest.fixture
def worker_client(emu, monkeypatch):
    """The worker's own WorkspaceClient, with a 2 s retry budget (the SDK reads DATABRICKS_HOST itself)."""
    monkeypatch.setenv("DATABRICKS_HOST", emu.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", emu.token)
    w = worker.workspace_client(WorkerConfig("q", "r", retry_seconds=2))
    assert w.config.retry_timeout_seconds == 2
    return w


def run_in_process(pg_dsn, model, worker_client, run_id="r1", **genie_settings):
    """worker.run() on a migrated database (the `db` fixture) with test-sized Genie polling; returns (answer or
    the exception, the step log)."""
    genie = make_genie(worker_client, **genie_settings)
    step = StepLog(lambda: lakebase.connect(lakebase.LakebaseConfig(dsn=pg_dsn)), run_id)
    config = WorkerConfig("total sales by region", run_id, genie_space_id="space", max_calls=4)
    try:
        answer = worker.run(config, openai_chat(model.base_url, "scripted"), genie, step)
    except LimitReached as e:
        answer = e
    return answer, steps(pg_dsn, run_id)


def test_two_questions_in_one_run_are_one_genie_conversation(emu, db, pg_dsn, scripted_model, worker_client,
                                                             answerer):
    scripted_model.call_tool("query_genie", {"question": "total sales by region"})
    scripted_model.call_tool("query_genie", {"question": "and by month?"}).reply("Done.")
    answer, log = run_in_process(pg_dsn, scripted_model, worker_client)
    assert answer == "Done."
    details = [p["detail"] for _, s, p in log if s == "tool_result"]
    cid = details[0]["conversation_id"]
    assert details[1]["conversation_id"] == cid and details[0]["message_id"] != details[1]["message_id"]
    assert [r.path for r in emu.calls("POST", GENIE)] == [f"{GENIE}/start-conversation",
                                                          f"{GENIE}/conversations/{cid}/messages"]
    assert answerer.questions()[1] == ("and by month?", ["total sales by region"])
    assert [status for _, status, _ in log] == ["tool_call", "tool_result"] * 2  # main() logs start and end


@pytest.mark.parametrize("fault, status, output", [
    ("failed", "FAILED", "Error: Genie could not answer: the warehouse is stopped. Rephrase the question"),
    ("cancelled", "CANCELLED", "Error: the Genie question was cancelled before it finished"),
    ("hang", "EXECUTING_QUERY", "Error: Genie did not answer within 0.5 s (last status EXECUTING_QUERY)"),
    ("expired", "QUERY_RESULT_EXPIRED", "Genie: Answer to total sales\n\nSQL:"),
    ("429", "NOT_SENT", "Error: Genie is rate limited (about 5 questions a minute per workspace)"),
    ("429 once", "COMPLETED", "Genie: Answer to total sales\n\nSQL:"),
    ("500", "SUBMITTED", "Error: Genie failed while we waited for its answer: INTERNAL_ERROR: the backend fell over")])
def test_genie_outcomes_reach_the_model_and_the_step_log(emu, db, pg_dsn, scripted_model, worker_client, fault, status,
                                                         output):
    if fault == "500":  # not retried by the SDK
        emu.inject("GET", f"{GENIE}/conversations/", 500, "INTERNAL_ERROR", "the backend fell over", times=None)
    elif fault.startswith("429"):
        emu.inject("POST", f"{GENIE}/start-conversation", 429, "RESOURCE_EXHAUSTED", "too many questions",
                   times=1 if fault == "429 once" else None, retry_after=1)
    else:
        emu.genie_fault("space", fault, "the warehouse is stopped")
    scripted_model.call_tool("query_genie", {"question": "total sales"}, id="c1").reply("Here is what I found.")
    answer, log = run_in_process(pg_dsn, scripted_model, worker_client, timeout=0.5)
    assert answer == "Here is what I found."
    result = next(p for _, s, p in log if s == "tool_result")
    assert result["output"].startswith(output)
    assert result["error"] is output.startswith("Error:") and result["detail"]["status"] == status
    assert result["detail"]["error"] == (result["output"].removeprefix("Error: ") if result["error"] else "")
    if fault == "expired":  # re-executed: the rows are there
        assert result["detail"]["rows"] == [["east", "10.50"], ["west", None]]
        assert emu.calls("POST", f"{GENIE}/conversations/")[-1].path.endswith("/execute-query")
    assert scripted_model.requests[1].body["messages"][-1] == {"role": "tool", "tool_call_id": "c1",
                                                               "content": result["output"]}


def test_a_call_that_never_reaches_genie_has_no_genie_detail(emu, db, pg_dsn, scripted_model, worker_client):
    scripted_model.call_tool("query_genie", {"question": "total sales"})
    scripted_model.call_tool("query_genie", {"q": "by month"}).reply("Done.")
    _, log = run_in_process(pg_dsn, scripted_model, worker_client)
    first, second = (p for _, s, p in log if s == "tool_result")
    assert first["detail"]["status"] == "COMPLETED"
    assert second["error"] and second["output"].startswith("Error: query_genie got missing required argument")
    assert second["detail"] == {}  # not the first question's result again


def test_a_large_result_is_cut_for_the_model_and_bounded_in_the_step_log(emu, db, pg_dsn, scripted_model,
                                                                          worker_client, answerer):
    answerer.rows = [[f"r{i:04d}", str(i)] for i in range(2000)]
    scripted_model.call_tool("query_genie", {"question": "sales per order"}).reply("Done.")
    _, log = run_in_process(pg_dsn, scripted_model, worker_client, max_chars=1000)
    result = next(p for _, s, p in log if s == "tool_result")
    seen = scripted_model.requests[1].body["messages"][-1]["content"]
    assert seen == result["output"] and len(seen.split("Rows (2000 in all):\n")[1]) <= 1000
    assert "\nr0000 | 0\n" in seen and seen.endswith("\nr1999 | 1999") and " rows (" in seen
    assert "r1000 | 1000" not in seen
    detail = result["detail"]
    assert detail["rows"] == answerer.rows[:LOG_ROWS] and detail["row_count"] == 2000  # the first 1,000
    assert detail["rows_left_out"] == 1000 and detail["note"].startswith("the step log keeps 1,000 of the 2,000 rows")


@pytest.mark.parametrize("quirks", [localws.quirks.HARSH])
def test_a_run_on_a_workspace_as_harsh_as_the_real_one(emu, db, pg_dsn, scripted_model, worker_client):
    for question in ("total sales by region", "and by month?", "and the weather?"):
        scripted_model.call_tool("query_genie", {"question": question})
    scripted_model.reply("Done.")
    answer, log = run_in_process(pg_dsn, scripted_model, worker_client, run_id="harsh")
    outputs = [p["output"] for _, s, p in log if s == "tool_result"]
    assert answer == "Done." and [p["error"] for _, s, p in log if s == "tool_result"] == [False] * 3
    assert outputs[0].startswith(f"Genie: Answer to total sales by region\n\nSQL:\n{SQL}\n\nRows (2 in all)")
    assert outputs[1].startswith(f"Genie: Answer to and by month?\n\nSQL:\n{SQL}\n\nRows (2 in all)")
    assert outputs[2].startswith("Genie asks back: I can only answer questions about sales.")
    assert all("missing_column" not in output for output in outputs)  # the self-corrected attempts stay in the log
    details = [p["detail"] for _, s, p in log if s == "tool_result"]
    assert ["missing_column" in d["attempts"][0]["query"] for d in details[:2]] == [True, True]


def test_the_loop_is_bounded(emu, db, pg_dsn, scripted_model, worker_client):
    for _ in range(4):
        scripted_model.call_tool("query_genie", {"question": "total sales"})
    error, log = run_in_process(pg_dsn, scripted_model, worker_client)
    assert isinstance(error, LimitReached) and error.max_calls == 4
    assert [status for _, status, _ in log] == ["tool_call", "tool_result"] * 4
