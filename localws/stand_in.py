"""The offline stand-in chat model of the local workspace: not a language model, a few fixed rules.

`stand_in_reply(body)` answers an OpenAI chat-completions request body with a full chat.completion: for the
primary agent (start / poll / cancel jobs) and the worker (ask Genie, then restate its answer). Nothing is
random. The emulator serves it as the workspace's chat model endpoints.
"""
import hashlib
import json
import re
import time

from localws.answerer import FOLLOW_UP

MODEL = "offline-stand-in"
ABOUT = ("I am the offline stand-in model of the local workspace, not a real language model: I follow a few "
         "fixed rules. Ask me about the sample sales data (for example \"What was the revenue growth in 2025?\") "
         "and I will start a Databricks job to answer it; my first reply after it has ended tells you its answer. "
         "Meanwhile ask \"is it done?\" to see its progress, or say \"cancel\" to stop it.")
CLARIFY = ("I'm the offline stand-in model and only follow a few rules: ask a question about the sample sales "
           "data (revenue, orders, customers, products, regions...), ask \"is it done?\" about a job, or say "
           "\"cancel\". What would you like to know?")
HELP_TEXT = ("I can start a job that answers a question about the sample sales data (revenue, orders, customers, "
             "products, regions, months, growth... in 2024 and 2025), for example \"What was the total revenue in "
             "2025?\". Ask \"is it done?\" (or about a run by its number) for its progress and answer, or say "
             "\"cancel\" to stop it. When a job ends, my next reply tells you its outcome.")
GREETING = re.compile(r"\b(?:hi|hello|hey|hiya|good (?:morning|afternoon|evening)|thanks?|thank you|cheers)\b")
BYE = re.compile(r"\b(?:bye|goodbye|good night|see you|farewell|that's all)\b")
WHO = re.compile(r"\b(?:who|what) are you\b|\bare you (?:a |an )?(?:real|human|person|bot|robot|ai|model)\b")
HELP = re.compile(r"\b(?:help|what can you do|how does (?:this|it) work|what can i ask)\b")
CANCEL = re.compile(r"\b(?:cancel|stop|terminate|abort|kill)\b")
STATUS = re.compile(r"\b(?:is it done|done yet|finished|status|progress|any updates?|how is it going)\b")
MAYBE_STATUS = re.compile(r"\b(?:done|check|results?|ready|update|answer)\b")
DATA = re.compile(r"\b(?:revenue|sales|sold|selling|orders?|customers?|products?|categor(?:y|ies)|regions?|"
                  r"segments?|units|quantity|total|top|how (?:many|much)|average|growth|grow|grew|trend|"
                  r"monthly|quarterly|by (?:month|quarter|year)|compare|20\d\d)\b")
RUN_ID = r"(local-[0-9a-f-]+|\d+)"
RUN_MENTION = re.compile(rf'"run_id"\s*:\s*"?{RUN_ID}|\brun(?:\s+id)?\s*[:#]?\s*{RUN_ID}', re.I)


def stand_in_reply(body: dict) -> dict:
    """A full chat.completion response to an OpenAI chat-completions request body, by fixed rules."""
    messages = body.get("messages") or []
    tools = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
    if "query_genie" in tools:
        content, calls = _worker_turn(messages)
    elif "start_databricks_job" in tools:
        content, calls = _primary_turn(messages)
    else:
        content, calls = f"(offline stand-in model) You said: {_last_user(messages)[:200]}", []
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": f"call_{digest[:20]}{i}", "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(args)}}
                                 for i, (name, args) in enumerate(calls)]
    prompt = sum(len(_text(m.get("content"))) for m in messages) // 4 + 1
    completion = len(json.dumps(message)) // 4
    return {"id": f"chatcmpl-{digest[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def _last_user(messages) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "").strip()


def _tool_results(messages) -> list[tuple[str, str]]:
    """(tool name, content) of the tool messages at the end of the conversation, oldest first."""
    names = {c.get("id"): c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    tail = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        tail.append((names.get(m.get("tool_call_id"), "tool"), _text(m.get("content"))))
    return tail[::-1]


def _worker_turn(messages):
    results = _tool_results(messages)
    if results:
        return "\n\n".join(_restate(output) for _, output in results), []
    request = _last_user(messages)
    if not request:
        return "There is no request to answer.", []
    parts = [p.strip(" ?.") + "?" for p in re.split(r"(?i)\s+and also\s+", request) if p.strip(" ?.")]
    return None, [("query_genie", {"question": p if len(parts) > 1 else request}) for p in parts]


def _restate(output: str) -> str:
    """A final answer from one query_genie result: Genie's answer and its rows, or why there is none."""
    if output.startswith("Error:"):
        return f"I could not get the data: {output[len('Error:'):].strip()}"
    answer = re.search(r"^Genie: (.*?)(?:\n\n|\Z)", output, re.S)
    rows = re.search(r"^Rows \(.*?(?=\n\nGenie suggests|\Z)", output, re.S | re.M)
    text = answer.group(1).strip() if answer else output.strip()
    return f"{text}\n\n{rows.group(0).strip()}" if rows else text


def _primary_turn(messages):
    results = _tool_results(messages)
    news = [(name, output) for name, output in results if _unasked(output)]
    if results and len(news) < len(results):  # results of its own calls
        return "\n\n".join(_relay(name, output) for name, output in results), []
    told = "\n\n".join(_relay(name, output) for name, output in news)  # runs that ended unasked: said first
    content, calls = _answer(messages, {json.loads(output)["run_id"] for _, output in news})
    if told and content == CLARIFY:  # "ok", "cool": the news is the reply
        content = None
    return "\n\n".join(part for part in (told, content) if part) or None, calls


def _answer(messages, told_runs):
    """The reply to the user's last message: text, or tool calls (none for a run whose outcome was just told)."""
    text = _last_user(messages)
    low = text.lower()
    if CANCEL.search(low):
        return _about_run(messages, text, "terminate_databricks_job", "cancel")
    if STATUS.search(low) or (MAYBE_STATUS.search(low) and not DATA.search(low)):
        content, calls = _about_run(messages, text, "poll_databricks_job", "check on")
        return (None, []) if calls and calls[0][1]["run_id"] in told_runs else (content, calls)
    if DATA.search(low):
        return None, [("start_databricks_job", {"request": _standalone(messages, text)})]
    if BYE.search(low):
        return "Goodbye! Type /quit to leave the terminal; your thread and its runs are kept.", []
    if WHO.search(low):
        return ABOUT, []
    if HELP.search(low):
        return HELP_TEXT, []
    if GREETING.search(low):
        if re.search(r"\bthank|\bcheers", low):
            return "You're welcome!", []
        return "Hello! " + ABOUT, []
    return CLARIFY, []


def _unasked(output: str) -> bool:
    """Whether a tool result is a run's outcome the agent handed over unasked (a poll it made by itself)."""
    try:
        return json.loads(output).get("unasked") is True
    except (ValueError, AttributeError):
        return False


def _standalone(messages, text) -> str:
    """The job's worker does not see this conversation: a follow-up ("what about 2024?") is sent together with
    the request it follows, which the worker asks Genie as two questions in one conversation."""
    if not FOLLOW_UP.search(text.lower()):
        return text
    earlier = [json.loads(c["function"]["arguments"]).get("request", "") for m in messages[:-1]
               for c in m.get("tool_calls") or [] if c["function"]["name"] == "start_databricks_job"]
    if not (earlier and earlier[-1]):
        return text
    follow_up = re.sub(r"(?i)^and\s+", "", text)
    return f"{earlier[-1].split(' and also ')[0]} and also {follow_up}"


def _about_run(messages, text, tool, verb):
    """Call `tool` on the run the user names, else on the latest run mentioned earlier; or ask which run."""
    earlier = [m for msg in messages[:-1] if msg.get("role") != "system" for m in RUN_MENTION.finditer(
        _text(msg.get("content")) + " ".join(c["function"]["arguments"] for c in msg.get("tool_calls") or []))]
    said = RUN_MENTION.search(text) or re.search(rf"\b(?!20\d\d\b){RUN_ID}\b", text)  # a number, not a year
    found = said or (earlier[-1] if earlier else None)
    if found is None:
        return f"Which run should I {verb}? Tell me its run id: the number my reply gave when the job started.", []
    return None, [(tool, {"run_id": next(g for g in found.groups() if g)})]


def _relay(name: str, output: str) -> str:
    """A tool result in plain words: the run id, state, steps and the answer or error of a job run."""
    if output.startswith("Error:"):
        return f"That did not work: {output[len('Error:'):].strip()}"
    try:
        data = json.loads(output)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return output
    run = data.get("run_id", "?")
    if name == "start_databricks_job":
        return f"I started a job to answer that: run {run}. Ask me \"is it done?\" in a moment to see how it goes."
    steps = data.get("steps")
    count = len(steps) if isinstance(steps, list) else steps
    lead = (f"I asked to cancel run {run}; it is now" if name == "terminate_databricks_job"
            else f"Run {run} has ended since we last spoke: it is" if data.get("unasked") else f"Run {run} is")
    parts = [f"{lead} {data.get('state') or 'in an unknown state'}"
             + (f", with {count} step{'s' * (count != 1)} logged" if count is not None else "")
             + (", but it got no data." if data.get("no_data") else ".")]
    answer = "What it says:\n" if data.get("no_data") else "Answer:\n"
    for key, title in (("answer", answer), ("error", "Error: "), ("cancelled", "Cancelled: "),
                       ("queued", "Queued: "), ("state_message", "Details: ")):
        if data.get(key):
            parts.append(f"{title}{data[key]}")
    return "\n\n".join(parts)
