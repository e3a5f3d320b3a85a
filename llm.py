"""Chat client for the OpenAI-compatible chat-completions protocol, and the one tool loop both agents use.

`databricks_chat(endpoint)` talks to a Databricks serving endpoint (`{host}/serving-endpoints/{name}/invocations`,
auth headers from the SDK's `Config.authenticate()` on every request, so every auth method and token refresh
works); `openai_chat(base_url, model)` talks to any OpenAI-compatible server (vLLM, Ollama, a proxy).
`ChatClient.complete()` returns the assistant message normalised, ready to append to the message list. It asks the
server to stream (`"stream": true`, server-sent events of `chat.completion.chunk`s, as Databricks serving endpoints,
vLLM and Ollama send them): text deltas go to `on_text` as they arrive, tool calls are assembled from their deltas
by index. A server that answers one JSON completion instead (it ignores `stream`, or a proxy buffers) works too.
Each call has a total `deadline`, checked as the reply's bytes arrive: the read timeout alone applies per read, so
a reply that trickles in would never time out.

`run_tools()` is the bounded tool loop. What the model can fix (unknown tool, bad arguments, a tool that
raises) goes back to it as an "Error: ..." tool message; what it can't (LLMError, the caller's `fatal` types)
is raised. At most `max_tool_calls` calls of one reply are run; the rest are answered with an error. The loop
ends in one of three ways: it returns the model's text answer, or re-raises the `EndTurn` a tool raised, or
raises `LimitReached`. A tool that has more to say to the caller's log than to the model
returns a `ToolResult(content, detail)` (or raises `ToolError(message, detail=...)`): the model sees the
content, `on_message` gets the detail. A caller that traces (tracing.py, with MLflow) passes `span`, which the loop
opens around each model call and each tool call; this module never imports a tracer.
"""
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
import urllib3

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "databricks-claude-sonnet-4-5"
RETRY_STATUSES = {429, 502, 503, 504}  # 500 is not retried: a model that fails on a request fails again
READ_CHUNK = 65_536  # bytes read at most per socket read of a reply
MAX_TOOL_CALLS = 10  # tool calls run per model reply


class LLMError(Exception):
    """The chat model can't be used (network, auth, server, bad reply): raised to the caller, never to the model."""


class LLMHTTPError(LLMError):
    """The endpoint answered with an HTTP error (a 4xx, or a 429/5xx still failing when the retry budget ran out)."""

    def __init__(self, status: int, message: str, url: str = ""):
        self.status, self.message, self.url = status, message, url
        super().__init__(f"POST {url} failed with HTTP {status}: {message}")


class LLMResponseError(LLMError):
    """The endpoint answered 2xx with a body that is not a chat completion, or a stream that stopped mid-way."""


@dataclass
class Completion:
    message: dict  # {"role": "assistant", "content": str | None, "tool_calls": [...] (only if any)}
    finish_reason: str | None = None  # "stop", "tool_calls", "length" (cut at max_tokens)...
    usage: dict | None = None  # prompt_tokens, completion_tokens, total_tokens, if the server counted them


@dataclass
class ChatClient:
    url: str  # the full chat-completions URL
    model: str | None = None  # sent as "model" in the body when set (OpenAI-compatible servers need it)
    headers: Callable[[], dict] = dict  # called before every request, so refreshed tokens are picked up
    timeout: tuple[float, float] = (10.0, 300.0)  # connect, read seconds (per read); endpoints stop at ~297 s
    retry_seconds: float = 60.0  # no retry starts later than this after the first try
    deadline: float = 360.0  # seconds one model call may take in all, retries and a streamed answer included
    backoff: float = 1.0  # first wait before a retry without Retry-After; doubles each time
    max_backoff: float = 20.0
    stream: bool = True  # ask for server-sent events; False for a server that refuses "stream": true
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self):
        # the URL as logs and errors show it: a password in it (http://user:secret@host) is blanked out
        parts = urlsplit(self.url)
        self.where = parts._replace(netloc=f"***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
                                    ).geturl() if parts.password else self.url

    def complete(self, messages, *, tools=None, tool_choice=None, max_tokens=None, temperature=None,
                 on_text=None, report=None) -> dict:
        """One chat completion: {"role": "assistant", "content": str | None, "tool_calls": [...] (only if any)}.
        `on_text(delta)` gets the text as it arrives (all of it at once from a server that does not stream).
        `report`, a dict, gets the reply's `finish_reason` and token `usage` (None if the server counted none)."""
        reply = self.completion(messages, tools=tools, tool_choice=tool_choice, max_tokens=max_tokens,
                                temperature=temperature, on_text=on_text)
        if report is not None:
            report.update(finish_reason=reply.finish_reason, usage=reply.usage)
        return reply.message

    def completion(self, messages, *, tools=None, tool_choice=None, max_tokens=None, temperature=None,
                   on_text=None) -> Completion:
        """complete(), with the finish reason and the token usage."""
        body = {"model": self.model, "messages": messages, "tools": tools, "tool_choice": tool_choice,
                "max_tokens": max_tokens, "temperature": temperature, "stream": self.stream or None}
        body = {key: value for key, value in body.items() if value is not None}
        log.debug("POST %s %s", self.where, json.dumps(body, default=str))
        started = time.monotonic()
        deadline = started + self.deadline
        with self._post(body, deadline) as response:
            reply = self._read(response, on_text or (lambda delta: None), deadline)
        if reply.finish_reason == "length":
            log.warning("the reply from %s was cut at max_tokens", self.where)
        log.info("chat completion from %s in %.1f s (%d tool calls, finish %s, usage %s)", self.where,
                 time.monotonic() - started, len(reply.message.get("tool_calls", [])), reply.finish_reason,
                 reply.usage)
        return reply

    def _read(self, response, on_text, deadline: float) -> Completion:
        """Read the answer as it arrives: server-sent events of chunks, or one JSON completion. Once its first byte
        has been read the request is not retried: part of the answer may have been used."""
        stream = _Stream(self.where, on_text) if "event-stream" in response.headers.get("Content-Type", "") else None
        whole = bytearray()
        try:
            for data in self._chunks(response, deadline):
                if stream is None:
                    whole += data
                else:
                    stream.feed(data)
        except requests.RequestException as e:
            raise LLMResponseError(f"the answer from {self.where} stopped mid-way: {type(e).__name__}: {e}") from e
        if stream is not None:
            return stream.end()
        reply = _parse_completion(bytes(whole), self.where)
        if reply.message["content"]:
            on_text(reply.message["content"])
        return reply

    def _chunks(self, response, deadline: float) -> Iterator[bytes]:
        """The body's bytes as they come off the connection, one socket read at a time (each bounded by the read
        timeout; with urllib3 before 2.2, which has no read1, one HTTP chunk at a time); past the deadline the call is
        given up. The one place a reply's bytes are read."""
        size, raw = 0, response.raw
        if hasattr(raw, "read1"):  # urllib3 2.2+
            reads = iter(lambda: raw.read1(READ_CHUNK, decode_content=True) or b"", b"")
        else:  # older urllib3: a chunked body (every stream) still comes one HTTP chunk at a time, as it is sent
            reads = raw.stream(READ_CHUNK, decode_content=True)
        try:
            for data in reads:
                size += len(data)
                yield data
                if time.monotonic() > deadline:
                    raise LLMError(f"POST {self.where}: the reply was still arriving after the {self.deadline:g} s "
                                   f"deadline for one model call ({size:,} bytes so far); the endpoint is "
                                   f"overloaded, or something between us holds the reply back")
        except urllib3.exceptions.ProtocolError as e:  # raised as requests' own iter_content raises them
            raise requests.exceptions.ChunkedEncodingError("Response ended prematurely") from e
        except urllib3.exceptions.DecodeError as e:
            raise requests.exceptions.ContentDecodingError(e) from e
        except urllib3.exceptions.ReadTimeoutError as e:
            raise requests.ConnectionError(e) from e

    def _post(self, body, deadline: float) -> requests.Response:
        """POST with retries on 429/502/503/504 and connection errors, honouring Retry-After, within the budget
        and the deadline; returns the response, its body still to read."""
        started = time.monotonic()
        for attempt in itertools.count(1):
            try:
                headers = self.headers()
            except Exception as e:  # the SDK's credential refresh: the person must fix their auth
                raise LLMError(f"could not get auth headers for {self.where}: {e}") from e
            status = error = wait = None
            timeout = (self.timeout[0], max(0.1, min(self.timeout[1], deadline - time.monotonic())))
            try:
                response = self.session.post(self.url, json=body, headers=headers, timeout=timeout, stream=True)
                if response.status_code >= 400:
                    with response:
                        status, problem = response.status_code, _unechoed(_error_message(
                            b"".join(self._chunks(response, deadline)), response.reason), headers)
            except (requests.ConnectionError, requests.Timeout) as e:
                error, problem = e, f"{type(e).__name__}: {e}"
            except requests.RequestException as e:
                raise LLMError(f"POST {self.where} failed: {e}") from e
            else:
                if status is None:
                    return response
                if status not in RETRY_STATUSES:
                    raise LLMHTTPError(status, problem, self.where)
                wait = _retry_after(response)
            if wait is None:
                wait = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
            elapsed = time.monotonic() - started
            if elapsed + wait > self.retry_seconds or time.monotonic() + wait >= deadline:
                gave_up = f"gave up after {attempt} attempts in {elapsed:.1f} s"
                if status is not None:
                    raise LLMHTTPError(status, f"{problem} ({gave_up})", self.where)
                raise LLMError(f"POST {self.where} failed: {problem} ({gave_up})") from error
            log.warning("POST %s: %s; retrying in %.1f s (attempt %d)", self.where,
                        f"HTTP {status}" if status else problem, wait, attempt)
            time.sleep(wait)


@dataclass
class ChatConfig:
    """Which chat model to call: a Databricks serving endpoint, or any OpenAI-compatible server."""
    endpoint: str = DEFAULT_ENDPOINT  # LLM_ENDPOINT_NAME: the serving endpoint
    base_url: str = ""  # LLM_BASE_URL: an OpenAI-compatible server instead (vLLM, Ollama, a proxy)
    model: str = ""  # LLM_MODEL: the model name at base_url (default: the endpoint name)
    api_key: str = field(default="", repr=False)  # LLM_API_KEY: its bearer key, if it wants one

    @classmethod
    def from_env(cls, env=os.environ, *, endpoint: str = "") -> "ChatConfig":
        """`endpoint` (a flag) wins over LLM_ENDPOINT_NAME."""
        return cls(endpoint=endpoint or env.get("LLM_ENDPOINT_NAME") or DEFAULT_ENDPOINT,
                   base_url=env.get("LLM_BASE_URL", ""), model=env.get("LLM_MODEL", ""),
                   api_key=env.get("LLM_API_KEY", ""))

    def client(self, workspace_config=None, **client_kw) -> "ChatClient":
        """The client; `workspace_config` (an SDK Config) authenticates a serving endpoint."""
        if self.base_url:
            return openai_chat(self.base_url, self.model or self.endpoint, self.api_key or None, **client_kw)
        return databricks_chat(self.endpoint, workspace_config, **client_kw)


def databricks_chat(endpoint: str, config=None, **client_kw) -> ChatClient:
    """A client for a Databricks serving endpoint. `config` is an SDK `Config` (e.g. `w.config`); default `Config()`."""
    if config is None:
        from databricks.sdk.core import Config  # here, not at the top: importing the SDK takes seconds
        config = Config()
    url = f"{config.host.rstrip('/')}/serving-endpoints/{endpoint}/invocations"
    return ChatClient(url=url, headers=config.authenticate, **client_kw)


def openai_chat(base_url: str, model: str, api_key: str | None = None, **client_kw) -> ChatClient:
    """A client for any OpenAI-compatible server, e.g. `openai_chat("http://127.0.0.1:11434/v1", "qwen3")`."""
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url.rstrip('/')}/chat/completions"
    return ChatClient(url=url, model=model, headers=lambda: dict(auth), **client_kw)


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):  # absent, or an HTTP date: use our own backoff
        return None


def _error_message(body: bytes, reason: str) -> str:
    """The endpoint's own message: Databricks {"error_code","message"}, OpenAI {"error":{"message"}}, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and (message := _error_text(data)):
        return message
    return body.decode("utf-8", errors="replace").strip()[:500] or reason or "(empty body)"


def _unechoed(text: str, headers: dict) -> str:
    """`text` without the credentials of `headers`: an endpoint that refuses a key may quote it back in full."""
    for value in map(str, headers.values()):
        for secret in (value, value.partition(" ")[2]):  # "Bearer <token>", and the token alone
            if len(secret) >= 8:
                text = text.replace(secret, "***")
    return text


def _error_text(body: dict) -> str:
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    message = body.get("message") or error or body.get("detail")
    if message:
        return f"{body['error_code']}: {message}" if body.get("error_code") else str(message)
    return ""


def _parse_completion(body: bytes, url) -> Completion:
    """A whole chat.completion, from a server that did not stream."""
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        raise LLMResponseError(f"{url} answered with a body that is not JSON: {text[:200]!r}") from None
    log.debug("reply from %s: %s", url, text)
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        message = None
    if not isinstance(message, dict):
        raise LLMResponseError(f"{url} answered without choices[0].message: {text[:200]!r}")
    out = {"role": "assistant", "content": _content(message.get("content"), url)}
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise LLMResponseError(f"{url} answered with tool_calls that is not a list: {calls!r}")
    if calls:
        out["tool_calls"] = [_tool_call(call, url) for call in calls]
    usage = data.get("usage")
    return Completion(out, choice.get("finish_reason"), usage if isinstance(usage, dict) else None)


class _Stream:
    """A chat completion assembled from server-sent `chat.completion.chunk`s as they arrive: `feed()` the bytes,
    then `end()`. Text deltas go to `on_text` at once; tool calls are assembled by their index."""

    def __init__(self, url, on_text):
        self.url, self.on_text = url, on_text
        self.buffer, self.data = b"", []  # a line not ended yet; the data lines of the event not ended yet
        self.text, self.calls, self.finish_reason, self.usage, self.done = [], {}, None, None, False

    def feed(self, data: bytes):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line and self.data:  # a blank line ends an event
                self._event("\n".join(self.data))
                self.data = []
            elif line.startswith(b"data:"):  # comments (":"), event:, id: and retry: carry nothing we use
                self.data.append(line[5:].removeprefix(b" ").decode("utf-8", errors="replace"))

    def end(self) -> Completion:
        self.feed(b"\n\n")  # a last event without its blank line
        if not (self.done or self.finish_reason):
            raise LLMResponseError(f"the answer from {self.url} stopped mid-way: the stream ended without "
                                   f"[DONE] or a finish reason")
        message = {"role": "assistant", "content": "".join(self.text) if self.text else None}
        calls = [self.calls[index] for index in sorted(self.calls)]
        for call in calls:
            arguments = call["function"]["arguments"]
            if arguments.startswith("{}") and len(arguments) > 2:  # some servers send "{}" first, then the rest
                call["function"]["arguments"] = arguments[2:]
        if calls:
            message["tool_calls"] = [_tool_call(call, self.url) for call in calls]
        return Completion(message, self.finish_reason, self.usage)

    def _event(self, data: str):
        log.debug("chunk from %s: %s", self.url, data)
        if self.done or data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise LLMResponseError(f"{self.url} streamed a chunk that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise LLMResponseError(f"{self.url} streamed a chunk that is not an object: {data[:200]!r}")
        if chunk.get("error") or chunk.get("error_code"):  # an error the server met after it began to answer
            raise LLMResponseError(f"the answer from {self.url} stopped mid-way with an error: "
                                   f"{_error_text(chunk)}")
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = _content(delta.get("content"), self.url)
            if text:
                self.text.append(text)
                self.on_text(text)
            for call in delta.get("tool_calls") or []:
                self._call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def _call(self, delta):
        """One tool-call delta: the first of a call has its id and name, the others more of its arguments."""
        if not isinstance(delta, dict):
            raise LLMResponseError(f"{self.url} streamed a malformed tool call: {delta!r}")
        index = delta.get("index")
        if not isinstance(index, int):  # servers that leave it out send a call whole, or continue the last one
            index = len(self.calls) if delta.get("id") or not self.calls else max(self.calls)
        call = self.calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        function = delta.get("function") or {}
        arguments = function.get("arguments") or ""
        if not isinstance(arguments, str):
            raise LLMResponseError(f"{self.url} streamed tool call arguments that are not a string: {delta!r}")
        call["id"] = delta.get("id") or call["id"]
        call["function"]["name"] = function.get("name") or call["function"]["name"]
        call["function"]["arguments"] += arguments


def _content(content, url) -> str | None:
    """A string, null, or a list of parts (text, reasoning...): the text parts joined, reasoning dropped."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part["text"] for part in content
                 if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]
        return "".join(texts) if texts else None
    raise LLMResponseError(f"{url} answered with content that is neither a string nor a list: {content!r}")


def _tool_call(call, url) -> dict:
    try:
        call_id, name, arguments = call["id"], call["function"]["name"], call["function"]["arguments"]
    except (KeyError, TypeError):
        raise LLMResponseError(f"{url} answered with a malformed tool call: {call!r}") from None
    if not all(isinstance(value, str) for value in (call_id, name, arguments)):
        raise LLMResponseError(f"{url} answered with a tool call with id, name or arguments not a string: {call!r}")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# The tool loop

@dataclass
class Tool:
    name: str
    description: str  # what the model reads to decide when to call it
    parameters: dict  # JSON schema of the arguments object, a description for each property
    fn: Callable[..., str]  # called with the arguments as keywords; returns the text the model sees

    def schema(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolResult:
    content: str  # what the model sees
    detail: object = None  # what only on_message sees, as info["detail"]


class ToolError(Exception):
    """Raised by a tool (or the loop) for a failure the model can act on: sent to it as "Error: <message>"."""

    def __init__(self, message: str, *, detail=None):
        super().__init__(message)
        self.detail = detail


class EndTurn(Exception):
    """Raised by a tool: `content` is its result; the loop appends the results of all calls, then re-raises it."""

    def __init__(self, content: str):
        super().__init__(content)
        self.content = content


class LimitReached(Exception):
    """The loop made `max_calls` model calls without a text answer. `messages` is the (paired) transcript."""

    def __init__(self, messages: list, max_calls: int):
        super().__init__(f"no final answer after {max_calls} model calls")
        self.messages, self.max_calls = messages, max_calls


def run_tools(client, messages: list, tools, *, max_calls=8, max_tool_calls=MAX_TOOL_CALLS, on_message=None,
              on_text=None, span=None, fatal=(), **complete_kw) -> str:
    """Run the tool loop on `messages` (appended in place, never rewritten) and return the model's text answer.

    1. call the model with the tools (at most `max_calls` times, then raise LimitReached); on_text(delta) gets
       its text as it arrives
    2. append its message (a reply with more than `max_tool_calls` calls keeps one more, which stands for the
       rest); on_message(message, {"duration_s"})
    3. no tool calls? return its text
    4. run each tool call, up to `max_tool_calls`; a model-caused failure becomes the result "Error: ..."
    5. append each result; on_message(message, {"call_id", "name", "arguments", "duration_s", "error", "end_turn",
       "detail"}), where detail is the ToolResult's or ToolError's detail (else None)
    6. a tool raised EndTurn? re-raise it now that every call has its result; else back to 1
    LLMError and exceptions of the types in `fatal` propagate as they are.

    `span(kind, inputs)`, if given, returns a context manager (a tracer's span) that the loop holds open around each
    model call, kind "model" with inputs {"messages", "tools"}, and each tool call, kind "tool" with inputs
    {"name", "arguments", "call_id"}; inputs are read when it opens, before `messages` grows. What its `with` gives
    is a dict the loop fills with the outcome: {"message": the reply, "finish_reason", "usage"} for a model call
    (the client's `report`), {"message": the tool result, **info} (the info on_message gets) for a tool call. An
    exception leaving the call passes through it.
    """
    by_name = {tool.name: tool for tool in tools}
    schemas = [tool.schema() for tool in by_name.values()] or None
    hook = on_message or (lambda message, info: None)
    if on_text is not None:
        complete_kw["on_text"] = on_text
    span = span or _no_span
    for _ in range(max_calls):
        started = time.monotonic()
        with span("model", {"messages": messages, "tools": schemas}) as outcome:
            reply = outcome["message"] = client.complete(messages, tools=schemas, report=outcome, **complete_kw)
        asked = len(reply.get("tool_calls", []))
        if asked > max_tool_calls:  # the calls beyond the one standing for them are left out of the transcript
            log.warning("the model asked for %d tool calls in one reply; running %d", asked, max_tool_calls)
            reply = {**reply, "tool_calls": reply["tool_calls"][:max_tool_calls + 1]}
        messages.append(reply)
        hook(reply, {"duration_s": time.monotonic() - started})
        if "tool_calls" not in reply:
            return reply["content"] or ""
        end_turn = None
        for i, call in enumerate(reply["tool_calls"]):
            function = call["function"]
            with span("tool", {"name": function["name"], "arguments": function["arguments"],
                               "call_id": call["id"]}) as outcome:
                if i < max_tool_calls:
                    content, info = _run_call(call, by_name, tuple(fatal))
                else:
                    content, info = _not_run(call, asked, max_tool_calls)
                result = {"role": "tool", "tool_call_id": call["id"], "content": content}
                outcome.update(info, message=result)
            messages.append(result)
            hook(result, info)
            end_turn = end_turn or info["end_turn"]
        if end_turn:
            raise end_turn
    raise LimitReached(messages, max_calls)


def _not_run(call, asked: int, limit: int) -> tuple[str, dict]:
    error = ToolError(f"not run: your reply asked for {asked:,} tool calls and at most {limit} run per reply, so "
                      f"this call and the {asked - limit - 1:,} after it were not run (they are left out of this "
                      f"conversation). Ask again for what you still need, at most {limit} calls at a time.")
    return f"Error: {error}", {"call_id": call["id"], "name": call["function"]["name"],
                               "arguments": call["function"]["arguments"], "error": error, "end_turn": None,
                               "detail": None, "duration_s": 0.0}


@contextlib.contextmanager
def _no_span(kind, inputs):
    yield {}


def _run_call(call, tools: dict, fatal: tuple) -> tuple[str, dict]:
    """Check and run one tool call: (the content the model sees, info for on_message)."""
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    info = {"call_id": call["id"], "name": name, "arguments": arguments, "error": None, "end_turn": None,
            "detail": None}
    started = time.monotonic()
    try:
        tool = tools.get(name)
        if tool is None:
            raise ToolError(f"there is no tool named {name!r}. Use one of: {', '.join(tools) or '(none)'}.")
        info["arguments"] = kwargs = _parse_arguments(tool.name, arguments)
        _check_arguments(tool, kwargs)
        content = tool.fn(**kwargs)
        if isinstance(content, ToolResult):
            content, info["detail"] = content.content, content.detail
        content = content if isinstance(content, str) else json.dumps(content, default=str)
    except EndTurn as e:
        content, info["end_turn"] = e.content, e
    except (LLMError, *fatal):
        raise
    except ToolError as e:
        content, info["error"], info["detail"] = f"Error: {e}", e, e.detail
    except Exception as e:
        log.warning("tool %s raised", name, exc_info=True)
        hint = "Check the arguments, or answer without this tool."
        content, info["error"] = f"Error: {name} failed: {type(e).__name__}: {e}. {hint}", e
    info["duration_s"] = time.monotonic() - started
    return content, info


def _parse_arguments(name: str, arguments: str) -> dict:
    try:
        kwargs = json.loads(arguments) if arguments.strip() else {}  # some models send "" for no arguments
    except ValueError as e:
        raise ToolError(f"the arguments for {name} are not valid JSON ({e}). Send one JSON object.") from e
    if not isinstance(kwargs, dict):
        raise ToolError(f"the arguments for {name} must be a JSON object, not {type(kwargs).__name__}.")
    return kwargs


def _check_arguments(tool: Tool, kwargs: dict):
    """Check against the schema's `required` and `properties` before the call, to tell the model what is wrong."""
    properties = tool.parameters.get("properties", {})
    missing = [key for key in tool.parameters.get("required", []) if key not in kwargs]
    unexpected = [key for key in kwargs if key not in properties]
    problems = [f"{what} {', '.join(keys)}" for what, keys in
                (("missing required argument(s)", missing), ("unexpected argument(s)", unexpected)) if keys]
    if problems:
        raise ToolError(f"{tool.name} got {' and '.join(problems)}. "
                        f"Its arguments are: {', '.join(properties) or '(none)'}.")
