"""llm.py over real HTTP against the scripted model: the client's wire format, retries and errors, and the tool loop."""
import json
import logging
import subprocess
import sys
import threading
import time

import pytest
import urllib3
from helpers import ROOT, free_port

from llm import (
    ChatClient,
    EndTurn,
    LimitReached,
    LLMError,
    LLMHTTPError,
    LLMResponseError,
    Tool,
    ToolError,
    ToolResult,
    databricks_chat,
    openai_chat,
    run_tools,
)

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(scripted_model):
    return openai_chat(scripted_model.base_url, "test-model", timeout=(1, 5), retry_seconds=2, backoff=0.01)


# The client: wire format

def test_text_reply_and_request_body(scripted_model):
    scripted_model.reply("hi there")
    client = openai_chat(scripted_model.base_url, "test-model", api_key="sk-test")
    tools = [ADD.schema()]
    message = client.complete(USER, tools=tools, tool_choice="auto", max_tokens=100, temperature=0)
    assert message == {"role": "assistant", "content": "hi there"}
    [request] = scripted_model.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.body == {"model": "test-model", "messages": USER, "tools": tools, "tool_choice": "auto",
                            "max_tokens": 100, "temperature": 0, "stream": True}


def test_only_given_fields_are_sent(scripted_model, client):
    scripted_model.reply(None)
    assert client.complete(USER) == {"role": "assistant", "content": None}
    [request] = scripted_model.requests
    assert request.body == {"model": "test-model", "messages": USER, "stream": True}
    assert "Authorization" not in request.headers


@pytest.mark.parametrize("content, expected", [
    ([{"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking...", "signature": "s"}]},
      {"type": "text", "text": "The answer "}, {"type": "text", "text": "is 4."}], "The answer is 4."),
    ([{"type": "reasoning", "summary": [{"type": "summary_text", "text": "only thinking"}]}], None),
])
def test_list_content_keeps_the_text_parts(scripted_model, client, content, expected):
    scripted_model.reply(content)
    assert client.complete(USER) == {"role": "assistant", "content": expected}


def test_tool_calls_are_parsed(scripted_model, client):
    scripted_model.call_tools(("add", {"a": 1, "b": 2}, "call_a"), ("lookup", {"q": "x"}, "call_b"))
    message = client.complete(USER, tools=[ADD.schema()])
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
    ]}


def test_databricks_factory_sends_the_sdks_auth_header(scripted_model):
    from databricks.sdk.core import Config

    config = Config(host=scripted_model.url, token="dapi-test", auth_type="pat")
    scripted_model.reply("from databricks")
    client = databricks_chat("my-llm", config, retry_seconds=1)
    assert client.complete(USER)["content"] == "from databricks"
    [request] = scripted_model.requests
    assert request.path == "/serving-endpoints/my-llm/invocations"
    assert request.headers["Authorization"] == "Bearer dapi-test"
    assert "model" not in request.body


def test_databricks_factory_defaults_to_the_sdks_own_config(scripted_model, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", scripted_model.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-from-env")
    scripted_model.reply("ok")
    databricks_chat("env-llm", retry_seconds=1).complete(USER)
    [request] = scripted_model.requests
    assert (request.path, request.headers["Authorization"]) == ("/serving-endpoints/env-llm/invocations",
                                                                 "Bearer dapi-from-env")


def test_headers_are_fetched_for_every_request(scripted_model):
    tokens = iter(["token-1", "token-2"])
    client = ChatClient(url=scripted_model.base_url + "/chat/completions",
                        headers=lambda: {"Authorization": f"Bearer {next(tokens)}"})
    scripted_model.reply("one").reply("two")
    client.complete(USER)
    client.complete(USER)
    assert [r.headers["Authorization"] for r in scripted_model.requests] == ["Bearer token-1", "Bearer token-2"]


def test_auth_failure_is_an_llm_error(scripted_model):
    def headers():
        raise ValueError("default auth: cannot configure default credentials")

    client = ChatClient(url=scripted_model.base_url + "/chat/completions", headers=headers)
    with pytest.raises(LLMError, match="could not get auth headers.*cannot configure default credentials"):
        client.complete(USER)
    assert scripted_model.requests == []


def test_importing_llm_does_not_import_the_sdk():
    code = "import sys, llm; assert 'databricks.sdk' not in sys.modules, 'llm imported databricks.sdk'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# The client: streaming

@pytest.fixture(params=["urllib3 2.2+", "urllib3 before 2.2"])
def urllib3_version(request, monkeypatch):
    """The urllib3 the client reads replies with: requests allows 1.21.1 on, and read1 came in 2.2."""
    if request.param == "urllib3 before 2.2":
        for cls in (urllib3.response.HTTPResponse, getattr(urllib3.response, "BaseHTTPResponse", object)):
            monkeypatch.delattr(cls, "read1", raising=False)
    return request.param


def test_text_deltas_reach_on_text_in_order_as_they_are_sent(scripted_model, client, urllib3_version):
    first_seen = threading.Event()  # the server sends the rest only once the first delta has reached us
    scripted_model.stream({"role": "assistant", "content": "Hel"}, {"content": "lo, "},
                          {"content": "world."}, usage={"prompt_tokens": 9, "completion_tokens": 3}, gate=first_seen)
    seen = []

    def on_text(delta):
        seen.append((delta, first_seen.is_set()))
        first_seen.set()

    reply = client.completion(USER, on_text=on_text)
    assert seen == [("Hel", False), ("lo, ", True), ("world.", True)]  # "Hel" came before the server went on
    assert reply.message == {"role": "assistant", "content": "Hello, world."}
    assert (reply.finish_reason, reply.usage) == ("stop", {"prompt_tokens": 9, "completion_tokens": 3})
    assert scripted_model.requests[0].body["stream"] is True


def test_tool_calls_are_assembled_from_their_deltas_by_index(scripted_model, client):
    def call(index, **fields):
        return {"tool_calls": [{"index": index, **fields}]}

    scripted_model.stream(
        {"content": "Let me add "}, {"content": "that up."},
        call(0, id="call_a", type="function", function={"name": "add", "arguments": ""}),
        call(0, function={"arguments": '{"a": 1,'}),
        call(1, id="call_b", type="function", function={"name": "lookup", "arguments": '{"q"'}),
        call(0, function={"arguments": ' "b": 2}'}), call(1, function={"arguments": ': "x"}'}),
        finish_reason="tool_calls")
    deltas = []
    reply = client.completion(USER, tools=[ADD.schema()], on_text=deltas.append)
    assert deltas == ["Let me add ", "that up."] and reply.finish_reason == "tool_calls"
    assert reply.message == {"role": "assistant", "content": "Let me add that up.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}


def test_tool_calls_without_an_index_or_with_a_leading_empty_object(scripted_model, client):
    scripted_model.stream(  # each call whole and without "index"; "{}" first, then the arguments
        {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"tool_calls": [{"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"tool_calls": [{"function": {"arguments": '{"tz": "UTC"}'}}]}, finish_reason="tool_calls")
    calls = client.complete(USER)["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("c1", "add", '{"a": 1}'), ("c2", "now", '{"tz": "UTC"}')]


@pytest.mark.parametrize("end", ["cut", "quiet"])
def test_a_stream_that_stops_mid_way_is_an_error_and_not_retried(scripted_model, client, end, urllib3_version):
    scripted_model.stream({"content": "The answer "}, {"content": "is"}, end=end)
    deltas = []
    with pytest.raises(LLMResponseError, match=f"the answer from {scripted_model.base_url}/chat/completions "
                                               f"stopped mid-way") as caught:
        client.complete(USER, on_text=deltas.append)
    assert deltas == ["The answer ", "is"]  # used already: a retry would send them twice
    assert len(scripted_model.requests) == 1
    assert ("ChunkedEncodingError" if end == "cut" else "without [DONE] or a finish reason") in str(caught.value)


def test_an_error_chunk_in_the_stream_is_an_error_with_its_message(scripted_model, client):
    scripted_model.stream({"content": "Hi"}, json.dumps({"error": {"message": "model overloaded", "code": 503}}))
    with pytest.raises(LLMResponseError, match="stopped mid-way with an error: model overloaded"):
        client.complete(USER)


def test_a_server_that_ignores_stream_answers_whole(scripted_model, client, urllib3_version):
    scripted_model.ignores_stream = True
    scripted_model.reply("all at once").call_tool("add", {"a": 1, "b": 2}, id="c1", content="Adding.")
    deltas = []
    reply = client.completion(USER, on_text=deltas.append)
    assert reply.message == {"role": "assistant", "content": "all at once"} and deltas == ["all at once"]
    assert (reply.finish_reason, reply.usage["total_tokens"]) == ("stop", 2)
    message = client.complete(USER, on_text=deltas.append)
    assert message["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 2}' and deltas[-1] == "Adding."
    assert all(request.body["stream"] is True for request in scripted_model.requests)


def test_stream_false_asks_for_one_json_completion(scripted_model):
    scripted_model.reply("whole")
    client = openai_chat(scripted_model.base_url, "m", stream=False)
    assert client.complete(USER) == {"role": "assistant", "content": "whole"}
    assert "stream" not in scripted_model.requests[0].body


# The client: retries and errors

def test_429_is_retried_after_retry_after(scripted_model, client):
    scripted_model.fault(429, retry_after=1).reply("ok")
    started = time.monotonic()
    assert client.complete(USER)["content"] == "ok"
    assert 1.0 <= time.monotonic() - started < 1.9  # the 0.01 s backoff was not used, Retry-After was
    assert len(scripted_model.requests) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_5xx_burst_then_success(scripted_model, client, status):
    scripted_model.fault(status, times=3).reply("ok")
    assert client.complete(USER)["content"] == "ok"
    assert len(scripted_model.requests) == 4


def test_retry_budget_exhausted(scripted_model):
    # waits 0.2 s, then would wait 0.4 s: that ends past the 0.5 s budget, so it gives up after 2 attempts
    scripted_model.fault(503, times=2)
    client = openai_chat(scripted_model.base_url, "m", retry_seconds=0.5, backoff=0.2)
    started = time.monotonic()
    with pytest.raises(LLMHTTPError, match="gave up after 2 attempts") as caught:
        client.complete(USER)
    assert time.monotonic() - started < 0.5
    assert caught.value.status == 503 and "scripted fault 503" in caught.value.message


def test_retry_after_beyond_the_budget_gives_up_at_once(scripted_model, client):
    scripted_model.fault(429, retry_after=30)
    started = time.monotonic()
    with pytest.raises(LLMHTTPError, match="HTTP 429") as caught:
        client.complete(USER)
    assert time.monotonic() - started < 0.5
    assert caught.value.status == 429


def test_hung_reply_times_out_and_is_retried(scripted_model):
    scripted_model.slow(3).reply("second try")
    client = openai_chat(scripted_model.base_url, "m", timeout=(1, 0.3), retry_seconds=2, backoff=0.01)
    started = time.monotonic()
    assert client.complete(USER)["content"] == "second try"
    assert 0.3 <= time.monotonic() - started < 1.5
    assert len(scripted_model.requests) == 2


def test_hung_replies_exhaust_the_budget(scripted_model):
    scripted_model.slow(3).slow(3)
    client = openai_chat(scripted_model.base_url, "m", timeout=(1, 0.3), retry_seconds=0.5, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(LLMError, match="ReadTimeout.*gave up after 2 attempts") as caught:
        client.complete(USER)
    assert time.monotonic() - started < 1.2
    assert not isinstance(caught.value, LLMHTTPError)
    assert scripted_model.base_url in str(caught.value)


def test_connection_refused_is_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = openai_chat(url, "m", timeout=(0.5, 1), retry_seconds=0.3, backoff=0.05)
    with pytest.raises(LLMError, match="ConnectionError.*gave up after [3-9] attempts") as caught:
        client.complete(USER)
    assert f"{url}/chat/completions" in str(caught.value)


@pytest.mark.parametrize("status, body, expected", [
    (400, {"error_code": "BAD_REQUEST", "message": "Input is too long."}, "BAD_REQUEST: Input is too long."),
    (404, {"error": {"message": "model 'x' not found", "type": "invalid_request_error"}}, "model 'x' not found"),
    (401, "Unauthorized: bad key", "Unauthorized: bad key"),
    (403, {"error": "Invalid access token."}, "Invalid access token."),
    (500, {"error_code": "INTERNAL_ERROR", "message": "model crashed"}, "INTERNAL_ERROR: model crashed"),
])
def test_errors_are_not_retried_and_carry_the_endpoints_message(scripted_model, status, body, expected):
    scripted_model.fault(status, body=body)
    client = openai_chat(scripted_model.base_url, "m", api_key="sk-secret", retry_seconds=2, backoff=0.01)
    with pytest.raises(LLMHTTPError) as caught:
        client.complete(USER)
    assert (caught.value.status, caught.value.message) == (status, expected)
    assert f"{scripted_model.base_url}/chat/completions" in str(caught.value)
    assert "sk-secret" not in str(caught.value)
    assert len(scripted_model.requests) == 1


def _call(**function):
    return {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}", **function}}


@pytest.mark.parametrize("body, match", [
    ("<html>Bad gateway</html>", "not JSON"),
    ({"object": "error"}, "without choices"),
    ({"choices": []}, "without choices"),
    ({"choices": [{"message": "hi"}]}, "without choices"),
    ({"choices": [{"message": {"role": "assistant", "content": 42}}]}, "neither a string nor a list"),
    ({"choices": [{"message": {"content": None, "tool_calls": {"id": "c1"}}}]}, "not a list"),
    ({"choices": [{"message": {"content": None, "tool_calls": [_call(arguments={"a": 1})]}}]}, "not a string"),
    ({"choices": [{"message": {"content": None, "tool_calls": [{"function": {"name": "add"}}]}}]}, "malformed"),
])
def test_malformed_responses(scripted_model, client, body, match):
    scripted_model.malformed(body)
    with pytest.raises(LLMResponseError, match=match):
        client.complete(USER)


# The tool loop

def add(a: int, b: int) -> str:
    return str(a + b)


ADD = Tool("add", "Add two integers.", {
    "type": "object",
    "properties": {"a": {"type": "integer", "description": "first"}, "b": {"type": "integer", "description": "second"}},
    "required": ["a", "b"],
}, add)


def tool(name, fn, **properties):
    return Tool(name, f"The {name} tool.", {"type": "object", "properties": properties}, fn)


def test_direct_answer(scripted_model, client):
    scripted_model.reply("Hello!")
    messages = list(USER)
    assert run_tools(client, messages, [ADD], temperature=0) == "Hello!"
    assert messages == USER + [{"role": "assistant", "content": "Hello!"}]
    assert scripted_model.requests[0].body["tools"] == [ADD.schema()]
    assert scripted_model.requests[0].body["temperature"] == 0


def test_tool_round_trip(scripted_model, client):
    def answer(request):
        return f"The sum is {request.body['messages'][-1]['content']}."

    scripted_model.call_tool("add", {"a": 2, "b": 3}, id="call_1").respond(answer)
    messages = list(USER)
    assert run_tools(client, messages, [ADD]) == "The sum is 5."
    assert messages[1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "assistant", "content": "The sum is 5."},
    ]
    assert scripted_model.requests[1].body["messages"] == messages[:3]


def test_empty_arguments_mean_no_arguments(scripted_model, client):
    scripted_model.call_tool("now", "").reply("done")
    messages = list(USER)
    run_tools(client, messages, [tool("now", lambda: "12:00")])
    assert messages[2]["content"] == "12:00"


def run_one_call(scripted_model, client, tools, name, arguments, **kw):
    """Script one tool call and a final answer; return the tool message and its on_message info."""
    scripted_model.call_tool(name, arguments).reply("sorry")
    seen = []
    messages = list(USER)
    assert run_tools(client, messages, tools, on_message=lambda m, info: seen.append((m, info)), **kw) == "sorry"
    [(message, info)] = [(m, info) for m, info in seen if m["role"] == "tool"]
    assert message == messages[2] and message["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
    return message, info


def test_unknown_tool(scripted_model, client):
    message, info = run_one_call(scripted_model, client, [ADD], "multiply", {"a": 1})
    assert message["content"] == "Error: there is no tool named 'multiply'. Use one of: add."
    assert isinstance(info["error"], ToolError) and info["name"] == "multiply"


@pytest.mark.parametrize("arguments, expected", [
    ('{"a": 1, "b": ', "Error: the arguments for add are not valid JSON"),
    ("[1, 2]", "Error: the arguments for add must be a JSON object, not list."),
])
def test_arguments_not_a_json_object(scripted_model, client, arguments, expected):
    message, info = run_one_call(scripted_model, client, [ADD], "add", arguments)
    assert message["content"].startswith(expected)
    assert info["arguments"] == arguments and isinstance(info["error"], ToolError)


@pytest.mark.parametrize("arguments, expected", [
    ({"a": 1}, "Error: add got missing required argument(s) b. Its arguments are: a, b."),
    ({"a": 1, "b": 2, "c": 3}, "Error: add got unexpected argument(s) c. Its arguments are: a, b."),
    ({"b": 2, "x": 0}, "Error: add got missing required argument(s) a and unexpected argument(s) x."),
])
def test_missing_or_unexpected_arguments_are_caught_before_the_call(scripted_model, client, arguments, expected):
    calls = []
    checked = Tool(ADD.name, ADD.description, ADD.parameters, lambda **kw: calls.append(kw) or "called")
    message, info = run_one_call(scripted_model, client, [checked], "add", arguments)
    assert message["content"].startswith(expected)
    assert calls == [] and info["arguments"] == arguments and isinstance(info["error"], ToolError)


def test_tool_raising_tool_error(scripted_model, client):
    def refuse(q):
        raise ToolError("the space is rate limited; wait a minute.")

    message, info = run_one_call(scripted_model, client, [tool("ask", refuse, q={"type": "string"})], "ask", {"q": "x"})
    assert message["content"] == "Error: the space is rate limited; wait a minute."
    assert info["error"] is not None and str(info["error"]) == "the space is rate limited; wait a minute."


def test_a_tool_hands_the_log_a_detail_beside_what_the_model_sees(scripted_model, client):
    def answer(q):
        if q == "fail":
            raise ToolError("no data for that.", detail={"status": "FAILED"})
        return ToolResult("42 rows", detail={"rows": 42}) if q == "rows" else "plain"

    ask = tool("ask", answer, q={"type": "string"})
    for q, content, detail in (("rows", "42 rows", {"rows": 42}), ("fail", "Error: no data for that.",
                                                                   {"status": "FAILED"}), ("plain", "plain", None)):
        message, info = run_one_call(scripted_model, client, [ask], "ask", {"q": q})
        assert (message["content"], info["detail"]) == (content, detail)
        assert "detail" not in message  # the model sees the content only


def test_tool_raising_any_exception(scripted_model, client):
    def broken(q):
        return {}["missing"]

    message, info = run_one_call(scripted_model, client, [tool("ask", broken, q={})], "ask", {"q": "x"})
    assert message["content"].startswith("Error: ask failed: KeyError: 'missing'.")
    assert isinstance(info["error"], KeyError) and info["arguments"] == {"q": "x"} and info["duration_s"] >= 0


class DatabaseDown(Exception):
    pass


def test_fatal_exceptions_propagate(scripted_model, client):
    def down():
        raise DatabaseDown("postgres is gone")

    scripted_model.call_tool("save", {})
    messages = list(USER)
    with pytest.raises(DatabaseDown):
        run_tools(client, messages, [tool("save", down)], fatal=(DatabaseDown,))
    assert len(messages) == 2  # the assistant message, and no "Error:" result for the model


def test_llm_errors_propagate_from_tools_and_from_the_model(scripted_model, client):
    def nested():
        raise LLMHTTPError(401, "bad token", "http://x")

    scripted_model.call_tool("nested", {})
    with pytest.raises(LLMHTTPError, match="bad token"):
        run_tools(client, list(USER), [tool("nested", nested)])
    scripted_model.fault(400, body={"error_code": "BAD_REQUEST", "message": "no"})
    with pytest.raises(LLMHTTPError, match="BAD_REQUEST: no"):
        run_tools(client, list(USER), [ADD])


def test_end_turn_still_answers_every_call(scripted_model, client):
    def start_run(question):
        raise EndTurn("Started run 42.")

    tools = [tool("start_run", start_run, question={}), ADD]
    scripted_model.call_tools(("start_run", {"question": "q"}, "c1"), ("add", {"a": 1, "b": 1}, "c2"))
    messages = list(USER)
    with pytest.raises(EndTurn) as caught:
        run_tools(client, messages, tools)
    assert caught.value.content == "Started run 42."
    assert messages[2:] == [{"role": "tool", "tool_call_id": "c1", "content": "Started run 42."},
                            {"role": "tool", "tool_call_id": "c2", "content": "2"}]


def test_loop_bound(scripted_model, client):
    scripted_model.call_tool("add", {"a": 1, "b": 1}).call_tool("add", {"a": 2, "b": 2})
    messages = list(USER)
    with pytest.raises(LimitReached, match="after 2 model calls") as caught:
        run_tools(client, messages, [ADD], max_calls=2)
    assert caught.value.messages is messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool"]


def test_on_message_sees_every_append(scripted_model, client):
    scripted_model.call_tools(("add", {"a": 1, "b": 2}, "c1"), ("nope", {}, "c2")).reply("3")
    seen = []
    messages = list(USER)
    run_tools(client, messages, [ADD], on_message=lambda message, info: seen.append((message, info)))
    assert [m for m, _ in seen] == messages[1:]
    assert set(seen[0][1]) == {"duration_s"}
    assert seen[1][1] == {"call_id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}, "error": None,
                          "end_turn": None, "detail": None, "duration_s": seen[1][1]["duration_s"]}
    assert seen[2][1]["name"] == "nope" and isinstance(seen[2][1]["error"], ToolError)
    assert set(seen[3][1]) == {"duration_s"}


def recording_spans(opened):
    """A span factory like a tracer's: it records (kind, inputs as they were when it opened, outcome, exception)."""
    import contextlib
    import copy

    @contextlib.contextmanager
    def span(kind, inputs):
        record = [kind, copy.deepcopy(inputs), {}, None]
        opened.append(record)
        try:
            yield record[2]
        except BaseException as e:
            record[3] = e
            raise
    return span


def test_the_span_hook_is_held_around_each_model_call_and_each_tool_call(scripted_model, client):
    scripted_model.call_tools(("add", {"a": 1, "b": 2}, "c1"), ("nope", {}, "c2")).reply("3")
    opened = []
    messages = list(USER)
    run_tools(client, messages, [ADD], span=recording_spans(opened))
    assert [(kind, outcome["message"], error) for kind, _, outcome, error in opened] == [
        ("model", messages[1], None), ("tool", messages[2], None), ("tool", messages[3], None),
        ("model", messages[4], None)]
    assert opened[0][1] == {"messages": USER, "tools": [ADD.schema()]}  # as sent, not as the list grew after
    assert opened[3][1]["messages"] == messages[:4]
    assert (opened[0][2]["finish_reason"], opened[0][2]["usage"]) == (
        "tool_calls", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})  # the client's report
    assert opened[1][1] == {"name": "add", "arguments": '{"a": 1, "b": 2}', "call_id": "c1"}
    assert opened[1][2]["error"] is None and opened[1][2]["arguments"] == {"a": 1, "b": 2}
    assert isinstance(opened[2][2]["error"], ToolError) and opened[2][2]["name"] == "nope"


def test_an_error_leaving_a_call_passes_through_its_span(scripted_model, client):
    def down():
        raise DatabaseDown("postgres is gone")

    scripted_model.call_tool("save", {}).fault(400, body={"error_code": "BAD_REQUEST", "message": "no"})
    opened = []
    with pytest.raises(DatabaseDown):
        run_tools(client, list(USER), [tool("save", down)], fatal=(DatabaseDown,), span=recording_spans(opened))
    with pytest.raises(LLMHTTPError):
        run_tools(client, list(USER), [ADD], span=recording_spans(opened))
    assert [(kind, type(error)) for kind, _, _, error in opened] == [
        ("model", type(None)), ("tool", DatabaseDown), ("model", LLMHTTPError)]


# The scripted model itself: it must fail loudly

def test_scripted_model_fails_when_overcalled_or_left_over(client):
    from scripted import ScriptedModel

    model = ScriptedModel().start()
    try:
        over = openai_chat(model.base_url, "m", retry_seconds=0)
        with pytest.raises(LLMHTTPError, match="came after the script ran out"):
            over.complete(USER)
        with pytest.raises(AssertionError, match="came after the script ran out"):
            model.check()
        model.failures.clear()
        wrong_path = ChatClient(url=model.url + "/v1/completions", retry_seconds=0)
        with pytest.raises(LLMHTTPError, match="not a chat-completions path"):
            wrong_path.complete(USER)
        model.failures.clear()
        model.respond(lambda request: 1 / 0)
        with pytest.raises(LLMHTTPError, match="division by zero"):
            over.complete(USER)
        with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
            model.check()
        model.failures.clear()
        model.reply("never asked")
        with pytest.raises(AssertionError, match=r"1 scripted responses never requested: reply\('never asked'\)"):
            model.check()
    finally:
        model.stop()


def test_a_password_in_the_url_is_kept_out_of_logs_and_errors(scripted_model, caplog):
    host = scripted_model.url.removeprefix("http://")
    client = openai_chat(f"http://user:s3cret-pw@{host}/v1", "m", retry_seconds=0.5, backoff=0.1)
    scripted_model.fault(503, times=3)  # tries at 0, 0.1 and 0.3 s; the next would pass the 0.5 s budget
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMHTTPError) as failure:
        client.complete([{"role": "user", "content": "hi"}])
    assert f"http://***@{host}/v1/chat/completions" in str(failure.value)
    assert "s3cret-pw" not in str(failure.value) and "s3cret-pw" not in caplog.text
    assert "retrying" in caplog.text  # the warning that used to show the URL as given
