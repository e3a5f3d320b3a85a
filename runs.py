"""The job runs the primary agent starts, reads and cancels: Jobs API calls whose failures say what to do, a run's
state, what a poll reports about a run, and a run's step as one line.

`Jobs(workspace, job_id)` wraps the Jobs API calls the agent makes. A failure a person or the model can act on
(refused identity, throttling, a run or job that does not exist) is a `llm.ToolError` naming the fix, so the model
can tell the user; anything else is raised. `jobs_auth_hint()` is that fix for the identity the agent runs as.
`summarize(run)` is the one reader of a run's state: `status` first, the deprecated `state` as the fallback.
`Jobs.outcome(run)` reads how a run ended from its own output, for runs whose worker logged no final step; the
worker frames its answer on stdout with `answer_block()` so that `answer_in_logs()` can find it there.
`report()` is what the agent's poll returns: the run's state, its progress from the step log, its outcome.
"""
import json
import logging
import re
import secrets
from dataclasses import dataclass

import llm
from lakebase import redact

log = logging.getLogger(__name__)

FINISHED = {"TERMINATED", "SKIPPED", "INTERNAL_ERROR"}  # life cycle states of a run that has ended
# status.termination_details.code -> the result it means; any other code is a failure
RESULTS = {"SUCCESS": "SUCCESS", "SUCCESS_WITH_FAILURES": "SUCCESS_WITH_FAILURES", "USER_CANCELED": "CANCELED",
           "CANCELED": "CANCELED", "SKIPPED": "SKIPPED", "DISABLED": "SKIPPED",
           "MAX_CONCURRENT_RUNS_EXCEEDED": "SKIPPED", "MAX_JOB_QUEUE_SIZE_EXCEEDED": "SKIPPED"}
MAX_ERROR_CHARS = 500  # a failed run's error from its output, as the model sees it
MAX_TRACE_CHARS = 1_500  # the end of its error trace (or logs)
MAX_ANSWER_CHARS = 8_000  # a worker answer longer than this is cut to a head and a tail for the model
PERMISSION_FIX = ("the identity the agent runs as needs CAN_MANAGE_RUN on the job; on Model Serving that is the "
                  "service principal of DATABRICKS_CLIENT_ID (python primary.py deploy --secret-scope): Model "
                  "Serving's automatic credentials and on-behalf-of-user tokens do not cover Jobs")


class Jobs:
    """The worker job's runs, through `workspace` (a WorkspaceClient). `auth_hint`: what to fix when the Jobs API
    refuses the agent's identity (`jobs_auth_hint()`)."""

    def __init__(self, workspace, job_id, auth_hint=PERMISSION_FIX):
        self.workspace, self.job_id, self.auth_hint = workspace, int(job_id), auth_hint

    def start(self, parameters: dict, idempotency_token: str) -> int:
        """Start a run (or get the run this token already started); its run id."""
        return self._call(f"starting job {self.job_id}", f"job {self.job_id} does not exist: check DATABRICKS_JOB_ID",
                          self.workspace.jobs.run_now, self.job_id, job_parameters=parameters,
                          idempotency_token=idempotency_token).run_id

    def get(self, run_id):
        """The run (databricks.sdk.service.jobs.Run)."""
        return self._call(f"reading run {run_id}", f"run {run_id} no longer exists in the workspace",
                          self.workspace.jobs.get_run, int(run_id))

    def cancel(self, run_id):
        """Ask for the run to be cancelled; not waited on: the worker stops within seconds."""
        self._call(f"cancelling run {run_id}", f"run {run_id} no longer exists", self.workspace.jobs.cancel_run,
                   int(run_id))

    def output(self, run):
        """The output of the run's task (databricks.sdk.service.jobs.RunOutput: error, error_trace, logs). The
        Jobs API gives it per task run, not for the job run."""
        if not run.tasks:
            raise llm.ToolError(f"run {run.run_id} lists no task whose output could be read")
        task = run.tasks[-1]  # the job has one task; with retries, the last attempt
        from databricks.sdk.errors import DatabricksError

        try:
            return self._call(f"reading the output of run {run.run_id}", f"run {run.run_id} no longer exists",
                              self.workspace.jobs.get_run_output, int(task.run_id))
        except DatabricksError as e:  # whatever else the API says: the poll still reports what it knows
            raise llm.ToolError(f"reading the output of run {run.run_id}: {e}") from e

    def outcome(self, run, summary: "RunSummary") -> dict:
        """How an ended run ended (`summary`: summarize(run)), from its own output, for a run whose worker logged no
        final step (it crashed, was killed, or could not reach the step-log database): {"answer"} when the worker
        printed one, else {"cancelled"} for a run cancelled before its worker could log it, else {"error",
        "error_trace"}, {} when the output says nothing; {"output_error"} when it can't be read."""
        try:
            output = self.output(run)
        except llm.ToolError as e:
            return {"output_error": str(e)}
        logs = output.logs or ""
        answer = answer_in_logs(logs)
        if answer is not None:
            return {"answer": answer}
        if summary.state.endswith(" SUCCESS"):
            return {"error": "the run succeeded, but its answer is neither in the step log nor in its output"}
        if summary.state.endswith(" CANCELED"):  # e.g. a SIGTERM before the worker had started Python
            return {"cancelled": summary.message or "cancelled before the worker could log a step"}
        trace = (output.error_trace or logs).strip()
        error = output.error or (trace.splitlines() or [None])[-1]
        if error is None:  # nothing printed (cancelled before it started, say): the run's state says it all
            return {}
        trace = tail(trace, MAX_TRACE_CHARS) if trace != error.strip() else None
        return {"error": redact(shorten(error, MAX_ERROR_CHARS)), "error_trace": trace and redact(trace)}

    def page_url(self, run_id) -> str | None:
        """The run's page, or None if it can't be read now (the run exists; only its link is missing)."""
        from databricks.sdk.errors import DatabricksError

        try:
            return self.workspace.jobs.get_run(int(run_id)).run_page_url
        except (DatabricksError, TimeoutError) as e:
            log.warning("no run page URL for run %s: %s", run_id, e)
            return None

    def _call(self, what, missing, fn, *args, **kwargs):
        from databricks.sdk.errors import BadRequest, NotFound, PermissionDenied, TooManyRequests, Unauthenticated

        try:
            return fn(*args, **kwargs)
        except TimeoutError as e:  # the SDK's retries ran out (429, 503, no connection)
            if isinstance(e.__cause__, TooManyRequests):
                raise llm.ToolError(f"{what}: too many job runs at the moment; try again in a few minutes") from e
            raise llm.ToolError(f"{what}: the Jobs API did not answer in time ({e}); try again later") from e
        except (PermissionDenied, Unauthenticated) as e:
            refused = "permission denied" if isinstance(e, PermissionDenied) else "not authenticated"
            reason = str(e).split(". Config: ")[0]  # the SDK appends its config to 401/403 messages
            raise llm.ToolError(f"{what}: {refused} ({reason}): {self.auth_hint}") from e
        except TooManyRequests as e:
            raise llm.ToolError(f"{what}: too many job runs at the moment ({e}); try again in a few minutes") from e
        except (NotFound, BadRequest) as e:
            if isinstance(e, NotFound) or "does not exist" in str(e):
                raise llm.ToolError(f"{what}: {missing} ({e})") from e
            raise


def jobs_auth_hint(sdk_config, job_id) -> str:
    """What to fix when the Jobs API refuses the agent: the identity it runs as (from the SDK's `Config`), and what
    that one needs."""
    grant = f"grant it CAN_MANAGE_RUN on job {job_id} (databricks jobs update-permissions {job_id} ...)"
    auth_type = sdk_config.auth_type
    if auth_type == "model-serving":  # with a client id and secret the SDK would use them, if it had a host
        unset = [name for name, value in (("DATABRICKS_CLIENT_ID", sdk_config.client_id),
                                          ("DATABRICKS_CLIENT_SECRET", sdk_config.client_secret)) if not value]
        unset = unset or ["DATABRICKS_HOST"]
        return (f"the agent runs with Model Serving's automatic credentials, which do not cover Jobs, because "
                f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set on the endpoint: deploy again "
                f"with python primary.py deploy --secret-scope ... (a service principal's OAuth secret) and {grant}")
    if auth_type == "oauth-m2m":
        return (f"the agent runs as service principal {sdk_config.client_id} (DATABRICKS_CLIENT_ID): {grant}; if it "
                f"has that, check its OAuth secret (DATABRICKS_CLIENT_SECRET)")
    return f"the agent runs with Databricks auth '{auth_type}': that identity needs CAN_MANAGE_RUN on job {job_id}"


@dataclass(frozen=True)
class RunSummary:
    """What the agent reports about a run's state."""
    state: str  # "QUEUED", "RUNNING", "TERMINATED SUCCESS", "TERMINATED FAILED", ..., "UNKNOWN"
    finished: bool  # the run has ended
    message: str | None = None  # why it ended (termination details), or the state message
    queue_reason: str | None = None  # why it is queued


def summarize(run) -> RunSummary:
    """The run's state from `status`, falling back to the deprecated `state` for what `status` lacks; a run with
    neither (or with values this SDK does not know, which it reads as None) is UNKNOWN. `status` has no result:
    the result is `state.result_state` while runs still carry it (only it tells TIMEDOUT from CANCELED), else
    what the termination code means."""
    status, state = run.status, run.state
    life = _value(status and status.state) or _value(state and state.life_cycle_state) or "UNKNOWN"
    details = status and status.termination_details
    code = _value(details and details.code)
    result = _value(state and state.result_state) or (RESULTS.get(code, "FAILED") if code else None)
    queue = status and status.queue_details
    queue_reason = (" ".join(filter(None, [_value(queue.code) and f"{_value(queue.code)}:", queue.message]))
                    if queue else None) or (state and state.queue_reason) or None
    message = (details and details.message) or (state and state.state_message) or None
    return RunSummary(f"{life} {result}" if result else life, life in FINISHED, message, queue_reason)


def _value(enum):
    return enum.value if enum is not None else None


def answer_block(answer: str) -> str:
    """The answer as the worker prints it on stdout, between two marker lines that carry a random tag: a Job run's
    output (its logs) then holds the answer even when the step log never got it. The tag is chosen after the
    answer exists, so no answer can contain its end marker."""
    tag = secrets.token_hex(8)
    return f"----- answer {tag} -----\n{answer}\n----- end of answer {tag} -----"


def answer_in_logs(logs: str) -> str | None:
    """The answer of the last complete `answer_block()` in a run's logs, or None (no answer printed, or the logs,
    which keep only their end, lost its beginning)."""
    ends = list(re.finditer(r"^----- end of answer ([0-9a-f]{16}) -----$", logs, re.M))
    if not ends:
        return None
    end = ends[-1]
    begin = f"----- answer {end.group(1)} -----\n"
    start = logs.rfind(begin, 0, end.start())
    if start < 0 or (start > 0 and logs[start - 1] != "\n"):
        return None
    return logs[start + len(begin):end.start()].removesuffix("\n")


def report(run_id: str, run, progress: dict, jobs: Jobs) -> dict:
    """What the agent's poll returns: the run's state (`run`: the Jobs API's Run), its progress (`progress`:
    lakebase.run_progress) and, once it has ended, its answer, error or cancellation (from the run's output, read
    with `jobs`, when the worker logged no final step)."""
    summary = summarize(run)
    report = {"run_id": run_id, "state": summary.state, "state_message": summary.message,
              "queued": summary.queue_reason, "run_page_url": run.run_page_url, "steps": progress["steps"],
              "recent_steps": [describe_step(step) for step in progress["recent"]]}
    final = progress["final"] or {"status": None, "payload": {}}
    payload = final["payload"]
    if final["status"] == "completed":
        report["answer"] = cut(str(payload.get("answer")), MAX_ANSWER_CHARS)
        if not progress["answered"]:  # a refusal or an error, said as an answer
            report["no_data"] = "none of the run's data queries succeeded: its answer has no data, it says why"
    elif final["status"] == "failed":
        report["error"] = payload.get("error")
    elif final["status"] == "cancelled":
        report["cancelled"] = payload.get("reason") or "cancelled"
    elif summary.finished:  # ended with no final step: the worker died first, or its database was out of reach
        outcome = jobs.outcome(run, summary)
        if "answer" in outcome:
            outcome["answer"] = cut(outcome["answer"], MAX_ANSWER_CHARS)
        if outcome:
            report.update(outcome, note="the worker logged no final step; this is from the run's output")
    return {k: v for k, v in report.items() if v is not None}


def ended(report: dict) -> bool:
    """Whether a report() is of a run that has ended, or whose worker has logged its outcome."""
    return bool({"answer", "error", "cancelled"} & report.keys()) or report["state"].split()[0] in FINISHED


def outcome(report: dict) -> str:
    """A run's outcome (a report() of a run that has ended) in a few words, for a reply of the agent's own."""
    run = f"Run {report['run_id']}"
    if "answer" in report:
        got = ", without data. What it says" if "no_data" in report else ". Its answer"
        return f"{run} has finished{got}:\n{cut(report['answer'], 2_000)}"
    if "error" in report:
        return f"{run} failed: {report['error']}"
    if "cancelled" in report:
        return f"{run} was cancelled: {report['cancelled']}"
    details = f" ({report['state_message']})" if report.get("state_message") else ""
    return f"{run} ended without an answer: {report['state']}{details}"


def describe_step(step: dict) -> str:
    """One task_logs step as one readable line."""
    status, p = step["status"], step["payload"]
    if status == "tool_call":
        arguments = p.get("arguments")
        text = f"calls {p.get('name')} {arguments if isinstance(arguments, str) else json.dumps(arguments)}"
    elif status == "tool_result":
        outcome = "failed" if p.get("error") else "answered"
        text = f"{p.get('name')} {outcome} in {(p.get('duration_ms') or 0) / 1000:.1f} s: {p.get('output')}"
    else:
        text = {"started": f"started: {p.get('request')}", "completed": f"answer: {p.get('answer')}",
                "failed": f"failed: {p.get('error')}", "cancelled": f"cancelled: {p.get('reason')}"}.get(status, status)
    return f"#{step['step']} {shorten(text, 160)}"


def tail(text, limit: int) -> str:
    """The end of `text` (whole lines, at most `limit` characters), with a note of what was left out."""
    text = str(text).strip()
    if len(text) <= limit:
        return text
    end = text[-limit:]
    end = end[end.find("\n") + 1:] if "\n" in end else end
    return f"[... {len(text) - len(end):,} characters left out ...]\n{end}"


def shorten(text, limit: int) -> str:
    """`text` on one line (whitespace runs made one space), cut to `limit` characters with "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut(text: str, limit: int) -> str:
    """`text` whole, or its head and tail (`limit` characters in all) with a note of what was left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half:,} characters left out ...]\n{text[-half:]}"
