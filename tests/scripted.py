"""A scripted chat model: a queue of chat-completions responses served over real HTTP on 127.0.0.1.

    model.reply("hi").call_tool("lookup", {"q": 1})   # queue responses, in the real wire format
    client = openai_chat(model.base_url, "m")            # or databricks_chat(name, Config(host=model.url, ...))
    ...
    model.requests[0].body["messages"]                  # what the client sent

Every POST whose path ends in /chat/completions or /invocations takes the next response. A request with
`"stream": true` gets a completion as server-sent chunks (localws.emulator.completion_chunks), as a real server
sends it, unless `model.ignores_stream` is set (then one JSON completion, as from a server or proxy that does not
stream); `stream()` scripts the chunks themselves, their timing, and a stream that breaks off. A call with
nothing left in the queue is answered 500 with a clear message and remembered; `check()` (run by the
`scripted_model` fixture after the test) fails on it, and on responses never asked for.
`GET /.well-known/databricks-config`, which the SDK's `Config()` makes, is answered 404 without using the queue.
`faults_served` counts the faults (error answers and malformed bodies) that were actually asked for.
"""
import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from helpers import LocalServer

from localws.emulator import completion_chunks, sse

GATE_WAIT = 3  # seconds a gated stream waits for its gate; then it goes on, and check() fails


@dataclass
class Request:
    path: str
    headers: dict
    body: dict | None  # None when the body was not JSON


@dataclass
class Response:
    describe: str  # for check()'s message
    status: int = 200
    body: object = None  # dict -> JSON, str -> sent as is, callable(Request) -> message dict or text
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    chunks: list | None = None  # stream(): the events to send, chunk dicts or raw data strings
    interval: float = 0.0  # stream(): seconds between chunks
    end: str = "done"  # stream(): "done" ([DONE]), "cut" (the connection drops), "quiet" (the body just ends)
    gate: threading.Event | None = None  # stream(): after the first chunk, wait until it is set (see GATE_WAIT)
    trickle: float = 0.0  # seconds between the body's bytes: a reply that arrives a byte at a time
    fault: bool = False  # an error answer or a malformed body, counted in faults_served


class ScriptedModel:
    def __init__(self):
        self.queue: deque[Response] = deque()
        self.requests: list[Request] = []
        self.failures: list[str] = []
        self.faults_served = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = None
        self.ignores_stream = False  # True: one JSON completion even when a request asks to stream

    # Scripting: each method queues one response (fault: `times` of them) and returns self, to chain.

    def reply(self, content="ok", *, finish_reason="stop"):
        """A text answer; `content` may be a string, None, or a list of content parts."""
        return self._push(f"reply({content!r})", self._completion({"role": "assistant", "content": content},
                                                                  finish_reason))

    def call_tool(self, name, arguments=None, *, id=None, content=None):
        """One tool call. A dict of arguments is sent as a JSON string; a str is sent as is (e.g. broken JSON)."""
        return self.call_tools((name, arguments, id), content=content)

    def call_tools(self, *calls, content=None):
        """Several tool calls in one reply; each call is (name, arguments) or (name, arguments, id)."""
        tool_calls = []
        for name, arguments, *rest in calls:
            call_id = (rest[0] if rest else None) or f"call_{next(self._ids)}"
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
            tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
        names = ", ".join(call["function"]["name"] for call in tool_calls)
        return self._push(f"call_tools({names})", self._completion(message, "tool_calls"))

    def fault(self, status=500, *, retry_after=None, body=None, times=1):
        """An HTTP error, `times` times in a row; `body` defaults to a Databricks-style error."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        body = body if body is not None else {"error_code": "SCRIPTED_FAULT", "message": f"scripted fault {status}"}
        for _ in range(times):
            self._push(f"fault({status})", body, status=status, headers=headers, fault=True)
        return self

    def slow(self, seconds, content="late"):
        """A text answer sent only after `seconds` (longer than the client's read timeout, to hang it)."""
        completion = self._completion({"role": "assistant", "content": content}, "stop")
        return self._push(f"slow({seconds})", completion, delay=seconds)

    def trickle(self, every, content="late"):
        """A text answer whose body is one JSON completion (never streamed) sent one byte every `every` seconds
        (after prompt headers), so that no single read ever waits long."""
        completion = self._completion({"role": "assistant", "content": content}, "stop")
        self.queue.append(Response(f"trickle({every})", body=completion, trickle=every))
        return self

    def malformed(self, body="<html>Bad gateway</html>"):
        """A 200 whose body is not a chat completion: a str is sent as is, a dict/list as JSON."""
        return self._push(f"malformed({body!r})", body, fault=True)

    def stream(self, *deltas, finish_reason="stop", usage=None, ttft=0.0, interval=0.0, end="done", gate=None):
        """A streamed answer, whatever the request asked: each delta a dict (`{"content": "Hel"}`, `{"tool_calls":
        [{"index": 0, ...}]}`) sent as one chunk, or a str sent as the data as is; then a chunk with `finish_reason`
        (None: none) and one with `usage`. The first chunk after `ttft` seconds, then one every `interval`. `end`:
        "done" sends [DONE]; "cut" drops the connection before the body ends; "quiet" ends the body without the
        finish reason and [DONE]. `gate`: after the first chunk, wait until the test sets it, which shows that the
        client got that chunk before the rest was sent (check() fails if it was not set within GATE_WAIT)."""
        head = {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": "scripted"}
        chunks = [d if isinstance(d, str) else {**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                  for d in deltas]
        if end != "quiet" and finish_reason:
            chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
        if end != "quiet" and usage:
            chunks.append({**head, "choices": [], "usage": usage})
        self.queue.append(Response(f"stream({len(deltas)} deltas, {end})", delay=ttft, chunks=chunks,
                                   interval=interval, end=end, gate=gate))
        return self

    def respond(self, fn):
        """A reply computed from the request: fn(Request) -> the assistant message dict, or its text."""
        return self._push(f"respond({getattr(fn, '__name__', fn)})", fn)

    # Lifecycle

    @property
    def url(self) -> str:
        """The host, as a Databricks workspace URL."""
        return self._server.url

    @property
    def base_url(self) -> str:
        """An OpenAI-compatible base URL (POST {base_url}/chat/completions)."""
        return f"{self.url}/v1"

    def start(self):
        self._server = LocalServer(type("Handler", (_Handler,), {"model": self}))
        return self

    def stop(self):
        self._stopped.set()  # wakes slow replies still waiting
        self._server.close()

    def check(self):
        """Fail if the model was called more often than scripted, or left with responses never asked for."""
        problems = list(self.failures)
        if self.queue:
            problems.append(f"{len(self.queue)} scripted responses never requested: "
                            + ", ".join(response.describe for response in self.queue))
        assert not problems, "scripted model: " + "; ".join(problems)

    # Internals

    def _push(self, describe, body, *, status=200, headers=None, delay=0.0, fault=False):
        self.queue.append(Response(describe, status, body, headers or {}, delay, fault=fault))
        return self

    def _completion(self, message, finish_reason):
        return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                "model": "scripted", "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def _next(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
            if not request.path.endswith(("/chat/completions", "/invocations")):
                return self._fail(f"POST to {request.path}, which is not a chat-completions path", 404)
            if self.queue:
                response = self.queue.popleft()
                self.faults_served += response.fault
                return response
            return self._fail(f"request {len(self.requests)} ({request.path}) came after the script ran out")

    def _fail(self, problem, status=500) -> Response:
        """Remember the problem for check(), and answer it loudly now."""
        self.failures.append(problem)
        return Response("failure", status, {"error": {"message": f"scripted model: {problem}"}})


class _Handler(BaseHTTPRequestHandler):
    model: ScriptedModel
    protocol_version = "HTTP/1.1"  # chunked bodies: a stream's chunks reach the client as they are sent
    disable_nagle_algorithm = True  # as real servers do: a small chunk goes out at once, not after the last's ACK

    def do_GET(self):
        self._send(Response("get", 404, {"error_code": "NOT_FOUND", "message": f"no GET {self.path} here"}))

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = Request(self.path, dict(self.headers), body)
        response = self.model._next(request)
        if response.delay and self.model._stopped.wait(response.delay):
            self.close_connection = True
            return
        if callable(response.body):
            try:
                message = response.body(request)
            except Exception as e:  # a bug in the test's own function: fail the test, not just this request
                with self.model._lock:
                    response = self.model._fail(f"{response.describe} raised {type(e).__name__}: {e}")
            else:
                message = {"role": "assistant", "content": message} if isinstance(message, str) else message
                finish = "tool_calls" if message.get("tool_calls") else "stop"
                response = Response(response.describe, body=self.model._completion(message, finish))
        wants_stream = (request.body or {}).get("stream") is True and not self.model.ignores_stream
        if response.chunks is None and wants_stream and not response.trickle and response.status == 200 and \
                _is_completion(response.body):
            response = Response(response.describe, chunks=completion_chunks(response.body))
        if response.chunks is not None:
            self._send_stream(response)
        else:
            self._send(response)

    def _send_stream(self, response: Response):
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [*map(sse, response.chunks), *([sse("[DONE]")] if response.end == "done" else [])]
            for i, event in enumerate(events):
                if i and response.interval and self.model._stopped.wait(response.interval):
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if i == 0 and response.gate is not None and not response.gate.wait(GATE_WAIT):
                    with self.model._lock:
                        self.model.failures.append(f"{response.describe}: the gate was not set within {GATE_WAIT} s "
                                                   f"of the first chunk: the client did not use it as it came")
            if response.end == "cut":
                self.close_connection = True  # the body never ends: the client sees the connection drop
            else:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            self.close_connection = True

    def _send(self, response: Response):
        body = response.body if isinstance(response.body, str) else json.dumps(response.body)
        data = body.encode()
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not response.trickle:
                self.wfile.write(data)
            for i in range(len(data) if response.trickle else 0):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if self.model._stopped.wait(response.trickle):
                    return
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (a timeout test)
            pass

    def log_message(self, *args):  # keep pytest output clean
        pass


def _is_completion(body) -> bool:
    return isinstance(body, dict) and body.get("object") == "chat.completion"
