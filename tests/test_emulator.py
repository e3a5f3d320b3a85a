"""The local workspace emulator, driven by the real databricks-sdk over HTTP, with real worker subprocesses.

The contract tests check every JSON body against the SDK's own dataclasses: `Cls.from_dict(body).as_dict()
== body` fails on a field or enum value the SDK does not know (it would be dropped), so the emulator can't
drift into answers the real service would not give.
"""
import json
import os
import re
import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pg_fixture
import psycopg
import pytest
import requests
from databricks.sdk.config import Config
from databricks.sdk.errors import (
    InvalidParameterValue,
    NotFound,
    OperationFailed,
    PermissionDenied,
    ResourceDoesNotExist,
)
from databricks.sdk.service import dashboards, database, iam, jobs, postgres
from helpers import ROOT, SQL, Answerer, wait_ended, workspace
from pg_fixture import wait_for

import lakebase
import localws
import localws.answerer
import localws.embedded
import localws.emulator
import localws.jobs

FAKE_WORKER = "tests/fixtures/fake_worker.py"
PARAMS = ("sleep", "exit", "stderr", "dump", "ignore_sigterm")


def fake_job(**settings):
    """A bundle-style job running the fake worker; its job parameters become the worker's arguments."""
    args = [a for p in PARAMS for a in (f"--{p.replace('_', '-')}", f"{{{{job.parameters.{p}}}}}")]
    job = {"name": "fake", "max_concurrent_runs": 1, "queue": {"enabled": True}, "permissions": [{"level": "x"}],
           "parameters": [{"name": p, "default": ""} for p in PARAMS],
           "tasks": [{"task_key": "worker", "environment_key": "default", "spark_python_task": {
               "python_file": FAKE_WORKER,
               "parameters": [*args, "--run-id", "{{job.run_id}}", "--job-id", "{{ job.id }}"]}}]}
    job.update(settings)
    return job


def roundtrip(cls, body):
    assert cls.from_dict(body).as_dict() == body


@pytest.fixture
def emu(make_emulator):
    return make_emulator(cancel_grace=0.5, genie_delay=0.06, env={"EXTRA_VAR": "from-workspace", "HOME_ONLY": None})


# ------------------------------------------------------------------ auth and startup

def test_client_construction_is_fast_and_needs_no_token_for_host_metadata(emu):
    started = time.monotonic()
    w = workspace(emu)
    assert time.monotonic() - started < 2
    well_known = emu.calls("GET", "/.well-known/databricks-config")
    assert well_known and "authorization" not in well_known[0].headers
    metadata = requests.get(emu.url + "/.well-known/databricks-config", timeout=5)
    assert metadata.status_code == 200 and metadata.json()["workspace_id"] == localws.emulator.WORKSPACE_ID
    assert w.current_user.me().user_name == localws.emulator.DEFAULT_USER
    assert w.config.auth_type == "pat"  # the metadata adds no auth method, and no /oidc calls follow
    assert emu.calls("GET", "/api/2.0/preview/scim/v2/Me")[-1].headers["x-databricks-workspace-id"] == "1"
    assert not [r for r in emu.requests if "oidc" in r.path or "oauth" in r.path]


def test_wrong_or_missing_token_is_refused(emu):
    with pytest.raises(PermissionDenied, match="Invalid access token"):
        workspace(emu, token="dapi-wrong").current_user.me()
    response = requests.get(emu.url + "/api/2.0/preview/scim/v2/Me", timeout=5)
    assert response.status_code == 401 and response.json()["error_code"] == "UNAUTHENTICATED"


def test_each_emulator_has_a_fresh_random_token(tmp_path):
    with localws.Emulator(log_dir=tmp_path) as one, localws.Emulator(log_dir=tmp_path) as other:
        assert re.fullmatch(r"dapi[0-9a-f]{32}", one.token) and one.token != other.token
        assert workspace(one).current_user.me().user_name == localws.emulator.DEFAULT_USER
        for token in (other.token, "dapi-local"):  # another workspace's token, and the one every user once knew
            with pytest.raises(PermissionDenied, match="Invalid access token"):
                workspace(one, token=token).current_user.me()


def test_each_user_has_a_token_and_is_answered_as_that_user(make_emulator):
    with make_emulator(users=["ana@example.com"]) as emu:
        bob = emu.add_user("bob@example.com")
        ana = emu.users["ana@example.com"].token
        assert len({emu.token, ana, bob}) == 3
        me = {name: workspace(emu, token=token).current_user.me() for name, token in
              [(localws.emulator.DEFAULT_USER, emu.token), ("ana@example.com", ana), ("bob@example.com", bob)]}
        assert {name: m.user_name for name, m in me.items()} == {name: name for name in me}
        assert len({m.id for m in me.values()}) == 3
        roundtrip(iam.User, workspace(emu, token=bob).api_client.do("GET", "/api/2.0/preview/scim/v2/Me"))
        job_id = emu.add_job(fake_job())
        run_id = workspace(emu, token=bob).jobs.run_now(job_id).run_id
        run = wait_ended(workspace(emu), run_id)
        assert run.creator_user_name == "bob@example.com"  # who started it; it runs as the job's owner
        with pytest.raises(ValueError, match="exists"):
            emu.add_user("bob@example.com")


def test_a_genie_space_can_be_restricted_to_some_users(tmp_path):
    with localws.Emulator(log_dir=tmp_path, users=["ana@example.com"], genie_delay=0.06) as emu:
        emu.add_genie_space("open", Answerer())
        emu.add_genie_space("ana-only", Answerer(), users=["ana@example.com"])
        ana, me = workspace(emu, token=emu.users["ana@example.com"].token), workspace(emu)
        assert ana.genie.get_space("ana-only").space_id == "ana-only"
        asked = ana.genie.start_conversation("ana-only", "revenue?").response
        assert int(ana.genie.get_message("ana-only", asked.conversation_id, asked.message_id).user_id) == int(
            emu.users["ana@example.com"].id)
        denied = "Unable to get space \\[ana-only\\]"  # what the real service answers a user without Can run
        for call in (lambda: me.genie.get_space("ana-only"),
                     lambda: me.genie.start_conversation("ana-only", "revenue?"),
                     lambda: me.genie.get_message("ana-only", asked.conversation_id, asked.message_id)):
            with pytest.raises(ResourceDoesNotExist, match=denied):
                call()
        assert me.genie.get_space("open").space_id == "open"


def test_unknown_route_is_endpoint_not_found(w):
    with pytest.raises(NotFound, match="No API found"):
        w.api_client.do("GET", "/api/2.0/clusters/list")


# ------------------------------------------------------------------ contract: bodies round-trip through the SDK

def test_contract_jobs_bodies(emu, w, tmp_path):
    job_id = emu.add_job(fake_job(max_concurrent_runs=1, timeout_seconds=600))
    skipped_job = emu.add_job(fake_job(name="no queue", queue={"enabled": False}, max_concurrent_runs=0))
    first = w.api_client.do("POST", "/api/2.2/jobs/run-now", body={"job_id": job_id, "job_parameters": {
        "sleep": "0.3", "exit": "2", "stderr": "boom"}})
    roundtrip(jobs.RunNowResponse, first)
    second = w.api_client.do("POST", "/api/2.2/jobs/run-now", body={"job_id": job_id})
    skipped = w.api_client.do("POST", "/api/2.2/jobs/run-now", body={"job_id": skipped_job})
    bodies = [w.api_client.do("GET", "/api/2.2/jobs/runs/get", query={"run_id": r["run_id"]})
              for r in (first, second, skipped)]  # running (or pending), queued, skipped
    wait_ended(w, second["run_id"])
    bodies += [w.api_client.do("GET", "/api/2.2/jobs/runs/get", query={"run_id": r["run_id"]})
               for r in (first, second)]  # failed, succeeded
    assert {b["state"]["life_cycle_state"] for b in bodies} >= {"QUEUED", "SKIPPED", "INTERNAL_ERROR", "TERMINATED"}
    assert {b["status"]["state"] for b in bodies} >= {"QUEUED", "TERMINATED"}
    assert bodies[1]["status"]["queue_details"]["code"] == "MAX_CONCURRENT_RUNS_REACHED"
    for body in bodies:
        roundtrip(jobs.Run, body)
        assert "next_page_token" not in body and "state" in body and "status" in body
    failed, succeeded = [w.api_client.do("GET", "/api/2.2/jobs/runs/get-output",
                                         query={"run_id": body["tasks"][0]["run_id"]}) for body in bodies[3:]]
    for output, body in ((failed, bodies[3]), (succeeded, bodies[4])):
        roundtrip(jobs.RunOutput, output)
        assert output["logs"].startswith("ready pid=") and output["metadata"]["job_run_id"] == body["run_id"]
    assert (failed["error"], failed["error_trace"]) == ("boom", "boom") and "error" not in succeeded
    for query in ({"job_id": job_id}, {"expand_tasks": "true"}, {"job_id": job_id, "limit": 1},
                  {"active_only": "true"}, {"job_id": 999}):
        roundtrip(jobs.ListRunsResponse, w.api_client.do("GET", "/api/2.2/jobs/runs/list", query=query))
    roundtrip(jobs.Job, w.api_client.do("GET", "/api/2.2/jobs/get", query={"job_id": job_id}))
    for query in ({}, {"expand_tasks": "true"}, {"limit": 1}, {"name": "nothing"}):
        roundtrip(jobs.ListJobsResponse, w.api_client.do("GET", "/api/2.2/jobs/list", query=query))


def test_contract_genie_bodies(emu, w):
    emu.add_genie_space("s1", Answerer(), title="Sales")
    start = w.api_client.do("POST", "/api/2.0/genie/spaces/s1/start-conversation", body={"content": "total sales"})
    roundtrip(dashboards.GenieStartConversationResponse, start)
    base = f"/api/2.0/genie/spaces/s1/conversations/{start['conversation_id']}"
    message = wait_for(lambda: (m := w.api_client.do("GET", f"{base}/messages/{start['message_id']}"))
                       ["status"] == "COMPLETED" and m, what="COMPLETED")
    roundtrip(dashboards.GenieMessage, message)
    query = next(a for a in message["attachments"] if "query" in a)
    result = w.api_client.do("GET", f"{base}/messages/{start['message_id']}/attachments/"
                                    f"{query['attachment_id']}/query-result")
    roundtrip(dashboards.GenieGetMessageQueryResultResponse, result)
    roundtrip(dashboards.GenieGetMessageQueryResultResponse, w.api_client.do(
        "POST", f"{base}/messages/{start['message_id']}/attachments/{query['attachment_id']}/execute-query", body={}))
    failed = w.api_client.do("POST", f"{base}/messages", body={"content": "unanswerable"})
    roundtrip(dashboards.GenieMessage, failed)
    failed = wait_for(lambda: (m := w.api_client.do("GET", f"{base}/messages/{failed['message_id']}"))
                      ["status"] == "FAILED" and m, what="FAILED")
    roundtrip(dashboards.GenieMessage, failed)
    roundtrip(dashboards.GenieListConversationMessagesResponse, w.api_client.do("GET", f"{base}/messages"))
    roundtrip(dashboards.GenieSpace, w.api_client.do("GET", "/api/2.0/genie/spaces/s1"))


def test_contract_genie_bodies_as_harsh_as_the_real_genie(make_emulator):
    """Every shape the quirks add: self-correction, a summary without id, suggestions, a description-only answer,
    a clarifying question, a failed attempt's result, PENDING and RUNNING results, an expired message."""
    with make_emulator(genie_delay=0.06, quirks=localws.quirks.HARSH) as emu:
        emu.add_genie_space("s1", Answerer())
        emu.genie_result_delay = 1.0  # a re-executed result is PENDING for 0.5 s, then RUNNING for 0.5 s
        w = workspace(emu)

        def ask(content, cid=None):
            path = f"/api/2.0/genie/spaces/s1/conversations/{cid}/messages" if cid else \
                "/api/2.0/genie/spaces/s1/start-conversation"
            sent = w.api_client.do("POST", path, body={"content": content})
            base = f"/api/2.0/genie/spaces/s1/conversations/{sent['conversation_id']}/messages/{sent['message_id']}"
            message = wait_for(lambda: (m := w.api_client.do("GET", base))["status"] == "COMPLETED" and m,
                               what="COMPLETED")
            roundtrip(dashboards.GenieMessage, message)
            kinds = [next(k for k in ("query", "text", "suggested_questions") if k in attachment)
                     for attachment in message["attachments"]]
            return base, message, kinds

        base, message, kinds = ask("total sales")
        assert kinds == ["query", "text", "query", "text", "suggested_questions"]
        attempt, superseded, query, summary, _ = message["attachments"]
        assert "attachment_id" not in summary and summary["text"]["purpose"] == "TEXT_ATTACHMENT_PURPOSE_ANSWER"
        failed = w.api_client.do("GET", f"{base}/attachments/{attempt['attachment_id']}/query-result")
        roundtrip(dashboards.GenieGetMessageQueryResultResponse, failed)
        assert failed["statement_response"]["status"]["state"] == "FAILED"
        states = [w.api_client.do("POST", f"{base}/attachments/{query['attachment_id']}/execute-query", body={})]
        result = f"{base}/attachments/{query['attachment_id']}/query-result"
        wait_for(lambda: states.append(w.api_client.do("GET", result))
                 or states[-1]["statement_response"]["status"]["state"] == "SUCCEEDED", "the re-executed result",
                 timeout=10)
        for state in states:
            roundtrip(dashboards.GenieGetMessageQueryResultResponse, state)
        seen = [s["statement_response"]["status"]["state"] for s in states]
        order = ["PENDING", "RUNNING", "SUCCEEDED"]
        assert seen[0] == "PENDING" and "RUNNING" in seen and seen == sorted(seen, key=order.index)
        _, second, kinds = ask("and by month?", message["conversation_id"])  # every second answer has no text
        assert kinds == ["query", "text", "query", "suggested_questions"]
        assert second["attachments"][2]["query"]["description"] == "Answer to and by month?"
        _, clarifying, kinds = ask("something unanswerable", message["conversation_id"])
        assert kinds == ["text"] and clarifying["attachments"][0]["text"]["purpose"] == "FOLLOW_UP_QUESTION"
        emu.genie_result_ttl = 0.0  # every result has expired
        expired = w.api_client.do("GET", base)
        roundtrip(dashboards.GenieMessage, expired)
        closed = w.api_client.do("GET", f"{base}/attachments/{query['attachment_id']}/query-result")
        roundtrip(dashboards.GenieGetMessageQueryResultResponse, closed)
        assert (expired["status"], closed["statement_response"]["status"]["state"]) == ("QUERY_RESULT_EXPIRED",
                                                                                        "CLOSED")
        roundtrip(dashboards.GenieListConversationMessagesResponse, w.api_client.do(
            "GET", f"/api/2.0/genie/spaces/s1/conversations/{message['conversation_id']}/messages"))


def test_contract_lakebase_and_scim_bodies(make_emulator):
    endpoint = "projects/p/branches/main/endpoints/rw"
    w = workspace(make_emulator(database_instances={"db1": "db1.local"}, postgres_endpoints={endpoint: "ep.local"}))
    roundtrip(database.DatabaseInstance, w.api_client.do("GET", "/api/2.0/database/instances/db1"))
    roundtrip(database.DatabaseCredential, w.api_client.do(
        "POST", "/api/2.0/database/credentials", body={"instance_names": ["db1"], "request_id": "r"}))
    roundtrip(postgres.Endpoint, w.api_client.do("GET", f"/api/2.0/postgres/{endpoint}"))
    roundtrip(postgres.DatabaseCredential, w.api_client.do(
        "POST", "/api/2.0/postgres/credentials", body={"endpoint": endpoint}))
    roundtrip(iam.User, w.api_client.do("GET", "/api/2.0/preview/scim/v2/Me"))


# ------------------------------------------------------------------ jobs behaviour

def test_run_succeeds_through_the_sdk_waiter(emu, w):
    job_id = emu.add_job(fake_job())
    started = time.monotonic()
    run = w.jobs.run_now(job_id).result(timeout=timedelta(seconds=15))
    assert time.monotonic() - started < 6
    assert (run.state.life_cycle_state, run.state.result_state) == (
        jobs.RunLifeCycleState.TERMINATED, jobs.RunResultState.SUCCESS)
    assert run.status.termination_details.code == jobs.TerminationCodeCode.SUCCESS
    assert run.run_page_url == f"{emu.url}/?o=1#job/{job_id}/run/{run.run_id}"
    assert run.tasks[0].run_id != run.run_id and run.tasks[0].task_key == "worker"
    assert run.run_type == jobs.RunType.JOB_RUN and run.trigger == jobs.TriggerType.ONE_TIME
    assert "ready pid=" in emu.run_log(run.run_id)


def test_a_failed_run_reads_as_on_a_real_workspace_and_its_output_says_why(emu, w):
    job_id = emu.add_job(fake_job())
    run_id = w.jobs.run_now(job_id, job_parameters={"exit": "3", "stderr": "Traceback ...\nValueError: boom"}).run_id
    run = wait_ended(w, run_id)
    # the run's own state says only that the task failed, as on serverless; the reason is in the task's output
    assert (run.state.life_cycle_state, run.state.result_state) == (jobs.RunLifeCycleState.INTERNAL_ERROR,
                                                                    jobs.RunResultState.FAILED)
    assert run.state.state_message == "Task worker failed with message: Workload failed, see run output for details."
    details = run.status.termination_details
    assert run.status.state == jobs.RunLifecycleStateV2State.TERMINATED
    assert (details.code, details.type) == (jobs.TerminationCodeCode.RUN_EXECUTION_ERROR,
                                            jobs.TerminationTypeType.CLIENT_ERROR)
    task = run.tasks[0]
    assert (task.state.life_cycle_state, task.state.state_message) == (
        jobs.RunLifeCycleState.TERMINATED, "Workload failed, see run output for details")
    output = w.jobs.get_run_output(task.run_id)
    assert output.error == "ValueError: boom" and output.error_trace == "Traceback ...\nValueError: boom"
    assert output.logs == f"ready pid={emu.store.get(run_id).pid}\nTraceback ...\nValueError: boom\n"
    assert output.metadata.run_id == task.run_id and output.logs_truncated is False
    with pytest.raises(InvalidParameterValue, match="Retrieving the output of runs with multiple tasks"):
        w.jobs.get_run_output(run_id)  # the job run's id: the real API wants the task's
    with pytest.raises(ResourceDoesNotExist):
        w.jobs.get_run_output(4242)


def test_parameters_are_merged_and_substituted_and_env_is_the_workspaces(emu, w, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "the-developers-own")
    monkeypatch.setenv("HOME_ONLY", "should be removed")
    dump = tmp_path / "dump.json"
    job_id = emu.add_job(fake_job(parameters=[{"name": "dump", "default": str(dump)},
                                              {"name": "sleep", "default": "0"}, {"name": "exit", "default": ""}]))
    run = wait_ended(w, w.jobs.run_now(job_id, job_parameters={"exit": "0"}).run_id)
    assert run.state.result_state == jobs.RunResultState.SUCCESS
    seen = json.loads(dump.read_text())
    argv = seen["argv"]
    assert argv[argv.index("--run-id") + 1] == str(run.run_id)
    assert argv[argv.index("--job-id") + 1] == str(job_id)
    assert argv[argv.index("--dump") + 1] == str(dump) and argv[argv.index("--exit") + 1] == "0"
    assert "{{job.parameters.stderr}}" in argv  # not a parameter of this job: left as written
    assert [(p.name, p.default, p.value) for p in run.job_parameters] == [
        ("dump", str(dump), str(dump)), ("sleep", "0", "0"), ("exit", "", "0")]
    env = seen["env"]
    assert env["DATABRICKS_HOST"] == emu.url and env["DATABRICKS_TOKEN"] == emu.token
    assert "DATABRICKS_CLIENT_ID" not in env and "HOME_ONLY" not in env
    assert env["EXTRA_VAR"] == "from-workspace"


def test_run_now_validates_its_request(emu, w):
    job_id = emu.add_job(fake_job())
    with pytest.raises(InvalidParameterValue, match="nope"):
        w.jobs.run_now(job_id, job_parameters={"nope": "1"})
    with pytest.raises(InvalidParameterValue, match="64"):
        w.jobs.run_now(job_id, idempotency_token="x" * 65)
    with pytest.raises(InvalidParameterValue, match="Job 999 does not exist"):
        w.jobs.run_now(999)
    assert not list(w.jobs.list_runs(job_id=job_id))


def test_idempotency_token_returns_the_same_run(emu, w):
    job_id = emu.add_job(fake_job(max_concurrent_runs=5))
    first = w.jobs.run_now(job_id, idempotency_token="t" * 64).run_id
    again = w.jobs.run_now(job_id, idempotency_token="t" * 64, job_parameters={"exit": "1"}).run_id
    other = w.jobs.run_now(job_id, idempotency_token="other").run_id
    assert first == again != other
    assert len(list(w.jobs.list_runs(job_id=job_id))) == 2


def test_cancel_sends_sigterm(emu, w):
    job_id = emu.add_job(fake_job())
    run_id = w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id
    wait_for(lambda: "ready" in emu.run_log(run_id), what="worker ready")
    started = time.monotonic()
    w.jobs.cancel_run(run_id)
    run = wait_ended(w, run_id, timeout=5)
    assert time.monotonic() - started < emu.cancel_grace + 0.4  # no SIGKILL needed
    assert run.state.result_state == jobs.RunResultState.CANCELED
    assert run.status.termination_details.code == jobs.TerminationCodeCode.USER_CANCELED
    assert "killed" not in run.state.state_message


def test_cancel_kills_a_worker_that_ignores_sigterm(emu, w):
    job_id = emu.add_job(fake_job())
    run_id = w.jobs.run_now(job_id, job_parameters={"sleep": "30", "ignore_sigterm": "yes"}).run_id
    wait_for(lambda: "ready" in emu.run_log(run_id), what="worker ready")
    started = time.monotonic()
    w.jobs.cancel_run(run_id)
    assert w.jobs.get_run(run_id).state.life_cycle_state == jobs.RunLifeCycleState.TERMINATING
    run = wait_ended(w, run_id, timeout=5)
    assert time.monotonic() - started >= emu.cancel_grace
    assert run.state.result_state == jobs.RunResultState.CANCELED
    assert "ignored SIGTERM and was killed" in run.state.state_message
    w.jobs.cancel_run(run_id)  # cancelling an ended run is a no-op
    assert w.jobs.get_run(run_id).state.result_state == jobs.RunResultState.CANCELED


def test_worker_killed_from_outside_fails_with_sigkill(emu, w):
    job_id = emu.add_job(fake_job())
    run_id = w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id
    log = wait_for(lambda: "ready" in (text := emu.run_log(run_id)) and text, what="worker ready")
    os.kill(int(log.split("pid=")[1].split()[0]), signal.SIGKILL)
    run = wait_ended(w, run_id)
    assert run.state.result_state == jobs.RunResultState.FAILED
    assert w.jobs.get_run_output(run.tasks[0].run_id).error == "the worker process was killed by SIGKILL (signal 9)"


def test_timeout_seconds_times_the_run_out(emu, w):
    job_id = emu.add_job(fake_job(timeout_seconds=1))
    run = wait_ended(w, w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id)
    assert run.state.result_state == jobs.RunResultState.TIMEDOUT
    assert run.state.user_cancelled_or_timedout is True


def test_concurrency_cap_queues_then_starts(emu, w, tmp_path):
    job_id = emu.add_job(fake_job(max_concurrent_runs=1))
    first = w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id
    dump = tmp_path / "second.json"
    second = w.jobs.run_now(job_id, job_parameters={"dump": str(dump)}).run_id
    third = w.jobs.run_now(job_id, job_parameters={"dump": str(tmp_path / "third.json")}).run_id
    queued = w.jobs.get_run(second)
    assert queued.state.life_cycle_state == jobs.RunLifeCycleState.QUEUED
    assert queued.status.queue_details.code == jobs.QueueDetailsCodeCode.MAX_CONCURRENT_RUNS_REACHED
    assert queued.state.queue_reason
    assert {r.run_id for r in w.jobs.list_runs(job_id=job_id, active_only=True)} == {first, second, third}
    w.jobs.cancel_run(third)  # a queued run is cancelled without ever starting
    assert wait_ended(w, third).state.result_state == jobs.RunResultState.CANCELED
    time.sleep(0.3)
    assert not dump.exists()
    w.jobs.cancel_run(first)
    assert wait_ended(w, second).state.result_state == jobs.RunResultState.SUCCESS
    assert dump.exists() and not (tmp_path / "third.json").exists()
    assert {r.run_id for r in w.jobs.list_runs(job_id=job_id, completed_only=True)} == {first, second, third}


def test_quirk_jobs_queued_holds_every_run_queued_first(make_emulator):
    with make_emulator(quirks={"jobs_queued"}) as emu:
        emu.jobs_queue_delay = 0.5
        w = workspace(emu)
        job_id = emu.add_job(fake_job(max_concurrent_runs=5))
        started = time.monotonic()
        run_id = w.jobs.run_now(job_id).run_id
        queued = w.jobs.get_run(run_id)
        assert queued.status.state == jobs.RunLifecycleStateV2State.QUEUED
        assert queued.status.queue_details.code == jobs.QueueDetailsCodeCode.ACTIVE_RUNS_LIMIT_REACHED
        assert queued.state.queue_reason == queued.status.queue_details.message
        assert wait_ended(w, run_id).state.result_state == jobs.RunResultState.SUCCESS
        assert time.monotonic() - started >= 0.5
        held = w.jobs.run_now(job_id).run_id
        w.jobs.cancel_run(held)  # a held run is cancelled without ever starting
        assert wait_ended(w, held).state.result_state == jobs.RunResultState.CANCELED
        time.sleep(0.7)
        assert w.jobs.get_run(held).state.result_state == jobs.RunResultState.CANCELED and not emu.run_log(held)
    with pytest.raises(ValueError, match="unknown local workspace quirk"):
        localws.Emulator(project_dir=ROOT, quirks={"jobs_nope"})


def test_without_queue_a_run_over_the_cap_is_skipped(emu, w):
    job_id = emu.add_job(fake_job(queue={"enabled": False}))
    first = w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id
    skipped = w.jobs.run_now(job_id).result(timeout=timedelta(seconds=5))  # the waiter returns on SKIPPED
    assert skipped.state.life_cycle_state == jobs.RunLifeCycleState.SKIPPED
    assert skipped.state.result_state == jobs.RunResultState.MAXIMUM_CONCURRENT_RUNS_REACHED
    assert skipped.status.termination_details.code == jobs.TerminationCodeCode.MAX_CONCURRENT_RUNS_EXCEEDED
    w.jobs.cancel_run(first)


def test_missing_python_file_fails_the_run(emu, w):
    job = fake_job()
    job["tasks"][0]["spark_python_task"]["python_file"] = "no_such_worker.py"
    run = wait_ended(w, w.jobs.run_now(emu.add_job(job)).run_id)
    assert run.state.result_state == jobs.RunResultState.FAILED
    assert run.status.termination_details.code == jobs.TerminationCodeCode.RESOURCE_NOT_FOUND
    assert "no_such_worker.py" in run.state.state_message


def test_the_run_page_is_served_to_a_browser_with_each_run_under_its_anchor(pg_dsn, tmp_path):
    with localws.Emulator(dsn=pg_dsn, project_dir=ROOT, log_dir=tmp_path, env={"LAKEBASE_DSN": pg_dsn}) as emu:
        w = workspace(emu)
        job = fake_job()
        job["parameters"].append({"name": "request", "default": ""})
        job_id = emu.add_job(job)
        run = wait_ended(w, w.jobs.run_now(job_id, job_parameters={"request": "<script>alert(1)</script>"}).run_id)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # what the worker would have logged
            lakebase.migrate(conn)
            lakebase.log_step(conn, str(run.run_id), "started", {"request": "<b>revenue</b>"})
            lakebase.log_step(conn, str(run.run_id), "completed", {"answer": "Revenue & growth: <42>"})
        page = requests.get(run.run_page_url, timeout=5)  # no token: a browser has none
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert f'<section id="job/{job_id}/run/{run.run_id}">' in page.text
    assert "TERMINATED SUCCESS" in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "#1 started: &lt;b&gt;revenue&lt;/b&gt;" in page.text and "Revenue &amp; growth: &lt;42&gt;" in page.text
    assert "<script>" not in page.text and "<b>revenue" not in page.text


def test_peer_uid_names_the_user_at_the_other_end_of_a_local_connection(emu):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("the system does not say who is connecting (no /proc/net/tcp)")
    with requests.Session() as session:
        session.get(emu.url + "/", timeout=5)
        peer = emu.calls("GET", "/")[-1].peer
        assert localws.emulator.peer_uid(peer, int(emu.url.rsplit(":", 1)[1])) == os.getuid()
    assert localws.emulator.peer_uid(("127.0.0.1", 1), 2) is None  # no such connection
    if os.getuid() == 0:  # root can become someone else: another user of this machine is refused the run page
        assert fetch_as(65534, emu.url + "/?o=1").split()[1] == "403"


def fetch_as(uid, url):
    """The status line of a GET of `url` made by a process running as `uid` (a fork: only sockets in the child)."""
    import socket
    host, port = url.split("//")[1].split("/")[0].split(":")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(f"GET /{url.split('/', 3)[3]} HTTP/1.0\r\n\r\n".encode())
                os.write(write, conn.recv(200).split(b"\r\n")[0])
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as status:
        return status.read().decode()


def test_unknown_run_and_job(emu, w):
    with pytest.raises(ResourceDoesNotExist, match="Run 4242 does not exist"):
        w.jobs.get_run(4242)
    with pytest.raises(InvalidParameterValue):
        w.jobs.cancel_run(4242)
    with pytest.raises(ResourceDoesNotExist):
        w.jobs.get(77)


def test_list_runs_pages_and_checks_its_limit(emu, w):
    job_id = emu.add_job(fake_job(max_concurrent_runs=10))
    ids = [w.jobs.run_now(job_id).run_id for _ in range(5)]
    listed = [r.run_id for r in w.jobs.list_runs(job_id=job_id, limit=2)]  # the SDK follows next_page_token
    assert listed == sorted(ids, reverse=True)
    assert len(emu.calls("GET", "/api/2.2/jobs/runs/list")) == 3
    assert all(r.tasks == [] for r in w.jobs.list_runs(job_id=job_id))  # tasks only with expand_tasks
    assert all(r.tasks for r in w.jobs.list_runs(job_id=job_id, expand_tasks=True))
    with pytest.raises(InvalidParameterValue, match="limit"):
        list(w.jobs.list_runs(limit=25))
    with pytest.raises(InvalidParameterValue):
        list(w.jobs.list_runs(active_only=True, completed_only=True))
    for run_id in ids:
        wait_ended(w, run_id)


def test_get_and_list_jobs(emu, w):
    job_id = emu.add_job(fake_job(name="Worker Job"))
    job = w.jobs.get(job_id)
    assert job.settings.name == "Worker Job" and job.settings.max_concurrent_runs == 1
    assert job.settings.tasks[0].spark_python_task.python_file == FAKE_WORKER
    assert [j.job_id for j in w.jobs.list(name="worker job")] == [job_id]


def test_runs_persist_across_restarts(pg_dsn, tmp_path):
    with localws.Emulator(dsn=pg_dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
        w = workspace(emu)
        job_id = emu.add_job(fake_job())
        old = w.jobs.run_now(job_id, idempotency_token="persisted").run_id
        wait_ended(w, old)
        sleeping = w.jobs.run_now(job_id, job_parameters={"sleep": "30"}).run_id
        wait_for(lambda: "ready" in emu.run_log(sleeping), what="worker ready")
    with localws.Emulator(dsn=pg_dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
        w = workspace(emu)
        emu.add_job(fake_job(), job_id=job_id)
        assert w.jobs.get_run(old).state.result_state == jobs.RunResultState.SUCCESS
        stopped = w.jobs.get_run(sleeping)  # closing the workspace stopped it, like a cancel
        assert stopped.state.result_state == jobs.RunResultState.CANCELED
        assert stopped.state.state_message == localws.jobs.CLOSED_MESSAGE
        assert w.jobs.run_now(job_id, idempotency_token="persisted").run_id == old
        new = w.jobs.run_now(job_id).run_id
        assert new > max(old, sleeping)
        assert [r.run_id for r in w.jobs.list_runs(job_id=job_id)][:1] == [new]
        wait_ended(w, new)


def test_the_run_store_survives_a_terminated_backend_and_a_server_restart(own, own_dsn, tmp_path):
    with localws.Emulator(dsn=own_dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
        w = workspace(emu)
        job_id = emu.add_job(fake_job())
        first = w.jobs.run_now(job_id).run_id
        wait_ended(w, first)
        with psycopg.connect(own_dsn, autocommit=True) as admin:  # what the model's SQL could once do
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                          "where datname = current_database() and pid <> pg_backend_pid()")
        assert w.jobs.get_run(first).state.result_state == jobs.RunResultState.SUCCESS
        second = w.jobs.run_now(job_id, job_parameters={"sleep": "1"}).run_id
        wait_for(lambda: "ready" in emu.run_log(second), what="worker ready")
        pg_fixture.stop(own)  # the run ends while the database is down: answered from memory, saved later
        assert wait_ended(w, second).state.result_state == jobs.RunResultState.SUCCESS
        pg_fixture.start(own)
        third = w.jobs.run_now(job_id).run_id
        assert wait_ended(w, third).state.result_state == jobs.RunResultState.SUCCESS
    with localws.Emulator(dsn=own_dsn, project_dir=ROOT, log_dir=tmp_path) as again:
        assert [again.store.get(r).result for r in (first, second, third)] == ["SUCCESS"] * 3


def test_a_run_that_ended_while_the_database_is_down_gives_its_output(own, own_dsn, tmp_path):
    with localws.Emulator(dsn=own_dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
        w = workspace(emu, retry_timeout=3)
        run_id = w.jobs.run_now(emu.add_job(fake_job()), job_parameters={
            "sleep": "1", "stderr": "ValueError: boom", "exit": "1"}).run_id
        wait_for(lambda: "ready" in emu.run_log(run_id), what="worker ready")
        pg_fixture.stop(own)  # the run ends while the database is down: its end is kept in memory only
        run = wait_ended(w, run_id)
        assert run.state.result_state == jobs.RunResultState.FAILED
        output = w.jobs.get_run_output(run.tasks[0].run_id)  # when the agent needs it most
        assert output.error == "ValueError: boom" and output.metadata.job_run_id == run_id
        pg_fixture.start(own)


def test_a_retried_run_now_finds_a_run_the_database_never_saw(own_dsn, tmp_path):
    with localws.Emulator(dsn=own_dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
        w = workspace(emu)
        job_id = emu.add_job(fake_job())
        with emu._lock:
            emu.store.conn.execute("set statement_timeout = '300ms'")
        with psycopg.connect(own_dsn, autocommit=True) as admin:
            with admin.transaction():  # while this holds the table every save of the run times out; reads pass
                admin.execute("lock table local_workspace.runs in exclusive mode")
                first = w.jobs.run_now(job_id, idempotency_token="once", job_parameters={"sleep": "30"}).run_id
                wait_for(lambda: emu.live[first].life == "RUNNING", what="run started")
                with emu._lock:  # its RUNNING save has failed by now
                    pass
            assert admin.execute("select count(*) from local_workspace.runs").fetchone() == (0,)
        assert w.jobs.run_now(job_id, idempotency_token="once").run_id == first
        assert emu.active_runs() == [first]


def test_run_logs_of_two_databases_never_mix(pg_server, tmp_path):
    dsns = [pg_server.fresh_database() for _ in range(2)]
    try:
        for dsn in dsns:  # the same log directory, as `python primary.py` with and without LAKEBASE_DSN
            with localws.Emulator(dsn=dsn, project_dir=ROOT, log_dir=tmp_path) as emu:
                w = workspace(emu)
                job_id = emu.add_job(fake_job())
                run_id = w.jobs.run_now(job_id, job_parameters={"stderr": f"from {dsn}"}).run_id
                wait_ended(w, run_id)
                assert emu.run_log(run_id, "stderr") == f"from {dsn}\n"  # not appended to the other's run 1
        assert sorted(p.name for p in tmp_path.glob("*/run-*.stderr")) == ["run-1.stderr"] * 2
    finally:
        for dsn in dsns:
            pg_server.drop_database(dsn)


def test_run_logs_are_private_and_a_temporary_log_dir_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-temp"))
    (tmp_path / "system-temp").mkdir()
    for log_dir in (tmp_path / "logs", None):
        with localws.Emulator(project_dir=ROOT, log_dir=log_dir) as emu:
            w = workspace(emu)
            run_id = w.jobs.run_now(emu.add_job(fake_job())).run_id
            wait_ended(w, run_id)
            assert emu.run_log(run_id).startswith("ready")
            logs = list(emu.log_dir.glob("run-*"))
            assert len(logs) == 2 and {p.stat().st_mode & 0o777 for p in logs} == {0o600}
            assert emu.log_dir.stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "system-temp").iterdir())  # no local-runs-* left behind


def test_closing_the_workspace_stops_its_runs(tmp_path):
    emu = localws.Emulator(project_dir=ROOT, log_dir=tmp_path, cancel_grace=0.3)
    w = workspace(emu)
    job_id = emu.add_job(fake_job())
    running = w.jobs.run_now(job_id, job_parameters={"sleep": "30", "ignore_sigterm": "yes"}).run_id
    queued = w.jobs.run_now(job_id).run_id
    wait_for(lambda: "ready" in emu.run_log(running), what="worker ready")
    pid = int(emu.run_log(running).split("pid=")[1].split()[0])
    assert emu.active_runs() == sorted([running, queued])
    started = time.monotonic()
    emu.close()
    assert time.monotonic() - started < 3
    assert not localws.jobs._alive(pid)  # killed after the grace, and reaped
    for run_id in (running, queued):
        rec = emu.store.get(run_id)
        assert (rec.life, rec.result, rec.message) == ("TERMINATED", "CANCELED", localws.jobs.CLOSED_MESSAGE)


def test_load_job_resolves_bundle_variables(tmp_path):
    (tmp_path / "databricks.yml").write_text("""
bundle: {name: demo}
include: [resources/*.yml]
variables:
  genie_space_id: {description: space, default: "abc"}
  llm_endpoint: {default: "databricks-claude-sonnet-4-5"}
  warehouse: {description: no default}
""")
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "job.yml").write_text("""
resources:
  jobs:
    worker:
      name: "worker ${var.genie_space_id}"
      max_concurrent_runs: 4
      parameters:
        - {name: genie_space_id, default: "${var.genie_space_id}"}
        - {name: llm_endpoint, default: "${var.llm_endpoint}"}
      tasks:
        - task_key: worker
          spark_python_task:
            python_file: ../worker.py
            parameters: ["--genie-space-id", "{{job.parameters.genie_space_id}}"]
""")
    job = localws.emulator.load_job(tmp_path, {"llm_endpoint": "other"})
    assert job["name"] == "worker abc" and job["max_concurrent_runs"] == 4
    assert job["parameters"] == [{"name": "genie_space_id", "default": "abc"},
                                 {"name": "llm_endpoint", "default": "other"}]
    assert job["tasks"][0]["spark_python_task"]["python_file"] == "worker.py"
    (tmp_path / "resources" / "job.yml").write_text("resources: {jobs: {w: {name: '${var.warehouse}'}}}")
    with pytest.raises(ValueError, match="warehouse"):
        localws.emulator.load_job(tmp_path)


# ------------------------------------------------------------------ Genie behaviour

@pytest.fixture
def genie(emu, answerer):
    emu.add_genie_space("space", answerer, title="Sales", description="sales data")
    return answerer


def wait_message(w, conversation_id, message_id, statuses, timeout=5.0):
    def check():
        message = w.genie.get_message("space", conversation_id, message_id)
        return message if message.status.value in statuses else None
    return wait_for(check, f"message to reach {statuses}", timeout=timeout)


def test_genie_conversation_with_follow_up_and_query_result(emu, w, genie):
    started = time.monotonic()
    message = w.genie.start_conversation_and_wait("space", "total sales by region", timeout=timedelta(seconds=10))
    assert time.monotonic() - started < 4
    assert message.status == dashboards.MessageStatus.COMPLETED
    query = next(a for a in message.attachments if a.query)
    text = next(a for a in message.attachments if a.text)
    assert query.query.query.startswith("SELECT region") and query.query.query_result_metadata.row_count == 2
    assert text.text.content == "Answer to total sales by region"
    assert text.text.purpose == dashboards.TextAttachmentPurpose.TEXT_ATTACHMENT_PURPOSE_ANSWER
    result = w.genie.get_message_attachment_query_result("space", message.conversation_id, message.message_id,
                                                         query.attachment_id).statement_response
    assert result.status.state.value == "SUCCEEDED"
    assert [(c.name, c.type_name.value, c.position) for c in result.manifest.schema.columns] == [
        ("region", "STRING", 0), ("total", "DECIMAL", 1)]
    assert result.result.data_array == [["east", "10.50"], ["west", None]]

    follow = w.genie.create_message("space", message.conversation_id, "and explain it")
    follow_up = wait_message(w, message.conversation_id, follow.message_id, ("COMPLETED",))
    assert [a.query for a in follow_up.attachments] == [None]  # a text-only answer
    assert genie.asked[1] == ("and explain it", [{"question": "total sales by region",
                                                  "text": "Answer to total sales by region",
                                                  "sql": SQL}])
    listed = list(w.genie.list_conversation_messages("space", message.conversation_id).messages)
    assert [m.message_id for m in listed] == [message.message_id, follow.message_id]
    space = w.genie.get_space("space")
    assert (space.title, space.description) == ("Sales", "sales data")


def test_genie_message_passes_through_its_states(emu, w, genie):
    emu.genie_delay = 0.6
    waiter = w.genie.start_conversation("space", "total sales")
    seen = set()
    wait_for(lambda: seen.add(w.genie.get_message("space", waiter.conversation_id, waiter.message_id)
                              .status.value) or "COMPLETED" in seen, what="COMPLETED", every=0.03)
    assert {"SUBMITTED", "ASKING_AI", "EXECUTING_QUERY", "COMPLETED"} <= seen


def test_genie_cannot_answer_fails_the_message(emu, w, genie):
    waiter = w.genie.start_conversation("space", "something unanswerable")
    with pytest.raises(OperationFailed):  # the SDK waiter raises on FAILED
        waiter.result(timeout=timedelta(seconds=10))
    message = w.genie.get_message("space", waiter.conversation_id, waiter.message_id)
    assert message.error.error == "I can only answer questions about sales."
    assert message.error.type == dashboards.MessageErrorType.MISSING_SQL_QUERY_EXCEPTION
    assert message.attachments == []


def test_genie_scripted_faults(emu, w, genie):
    emu.genie_fault("space", "failed", "warehouse is down")
    emu.genie_fault("space", "cancelled")
    emu.genie_fault("space", "hang")
    first = w.genie.start_conversation("space", "q1")
    cid = first.conversation_id
    failed = wait_message(w, cid, first.message_id, ("FAILED",))
    assert failed.error.error == "warehouse is down" and failed.error.type is not None
    second = w.genie.create_message("space", cid, "q2").message_id
    assert wait_message(w, cid, second, ("CANCELLED",)).attachments == []
    third = w.genie.create_message("space", cid, "q3").message_id
    wait_message(w, cid, third, ("EXECUTING_QUERY",))
    time.sleep(0.3)
    hanging = w.genie.get_message("space", cid, third)
    assert hanging.status == dashboards.MessageStatus.EXECUTING_QUERY
    running = w.genie.get_message_attachment_query_result("space", cid, third, hanging.attachments[0].attachment_id)
    assert running.statement_response.status.state.value == "RUNNING"
    assert [q for q, _ in genie.asked] == ["q3"]  # failed and cancelled never reached the answerer


def test_genie_expired_result_is_re_executed(emu, w, genie):
    emu.genie_fault("space", "expired")
    waiter = w.genie.start_conversation("space", "total sales")
    cid, mid = waiter.conversation_id, waiter.message_id
    message = wait_message(w, cid, mid, ("QUERY_RESULT_EXPIRED",))
    aid = next(a for a in message.attachments if a.query).attachment_id
    closed = w.genie.get_message_attachment_query_result("space", cid, mid, aid).statement_response
    assert closed.status.state.value == "CLOSED" and closed.result is None
    rerun = w.genie.execute_message_attachment_query("space", cid, mid, aid).statement_response
    assert rerun.status.state.value == "SUCCEEDED" and rerun.statement_id != closed.statement_id
    assert rerun.result.data_array == [["east", "10.50"], ["west", None]]
    assert w.genie.get_message("space", cid, mid).status == dashboards.MessageStatus.COMPLETED


def test_genie_unknown_space_conversation_and_attachment(emu, w, genie):
    with pytest.raises(ResourceDoesNotExist):
        w.genie.start_conversation("nope", "q")
    with pytest.raises(ResourceDoesNotExist):
        w.genie.create_message("space", "no-such-conversation", "q")
    waiter = w.genie.start_conversation("space", "total")
    with pytest.raises(ResourceDoesNotExist):
        w.genie.get_message_attachment_query_result("space", waiter.conversation_id, waiter.message_id, "x")
    with pytest.raises(InvalidParameterValue):
        w.api_client.do("POST", "/api/2.0/genie/spaces/space/start-conversation", body={"content": " "})


def test_genie_rate_limit_answers_429_and_the_sdk_retries(make_emulator):
    emu = make_emulator(genie_delay=0.03, genie_rate_limit=2, genie_rate_window=1.0)
    emu.add_genie_space("space", Answerer())
    w = workspace(emu)
    for question in ("a", "b"):
        w.genie.start_conversation("space", question)
    refused = requests.post(emu.url + "/api/2.0/genie/spaces/space/start-conversation", json={"content": "c"},
                            headers={"Authorization": f"Bearer {emu.token}"}, timeout=5)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error_code"] == "RESOURCE_EXHAUSTED"
    started = time.monotonic()
    w.genie.start_conversation("space", "d")  # refused with Retry-After: 1, retried by the SDK
    assert time.monotonic() - started >= 0.5
    assert [r.status for r in emu.calls("POST")] == [200, 200, 429, 429, 200]
    w.genie.get_space("space")  # reads are not limited


def test_quirks_are_one_registry_off_by_default_all_on_with_localws_harsh(emu, caplog):
    assert emu.quirks == frozenset() and set(localws.quirks.HARSH) == set(localws.quirks.QUIRKS)
    assert all(isinstance(text, str) and text and "\n" not in text for text in localws.quirks.QUIRKS.values())
    with pytest.raises(ValueError, match="unknown local workspace quirk.s. nope; known: genie_clarifying_question, "):
        localws.Emulator(project_dir=ROOT, quirks={"nope"})
    assert localws.quirks.from_env({"LOCALWS_HARSH": "1"}) == localws.quirks.HARSH
    assert localws.quirks.from_env({}) == localws.quirks.from_env({"LOCALWS_HARSH": "0"}) == frozenset()
    assert localws.quirks.from_env({"LOCALWS_HARSH": "genie_rate_limit, nope"}) == {"genie_rate_limit"}
    assert "LOCALWS_HARSH: unknown quirk(s) nope left out" in caplog.text


def test_genie_rate_limit_quirk_is_five_questions_a_minute_per_workspace(make_emulator):
    with make_emulator(quirks={"genie_rate_limit"}) as emu:
        emu.add_genie_space("space", Answerer())
        emu.add_genie_space("other", Answerer())

        def post(space):
            return requests.post(f"{emu.url}/api/2.0/genie/spaces/{space}/start-conversation", json={"content": "q"},
                                 headers={"Authorization": f"Bearer {emu.token}"}, timeout=5)
        assert [post(space).status_code for space in ["space", "other"] * 2 + ["space"]] == [200] * 5
        refused = post("other")  # the limit is the workspace's, across spaces
        assert refused.status_code == 429 and refused.json()["error_code"] == "RESOURCE_EXHAUSTED"
        assert 50 <= int(refused.headers["Retry-After"]) <= 60


# ------------------------------------------------------------------ Lakebase credentials

def test_database_instance_credentials_can_become_a_real_password(pg_dsn, tmp_path):
    minted = []

    def make_password(user, token, expires_at):
        minted.append((user, token, expires_at))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("create role {} login password {}").format(
                psycopg.sql.Identifier(user), psycopg.sql.Literal(token)))

    with localws.Emulator(project_dir=ROOT, log_dir=tmp_path, user="ana@example.com",
                        database_instances={"db1": "127.0.0.1"}, on_credential=make_password) as emu:
        w = workspace(emu)
        instance = w.database.get_database_instance("db1")
        assert instance.state == database.DatabaseInstanceState.AVAILABLE and instance.read_write_dns == "127.0.0.1"
        credential = w.database.generate_database_credential(instance_names=["db1"])
        assert minted[0][:2] == ("ana@example.com", credential.token)
        assert credential.expiration_time.endswith("Z")
        request = emu.calls("POST", "/api/2.0/database/credentials")[0].body
        assert request["instance_names"] == ["db1"] and request["request_id"]  # the SDK fills in a uuid
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("select rolpassword is not null from pg_authid where rolname = %s",
                                ("ana@example.com",)).fetchone() == (True,)
        with pytest.raises(ResourceDoesNotExist):
            w.database.get_database_instance("nope")
        with pytest.raises(ResourceDoesNotExist):
            w.database.generate_database_credential(instance_names=["nope"])


def test_postgres_endpoint_and_credentials(make_emulator):
    name = "projects/p/branches/main/endpoints/primary"
    w = workspace(make_emulator(postgres_endpoints={name: "ep-1.local"}))
    endpoint = w.postgres.get_endpoint(name)
    assert endpoint.status.hosts.host == "ep-1.local"
    assert endpoint.status.current_state == postgres.EndpointStatusState.ACTIVE
    credential = w.postgres.generate_database_credential(name)
    assert credential.token.startswith("local-") and credential.expire_time.seconds > time.time() + 3000
    with pytest.raises(InvalidParameterValue, match="projects/"):
        w.postgres.generate_database_credential("db1")
    with pytest.raises(ResourceDoesNotExist):
        w.postgres.get_endpoint("projects/p/branches/main/endpoints/other")


# ------------------------------------------------------------------ serving, faults, request log

def chat_reply(body):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "stand-in",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"echo {body['messages'][-1]['content']}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_serving_routes(make_emulator):
    emu = make_emulator(serving={"model-a": chat_reply})
    w = workspace(emu)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    reply = w.api_client.do("POST", "/serving-endpoints/model-a/invocations", body=body)
    assert reply["choices"][0]["message"]["content"] == "echo hi"
    headers = {"Authorization": f"Bearer {emu.token}"}
    openai_style = requests.post(emu.url + "/serving-endpoints/chat/completions", headers=headers, timeout=5,
                                 json={"model": "model-a", **body})
    assert openai_style.json()["choices"][0]["message"]["content"] == "echo hi"
    with pytest.raises(ResourceDoesNotExist, match="model-b"):
        w.api_client.do("POST", "/serving-endpoints/model-b/invocations", body=body)
    missing = requests.post(emu.url + "/serving-endpoints/chat/completions", headers=headers, timeout=5,
                            json={"model": "model-b", **body})
    assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_chat_routes_stream_when_asked_like_a_serving_endpoint(make_emulator):
    with make_emulator(serving={"model-a": chat_reply}) as emu:
        headers = {"Authorization": f"Bearer {emu.token}"}
        body = {"messages": [{"role": "user", "content": "hi there, model"}], "stream": True}
        with requests.post(emu.url + "/serving-endpoints/model-a/invocations", headers=headers, json=body,
                           stream=True, timeout=5) as answer:
            assert answer.headers["Content-Type"] == "text/event-stream"
            assert answer.headers["Transfer-Encoding"] == "chunked"
            events = [line.removeprefix("data: ") for line in answer.iter_lines(decode_unicode=True) if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {(c["object"], c["id"]) for c in chunks} == {("chat.completion.chunk", "chatcmpl-1")}
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        assert deltas[0] == "" and len(deltas) > 3 and "".join(filter(None, deltas)) == "echo hi there, model"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 2


def test_the_chat_client_reads_the_emulated_stream_as_the_whole_answer(make_emulator):
    import llm
    import localws.stand_in

    with make_emulator(serving={"stand-in": localws.stand_in.stand_in_reply}) as emu:
        config = Config(host=emu.url, token=emu.token, auth_type="pat")
        streamed, whole = llm.databricks_chat("stand-in", config), llm.databricks_chat("stand-in", config, stream=False)
        tools = [{"type": "function", "function": {"name": "start_databricks_job", "parameters": {}}}]
        for question in ("hello", "What was the revenue in 2025?"):  # a text answer, then a tool call
            messages = [{"role": "system", "content": "You are the assistant."}, {"role": "user", "content": question}]
            texts = []
            reply = streamed.complete(messages, tools=tools, on_text=texts.append)
            assert reply == whole.complete(messages, tools=tools) and "".join(texts) == (reply["content"] or "")
            assert len(texts) > 1 or "tool_calls" in reply
        assert len(emu.calls("POST", "/serving-endpoints/stand-in")) == 4


def test_injected_faults_come_before_the_route(emu, w):
    job_id = emu.add_job(fake_job())
    run_id = w.jobs.run_now(job_id).run_id
    emu.inject("GET", "/api/2.2/jobs/runs/get", 503, retry_after=1)
    started = time.monotonic()
    assert w.jobs.get_run(run_id).run_id == run_id  # the SDK retried the 503 after Retry-After
    assert time.monotonic() - started >= 0.9
    emu.inject("GET", "/api/2.2/jobs/runs/get", 503, times=None)
    with pytest.raises(TimeoutError):
        workspace(emu, retry_timeout=1).jobs.get_run(run_id)
    emu._faults.clear()
    emu.inject("POST", "/api/2.2/jobs/run-now", 400, "INVALID_PARAMETER_VALUE", "scripted refusal")
    with pytest.raises(InvalidParameterValue, match="scripted refusal"):
        w.jobs.run_now(job_id)
    wait_ended(w, run_id)


def test_request_log_records_method_path_and_body(emu, w):
    job_id = emu.add_job(fake_job())
    w.jobs.run_now(job_id, job_parameters={"exit": "0"}, idempotency_token="tok")
    call = emu.calls("POST", "/api/2.2/jobs/run-now")[0]
    assert call.body == {"job_id": job_id, "job_parameters": {"exit": "0"}, "idempotency_token": "tok"}
    assert call.headers["authorization"] == f"Bearer {emu.token}"


# ------------------------------------------------------------------ the composed local workspace

def test_embedded_postgres_keeps_its_data_across_restarts(scratch):
    handle, dsn = localws.embedded.start(scratch / "pgdata", say=print)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("create table kept(x int)")
            conn.execute("insert into kept values (42)")
    finally:
        localws.embedded.stop(handle)  # stops the server; the data directory stays
    handle, dsn = localws.embedded.start(scratch / "pgdata", say=print)
    try:
        with psycopg.connect(dsn) as conn:
            assert conn.info.dbname == "databricks_postgres"
            assert conn.execute("select x from kept").fetchone() == (42,)
    finally:
        localws.embedded.stop(handle)


def test_local_start_composes_the_workspace(pg_dsn, tmp_path):
    with localws.start(ROOT, data_dir=tmp_path, dsn=pg_dsn, cancel_grace=1, genie_delay=0.05) as ws:
        assert ws.emulator.quirks == frozenset() and ws.emulator.genie_rate_limit is None  # kind by default
        w = workspace(ws.emulator)
        roundtrip(jobs.Job, w.api_client.do("GET", "/api/2.2/jobs/get", query={"job_id": ws.job_id}))
        job = w.jobs.get(ws.job_id).settings
        assert ws.job_id == 1 and job.tasks[0].spark_python_task.python_file == "worker.py"
        assert job.tasks[0].disable_auto_optimization is True  # bundle task keys the SDK knows are kept
        defaults = {p.name: p.default for p in job.parameters}
        assert defaults["genie_space_id"] == localws.GENIE_SPACE and defaults["lakebase_instance"] == ""
        assert w.genie.get_space(ws.genie_space_id).space_id == localws.GENIE_SPACE
        reply = w.api_client.do("POST", f"/serving-endpoints/{defaults['llm_endpoint']}/invocations",
                                body={"messages": [{"role": "user", "content": "hello"}]})
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert ws.emulator.env["LAKEBASE_DSN"] == pg_dsn and ws.emulator.env["GENIE_SPACE_ID"] == localws.GENIE_SPACE
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select to_regclass('local_workspace.runs')").fetchone()[0] is not None


def test_local_start_plays_the_quirks_it_is_given(pg_dsn, tmp_path):
    with localws.start(ROOT, data_dir=tmp_path, dsn=pg_dsn, genie_delay=0.05, quirks=localws.quirks.HARSH) as ws:
        assert ws.emulator.quirks == localws.quirks.HARSH and ws.emulator.genie_rate_limit == 5
