"""The job runs the primary agent starts, reads and cancels: Jobs API calls whose failures say what to do, a run's
state, and a run's step as one line.

`Jobs(workspace, job_id)` wraps the three Jobs API calls the agent makes. A failure a person or the model can act on
(refused identity, throttling, a run or job that does not exist) is a `llm.ToolError` naming the fix, so the model
can tell the user; anything else is raised. `jobs_auth_hint()` is that fix for the identity the agent runs as.
"""
import json
import logging

import llm

log = logging.getLogger(__name__)

FINISHED = {"TERMINATED", "SKIPPED", "INTERNAL_ERROR"}  # life cycle states of a run that has ended
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


def run_state(run) -> str:
    """"RUNNING", "TERMINATED SUCCESS", ...: the life cycle state, and the result state once there is one."""
    state = run.state
    life = state.life_cycle_state.value if state and state.life_cycle_state else "UNKNOWN"
    return f"{life} {state.result_state.value}" if state and state.result_state else life


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


def shorten(text, limit: int) -> str:
    """`text` on one line (whitespace runs made one space), cut to `limit` characters with "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
