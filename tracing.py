"""MLflow Tracing of both agents: a span per model call and per tool call, in one trace per turn or per job run.

llm.py never imports a tracer: `llm.run_tools(span=...)` holds a context manager open around each model call and
each tool call, and `Spans` is that factory on MLflow (a CHAT_MODEL span with the messages sent, the reply, the
tools and the token usage; a TOOL span with the name, the arguments and the result or the error).
- Served (serving.py): MLflow's ResponsesAgent makes the trace of predict / predict_stream; the spans open under it,
  and `tag_turn` tags it with the thread (also its session) and the runs the turn started.
- `python primary.py --traces DIR` (terminal.py): `use_directory` points MLflow at a local tracking directory and
  `traced_stream` makes the same trace around each turn. Both traces' output is `stream_output` of the events.
- A job run (worker.py): `job_run` opens one trace in the experiment the job names, tagged with the Databricks run
  id and the thread id, or returns None (tracing off, or it can't be used: the run goes on untraced).
mlflow is imported only by these functions, so the worker and the terminal load it only when tracing is on. Spans
carry no credentials: an error leaving a span is redacted, and a tool's detail is kept without its rows (the model's
view of them, cut to a head and a tail, is the span's output).
"""
import contextlib
import logging
import os
from pathlib import Path

import lakebase

log = logging.getLogger(__name__)

LOCAL_TURNS_EXPERIMENT = "async-agent"  # in a local tracking directory: the terminal's turns...
LOCAL_RUNS_EXPERIMENT = "async-agent-runs"  # ...and the local job runs (on Databricks: the job's mlflow_experiment)
# A job run exports its trace when it ends, within these bounds (the user's own MLFLOW_* settings win).
EXPORT_BOUNDS = {"MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


class Spans:
    """The span factory for llm.run_tools. Spans are children of `parent`, else of the span current in the calling
    thread (the trace MLflow makes around a served turn)."""

    def __init__(self, parent=None):
        import mlflow

        self.mlflow, self.parent = mlflow, parent

    @contextlib.contextmanager
    def __call__(self, kind: str, inputs: dict):
        from mlflow.entities import SpanType
        from mlflow.tracing import set_span_chat_tools
        from mlflow.tracing.constant import SpanAttributeKey

        model = kind == "model"
        span = self.mlflow.start_span_no_context(
            "chat_model" if model else inputs["name"], SpanType.CHAT_MODEL if model else SpanType.TOOL,
            parent_span=self.parent or self.mlflow.get_current_active_span(), inputs=inputs)
        if model:
            span.set_attribute(SpanAttributeKey.MESSAGE_FORMAT, "openai")
            if inputs["tools"]:
                set_span_chat_tools(span, inputs["tools"])
        outcome = {}
        try:
            yield outcome
        except BaseException as e:  # LLMError, a fatal error, a cancellation: said without secrets, then re-raised
            span.end(status=_error_status(f"{type(e).__name__}: {lakebase.redact(str(e))}"))
            raise
        if model:
            _end_model_span(span, outcome)
        else:
            _end_tool_span(span, outcome)


def _end_model_span(span, outcome: dict):
    from mlflow.tracing.constant import SpanAttributeKey

    usage = outcome.get("usage") or {}
    if usage:
        span.set_attribute(SpanAttributeKey.CHAT_USAGE, {
            "input_tokens": usage.get("prompt_tokens"), "output_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens")})
    choice = {"index": 0, "message": outcome["message"], "finish_reason": outcome.get("finish_reason")}
    span.end(outputs={"choices": [choice], **({"usage": usage} if usage else {})})


def _end_tool_span(span, outcome: dict):
    detail = outcome.get("detail")
    if isinstance(detail, dict):
        detail = {key: value for key, value in detail.items() if key != "rows"}
    error = outcome.get("error")
    span.end(outputs=outcome["message"]["content"], attributes={"detail": detail} if detail is not None else None,
             status=_error_status(str(error)) if error is not None else None)


def _error_status(description: str):
    from mlflow.entities import SpanStatus, SpanStatusCode

    return SpanStatus(SpanStatusCode.ERROR, description)


def tag_turn(request: dict, custom_outputs: dict, user: str | None = None):
    """Tag the current trace (a turn's) with its thread, as the trace's session too, and the runs it started; its
    user is `user` (a verified caller), else the request's context.user_id."""
    import mlflow

    thread_id = custom_outputs.get("thread_id")
    if not thread_id:  # a dry run's answer
        return
    tags = {"thread_id": thread_id}
    if custom_outputs.get("run_ids"):
        tags["databricks_run_id"] = ",".join(custom_outputs["run_ids"])
    user = user or (request.get("context") or {}).get("user_id")
    mlflow.update_current_trace(tags=tags, session_id=thread_id, user=user or None)


def tagged(request: dict, events, user: str | None = None):
    """A turn's stream events as they come; the one that brings custom_outputs (the last) tags the current trace,
    and an `error` event (a turn that failed part-way: the stream still ends normally) marks it failed."""
    for event in events:
        if event.get("custom_outputs"):
            tag_turn(request, event["custom_outputs"], user)
        elif event.get("type") == "error":
            import mlflow

            mlflow.update_current_trace(state="ERROR")
        yield event


def stream_output(chunks) -> dict:
    """The output of a streamed turn's trace: MLflow's ResponsesAgent reducer's (the output items) with what it leaves
    out, the turn's custom_outputs (thread id, turn, run ids) and the error of a stream that failed part-way."""
    from mlflow.types.responses import responses_agent_output_reducer

    events = [chunk if isinstance(chunk, dict) else chunk.model_dump(exclude_none=True) for chunk in chunks]
    custom = next((e["custom_outputs"] for e in reversed(events) if e.get("custom_outputs") is not None), None)
    error = next(({"code": e.get("code"), "message": e["message"]} for e in events if e.get("type") == "error"), None)
    extra = {"custom_outputs": custom, "error": error}
    return {**responses_agent_output_reducer(chunks), **{k: v for k, v in extra.items() if v is not None}}


def traced_stream(predict_stream):
    """`predict_stream` inside a trace like the one serving.py's AsyncAgent gets around a served predict_stream."""
    import mlflow
    from mlflow.entities import SpanType

    @mlflow.trace(name="predict_stream", span_type=SpanType.AGENT, output_reducer=stream_output)
    def traced(request: dict):
        yield from tagged(request, predict_stream(request))
    return traced


def use_directory(directory, log_level="WARNING") -> str:
    """Send traces to a local tracking directory, this process's and its children's (the local job runs): turns to
    experiment LOCAL_TURNS_EXPERIMENT. mlflow logs at `log_level`. Returns the tracking URI. Raises ImportError
    without mlflow."""
    import mlflow

    logging.getLogger("mlflow").setLevel(log_level)  # its own logger, set up on import, says INFO by default
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = path.as_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # mlflow-skinny has no database store; the file store serves
    mlflow.set_experiment(LOCAL_TURNS_EXPERIMENT)
    return path.as_uri()


class JobTrace:
    """One job run's trace: its root span (the request in, the answer or the error out) and `spans` under it."""

    def __init__(self, mlflow, experiment_id: str, request: str, run_id: str, thread_id: str):
        from mlflow.entities import SpanType
        from mlflow.tracing.constant import TraceMetadataKey

        tags = {"databricks_run_id": run_id, **({"thread_id": thread_id} if thread_id else {})}
        metadata = {TraceMetadataKey.TRACE_SESSION: thread_id} if thread_id else None
        self.root = mlflow.start_span_no_context("job_run", SpanType.AGENT, inputs={"request": request}, tags=tags,
                                                 metadata=metadata, experiment_id=experiment_id)
        self.trace_id, self.spans = self.root.trace_id, Spans(parent=self.root)

    def end(self, status: str, payload: dict):
        """End the trace with the run's last step; it is exported now, within EXPORT_BOUNDS."""
        error = payload.get("error") or payload.get("reason")
        self.root.end(outputs=payload.get("answer") if status == "completed" else payload,
                      status=_error_status(f"{status}: {error}") if status != "completed" else None)


def job_run(experiment: str, *, request: str, run_id: str, thread_id: str, env=os.environ) -> JobTrace | None:
    """The trace of a job run in `experiment`, or None: no experiment named, nowhere to send it (no
    MLFLOW_TRACKING_URI and not on Databricks), no mlflow, or the experiment can't be used (a warning says which)."""
    if not experiment:
        return None
    uri = env.get("MLFLOW_TRACKING_URI") or ("databricks" if env.get("DATABRICKS_RUNTIME_VERSION") else "")
    if not uri:
        log.info("not tracing: MLflow experiment %s is named but there is no tracking server (MLFLOW_TRACKING_URI)",
                 experiment)
        return None
    for name, value in EXPORT_BOUNDS.items():
        os.environ.setdefault(name, value)
    try:
        import mlflow
    except ImportError:
        log.warning("not tracing: the job names MLflow experiment %s but mlflow is not installed", experiment)
        return None
    try:
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
    except Exception as e:  # any failure of the tracking server: tracing must never stop the run
        log.warning("not tracing: MLflow experiment %s can't be used: %s", experiment, lakebase.redact(str(e)))
        return None
    return JobTrace(mlflow, experiment_id, request, run_id, thread_id)
