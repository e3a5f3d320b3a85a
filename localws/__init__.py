"""The local workspace: stand-ins for the Databricks services, so the agents run on a machine without an account.

Nothing in this package is deployed (databricks.yml leaves it out of the bundle) and none of the product modules
import it; `python primary.py` starts it when no workspace is configured, and the tests run everything on it.
- `Emulator` (emulator.py, jobs.py, genie_server.py): the workspace REST API on 127.0.0.1 that the real
  `databricks-sdk` talks to unchanged: Jobs 2.2 with each run a real `worker.py` subprocess, the Genie
  Conversation API, Lakebase credentials, chat model endpoints. It follows the real contracts.
- sample.py: the sample dataset, loaded into Postgres schema `sample`.
- answerer.py: the offline Genie, which answers a fixed set of question shapes over it (or asks a real model
  for the SQL).
- stand_in.py: the offline stand-in chat model: a few fixed rules, not a language model.
`start()` composes them into the `LocalWorkspace` of `python primary.py`: embedded Postgres (embedded.py) with the
sample data, the emulator with the bundle's job (job id 1), Genie space `local-sample` and the stand-in model. Its
data directory is private to the user who starts it, and its token is random, kept in memory and in the workers'
environment only.
"""
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

import llm
from localws import embedded
from localws import quirks as quirks_module
from localws.embedded import StartError
from localws.emulator import DEFAULT_USER, ApiError, BundleError, Server, load_job
from localws.genie_server import Genie
from localws.jobs import Jobs

__all__ = ["DEFAULT_DATA_DIR", "GENIE_SPACE", "Emulator", "LocalWorkspace", "StartError", "start"]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "~/.local/share/async-agent"
GENIE_SPACE = "local-sample"


class Emulator(Jobs, Genie, Server):
    """The emulated workspace at `url`. Construct it, use it, `close()` it (or use it as a context manager).

    Jobs: `add_job(job_dict)`; runs spawn `sys.executable <python_file> ...` in `project_dir` with
    `os.environ` + `env` (a None value removes a variable; DATABRICKS_* come from the emulator).
    Genie: `add_genie_space(space_id, answerer, users=None)`; `answerer.answer(question, history)` gets the earlier
    answered messages of the conversation as `[{"question", "text", "sql"}]`, oldest first; `users` restricts the
    space to those user names. Identity: `token` (default: fresh and random) is user `user`'s, the identity jobs
    run as; `users=[names]` or `add_user(name) -> token` add more, each with a token of their own.
    `quirks`: names from localws.quirks.QUIRKS, the real services' harsher behaviours to play (default none).
    The rest (Lakebase, serving, faults) is `Server`'s.
    """
    ROUTES = Server.ROUTES + Jobs.ROUTES + Genie.ROUTES

    def __init__(self, *, dsn=None, project_dir=".", env=None, log_dir=None, cancel_grace=10.0, genie_delay=0.3,
                 genie_rate_limit=None, genie_rate_window=60.0, genie_result_ttl=3.0, quirks=(), **server):
        super().__init__(**server)
        self.quirks = quirks_module.check(quirks)
        self._init_genie(genie_delay, genie_rate_limit, genie_rate_window, genie_result_ttl)
        self._init_jobs(dsn, project_dir, env, log_dir, cancel_grace)  # recovers the runs of workspaces that died
        self._serve()

    def close(self):
        """Stop serving; stop active runs (SIGTERM, SIGKILL after the grace) and mark them CANCELED."""
        if super().close():
            self._close_jobs()

@dataclass
class LocalWorkspace:
    emulator: Emulator
    dsn: str
    job_id: int
    genie_space_id: str
    postgres: object = None  # the embedded server handle, when start() started one

    @property
    def host(self):
        return self.emulator.url

    @property
    def token(self):
        return self.emulator.token

    def close(self):
        active = self.emulator.active_runs()
        if active:  # they would otherwise just be gone from the user's point of view
            log.warning("the local workspace stops, and with it %s %s, still going: %s cancelled",
                        "runs" if len(active) > 1 else "run", ", ".join(map(str, active)),
                        "they are" if len(active) > 1 else "it is")
        self.emulator.close()
        if self.postgres is not None:
            embedded.stop(self.postgres)  # stops the server when no other process uses it; the data stays

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start(project_dir=".", *, data_dir=None, dsn=None, variables=None, user=DEFAULT_USER, users=(), cancel_grace=10.0,
          genie_delay=1.0, genie_rate_limit=None, chat: llm.ChatConfig | None = None, quirks=(),
          say=None, mlflow_experiment="") -> LocalWorkspace:
    """Bring up the local workspace: Postgres (embedded under `data_dir`, or `dsn`), the sample data, and the
    emulator with the bundle's job as job 1, Genie space `local-sample` and the offline stand-in model.
    `chat`: the agents' chat model settings; its endpoint name is served by the stand-in, and with a `base_url`
    the local Genie asks that model for its SQL. (LLM_BASE_URL... reach the workers through their environment.)
    `quirks`: the real services' behaviours to play (localws/quirks.py; `quirks.from_env()` reads LOCALWS_HARSH).
    `user` (token: `ws.token`, fresh and random) is the workspace's first user; `users` names more (their tokens:
    `ws.emulator.users[name].token`). `say(line)` is told, in a line, what start-up changed on the machine
    (default: printed on stderr). `mlflow_experiment`: where each job run is traced (MLFLOW_TRACKING_URI reaches the
    workers through their environment); default none, the runs untraced.
    A failure is a `StartError` of one line that says what to do (a bundle file that is not right, a data directory
    that can't be made or is not the user's own, a store or sample that can't be set up), or a psycopg.Error."""
    import lakebase
    from localws import answerer, sample, stand_in

    quirks = quirks_module.check(quirks)
    if quirks:
        log.warning("the local workspace plays these behaviours of the real services: %s", ", ".join(sorted(quirks)))
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    project_dir = Path(project_dir).resolve()
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    handle = emulator = None
    try:
        job = _bundle_job(project_dir, variables, mlflow_experiment)
        _private_dir(data_dir, say, passable=dsn is None and os.geteuid() == 0)
        _private_dir(data_dir / "runs", say)
        if dsn is None:
            handle, dsn = embedded.start(data_dir / "pgdata", say)
        with psycopg.connect(dsn, autocommit=True) as conn:
            sample.load_sample(conn)
            login = sample.reader_login(conn)  # after the load: a reload drops the reader's grants
            if login is None:
                say(f"note: the local Genie's SQL runs as {conn.info.user}, which can read this whole database: "
                    f"grant it CREATEROLE to confine Genie to schema sample")
        chat = chat or llm.ChatConfig()
        endpoints = {chat.endpoint}
        endpoints |= {p.get("default") for p in job.get("parameters") or [] if p["name"] == "llm_endpoint"} - {""}
        env = {"LAKEBASE_DSN": dsn, "GENIE_SPACE_ID": GENIE_SPACE, "LAKEBASE_INSTANCE": None,
               "LAKEBASE_ENDPOINT": None}
        emulator = Emulator(user=user, users=users, dsn=dsn, project_dir=project_dir, env=env,
                            log_dir=data_dir / "runs", cancel_grace=cancel_grace, genie_delay=genie_delay,
                            genie_rate_limit=genie_rate_limit, quirks=quirks,
                            serving=dict.fromkeys(endpoints, stand_in.stand_in_reply))
        job_id = emulator.add_job(job, job_id=1)
        genie = answerer.GenieAnswerer(dsn, chat=chat.client() if chat.base_url else None, login=login or {})
        emulator.add_genie_space(GENIE_SPACE, genie, title="Sample data (local)",
                                 description="The sample dataset in schema `sample`.")
    except BaseException as e:
        if emulator is not None:
            emulator.close()
        if handle is not None:
            embedded.stop(handle)
        error = _start_error(e)
        if error is e:
            raise
        raise error from e
    log.info("local workspace at %s (job %s, Genie space %s, Postgres %s)", emulator.url, job_id, GENIE_SPACE,
             lakebase.redact(dsn))  # a DSN may hold a password
    return LocalWorkspace(emulator, dsn, job_id, GENIE_SPACE, handle)


def _bundle_job(project_dir, variables, mlflow_experiment) -> dict:
    """The bundle's job, with the parameters that point it at the local workspace."""
    job = load_job(project_dir, variables)
    overrides = {"genie_space_id": GENIE_SPACE, "lakebase_instance": "", "lakebase_endpoint": "",
                 "mlflow_experiment": mlflow_experiment}
    for param in job.get("parameters") or []:  # whatever the bundle variables say, local mode uses these
        param["default"] = overrides.get(param["name"], param.get("default", ""))
    return job


def _start_error(e: BaseException) -> BaseException:
    """What start() raises for `e`: a StartError of one line for what the user can fix, else `e` itself."""
    if isinstance(e, StartError):
        return e
    if isinstance(e, BundleError):
        return StartError(f"the local workspace can't run the bundle's job: {e}")
    if isinstance(e, OSError) and e.filename:
        return StartError(f"the local workspace did not start: {e.filename}: {e.strerror or e}; fix that, or choose "
                          f"another --data-dir")
    if isinstance(e, (ApiError, RuntimeError, OSError)):  # the run store, the sample, the system
        return StartError(f"the local workspace did not start: {' '.join(str(e).split())}")
    return e


def _private_dir(path: Path, say, passable=False):
    """Make `path` (and its parents) if need be, readable by its owner only; say so if it was not. `passable`: the
    embedded server's own user may pass through it (as root, see embedded.py). A directory that is not the user's
    own (another owner's, or shared with the sticky bit as /tmp is) is refused, never changed."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise StartError(f"the data directory {path} is a file, not a directory: choose another --data-dir") from None
    except OSError as e:
        raise StartError(f"the data directory {path} can't be made ({e.strerror or e}): choose another --data-dir") \
            from None
    info = path.stat()
    if info.st_uid != os.geteuid() or info.st_mode & stat.S_ISVTX:
        why = "shared (its sticky bit is set)" if info.st_uid == os.geteuid() else "another user's"
        raise StartError(f"the data directory {path} is {why}: choose a directory of your own as --data-dir")
    mode = stat.S_IMODE(info.st_mode)
    allowed = embedded.pass_bit(info) if passable else 0
    if mode & 0o077 & ~allowed:
        private = mode & ~0o077 | mode & allowed
        path.chmod(private)
        say(f"note: made {path} private to you (its mode was {mode:o}, now {private:o})")
