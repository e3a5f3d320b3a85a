"""The MLflow ResponsesAgent wire shapes, as plain dicts: a request checked into a `Turn`, and chat messages
turned into output items and stream events. The agent (primary.py) and its Model Serving wrapper (serving.py)
share them; nothing here needs mlflow.

Request: `{"input": [items], "custom_inputs": {"thread_id", "request_id"}, "context": {"conversation_id",
"user_id"}}`, items `{"role", "content": str | [text parts]}` (or typed `message`, `function_call`,
`function_call_output`, `reasoning`). `system` and `developer` messages are the turn's instructions; earlier
user and assistant messages seed a new thread; tool and reasoning items of earlier turns are not replayed, but
the ids of items we issued (`msg_`/`fc_` + 32 hex digits, unguessable) find the thread of a client that sends
no thread id. Output items and events are shaped like mlflow.types.responses' `create_*_item` helpers; a bad
request raises `BadRequest` naming the first problem. A stream is text deltas (`text_delta`), each under the id
of the message item that then arrives in its `response.output_item.done` event (`item_done`), and, if the turn
fails part-way, an `error` event (`error_event`).
"""
import re
import uuid
from dataclasses import dataclass, field

import lakebase

MAX_CONTENT_CHARS = 32_000  # per input message; longer ones are refused (BadRequest)
MAX_INSTRUCTIONS_CHARS = 8_000  # the system and developer messages of a request, together
MAX_ITEM_IDS = 100  # the latest ids of our items in a request that are looked up
ITEM_ID = re.compile(r"(msg|fc)_[0-9a-f]{32}")  # the ids output_items() issues
IGNORED_ITEMS = ("function_call", "function_call_output", "reasoning")  # earlier turns' items: not replayed
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)


class BadRequest(ValueError):
    """The request can't be served as sent (shape, size, thread): the message names the problem."""


@dataclass
class TurnRequest:
    """What a request asks for, checked."""
    thread_id: str
    text: str  # the new user message
    user_id: str | None = None  # context.user_id (or the verified caller, primary.py): who asks
    request_id: str | None = None  # custom_inputs.request_id: a client's retry of the same request
    history: list = field(default_factory=list)  # earlier user/assistant messages, seeding a new thread
    instructions: str = ""  # the system and developer messages, for this turn only
    named: bool = True  # the client named the thread (custom_inputs.thread_id or context.conversation_id)
    item_ids: list = field(default_factory=list)  # ids of our items in `input`, oldest first


def parse_request(request) -> TurnRequest:
    """Check a ResponsesAgent request dict; raise BadRequest naming the first problem."""
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be an object with an 'input' list, not {type(request).__name__}")
    items = request.get("input")
    if items is None or items == []:
        raise BadRequest("the request has no input: send 'input' as a list of messages ending with the user's")
    if not isinstance(items, list):
        raise BadRequest(f"'input' must be a list of messages, not {type(items).__name__}")
    custom, context = _mapping(request, "custom_inputs"), _mapping(request, "context")
    messages = [_message(f"input[{i}]", item) for i, item in enumerate(items)]
    last = messages[-1]
    if last is None or last["role"] != "user":
        raise BadRequest(f"input[{len(items) - 1}], the last item, must be the user's message (role 'user')")
    if not last["content"].strip():
        raise BadRequest(f"input[{len(items) - 1}]: the user's message is empty")
    named = custom.get("thread_id") or context.get("conversation_id")
    thread_id = check_thread_id(named or uuid.uuid4().hex)
    user_id, request_id = context.get("user_id") or None, custom.get("request_id") or None
    for name, value in (("context.user_id", user_id), ("custom_inputs.request_id", request_id)):
        if value is not None and (not isinstance(value, str) or len(value) > 256
                                  or lakebase.UNSTORABLE.search(value)):
            raise BadRequest(f"{name} must be a string of at most 256 characters, without NUL or unpaired "
                             f"surrogate characters")
    history = [m for m in messages[:-1] if m and m["role"] in ("user", "assistant") and m["content"].strip()]
    instructions = "\n\n".join(m["content"].strip() for m in messages if m and m["role"] in ("system", "developer")
                               and m["content"].strip())
    if len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise BadRequest(f"the system and developer messages have {len(instructions):,} characters together; the "
                         f"limit is {MAX_INSTRUCTIONS_CHARS:,} (MAX_INSTRUCTIONS_CHARS)")
    ids = [item.get("id") for item in items if item.get("type", "message") in ("message", "function_call")]
    item_ids = [i for i in ids if isinstance(i, str) and ITEM_ID.fullmatch(i)][-MAX_ITEM_IDS:]
    return TurnRequest(thread_id, last["content"], user_id, request_id, history, instructions, bool(named), item_ids)


def check_thread_id(thread_id) -> str:
    try:
        return lakebase.check_id(thread_id, "thread id")
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _mapping(request, key) -> dict:
    value = request.get(key) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{key}' must be an object, not {type(value).__name__}")
    return value


def _message(where, item) -> dict | None:
    """An input item as a chat message; None for the tool and reasoning items of earlier turns (not replayed)."""
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object, not {type(item).__name__}")
    kind = item.get("type", "message")
    if kind in IGNORED_ITEMS:
        return None
    if kind != "message":
        raise BadRequest(f"{where}: type {kind!r} is not supported: use message, {', '.join(IGNORED_ITEMS)}")
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise BadRequest(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if isinstance(content, list):
        bad = [p for p in content if not isinstance(p, dict) or p.get("type") not in TEXT_PARTS
               or not isinstance(p.get("text"), str)]
        if bad:
            kind = bad[0].get("type") if isinstance(bad[0], dict) else type(bad[0]).__name__
            raise BadRequest(f"{where}: content part {kind!r} is not supported: only text parts "
                             f"({', '.join(TEXT_PARTS)}) with a string 'text'")
        content = "\n".join(p["text"] for p in content)
    elif not isinstance(content, str):
        raise BadRequest(f"{where}: content must be a string or a list of text parts")
    if len(content) > MAX_CONTENT_CHARS:
        raise BadRequest(f"{where}: the message has {len(content):,} characters; the limit is "
                         f"{MAX_CONTENT_CHARS:,}: send a shorter message")
    return {"role": role, "content": content}


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def output_items(message: dict, final=False, item_id=None) -> list[dict]:
    """A chat message as output items, shaped like mlflow.types.responses' create_*_item helpers; `item_id`: the id
    its text was streamed under."""
    if message["role"] == "tool":
        return [{"type": "function_call_output", "call_id": message["tool_call_id"], "output": message["content"]}]
    items = []
    if final or message.get("content"):
        items.append({"type": "message", "id": item_id or message_id(), "role": "assistant",
                      "content": [{"type": "output_text", "text": message.get("content") or "", "annotations": []}]})
    return items + [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                     "name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                    for call in message.get("tool_calls", [])]


def text_delta(item_id: str, delta: str) -> dict:
    return {"type": "response.output_text.delta", "item_id": item_id, "delta": delta}


def item_done(item: dict, custom=None) -> dict:
    """The event that delivers an output item; the last one of a stream carries custom_outputs."""
    done = {"type": "response.output_item.done", "item": item}
    return {**done, "custom_outputs": custom} if custom is not None else done


def error_event(message: str, code: str) -> dict:
    """The Responses API's `error` event, which ends a stream that failed part-way. An address in the message (a
    model endpoint's URL) is left out: it is for the logs, not for the person reading the chat."""
    return {"type": "error", "code": code, "message": URL.sub("(address withheld)", message)}
