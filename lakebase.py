"""All Postgres access: conversation threads, the job runs they started, and the workers' step logs.

Connecting, chosen by `LakebaseConfig` (`from_env()`): a plain DSN (`LAKEBASE_DSN`, or the PG* variables,
which libpq reads itself), or a Lakebase provisioned instance (`LAKEBASE_INSTANCE`) or autoscaling endpoint
(`LAKEBASE_ENDPOINT`), whose password is an OAuth token minted with the Databricks SDK. Tokens live an hour
and are checked only at login, so each new connection gets a token younger than `TOKEN_REUSE_SECONDS`, and
pooled connections are recycled after `MAX_LIFETIME_SECONDS`. Minting is a pluggable callable returning a
`Login` (`sdk_login`, or your own), cached by `CachedLogin`. `connect()` gives one autocommit connection
(a worker), `open_pool()` a pool (the serving process). What a person must fix raises `LakebaseError`:
one line saying what to fix, never a password or token. Every session has bounds (`statement_timeout`,
`lock_timeout`, `idle_in_transaction_session_timeout`): a held lock or a slow statement fails in seconds, and
`explain()` says which bound was hit.

Schema: `migrate(conn)` applies the numbered `MIGRATIONS` once, under an advisory lock. A thread's messages
are append-only rows, one per chat-completions message, so a turn writes O(1) rows however long the thread.
Ownership: `claim_thread()` decides a thread's owner once, at the start of a turn (a new thread is created then,
owned by the user or anonymous for good); `append_turn(owner=...)` and `record_run(owner=...)` hold to that owner
and refuse (PermissionError) a thread whose stored owner differs. `thread_owner()` reads it (or `NO_THREAD`).
A run's step log is closed once it has a final step: `log_step()` then raises `RunEnded` and writes nothing.
Text Postgres cannot store (NUL, lone surrogates) is replaced by U+FFFD with a warning, never dropped.
Writes that may be retried carry a key chosen before the first try (`append_turn(key=)`, `log_step(key=)`,
`reserve_run`), so a retry after a lost reply finds the first write instead of making a second.
"""
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "databricks_postgres"
TOKEN_REUSE_SECONDS = 300  # a minted token is reused for new connections while younger than this
MAX_LIFETIME_SECONDS = 45 * 60  # recycle pooled connections well before their token's hour is out
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
PG_VARS = ("PGHOST", "PGHOSTADDR", "PGSERVICE", "PGDATABASE", "PGUSER", "PGPORT")
STATUSES = ("started", "tool_call", "tool_result", "completed", "failed", "cancelled")
FINAL_STATUSES = ("completed", "failed", "cancelled")  # a run's last step: its log takes no more
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
ENDPOINT_PATTERN = re.compile(r"projects/[^/]+/branches/[^/]+/endpoints/[^/]+")
NO_THREAD = type("NoThread", (), {"__repr__": lambda self: "NO_THREAD"})()  # thread_owner(): no such thread
_LOCK_MIGRATE, _LOCK_RUN = 7_231_001, 7_231_002  # advisory lock keys (for runs: the first of two keys)
MIGRATE_LOCK_TIMEOUT, MIGRATE_STATEMENT_TIMEOUT = "2min", "10min"  # a migration may build an index on a big table
RUN_SILENCE = timedelta(days=3)  # a run with no final step and no sign of life this long has ended (queued runs
                                 # give up after 48 hours, jobs time out): prune_threads may delete it


class LakebaseError(Exception):
    """Cannot connect, for a reason a person must fix (configuration, permissions). Never holds a secret."""


class Unreachable(LakebaseError):
    """The server did not answer within the connect budget (down, restarting, network), or the Databricks API that
    mints its logins did not within the SDK's retries, or the instance has no host yet: it may come back."""


class RunEnded(Exception):
    """log_step: the run already has its final step (`status`, step number `step`), so its log takes no more."""

    def __init__(self, run_id: str, status: str, step: int):
        super().__init__(f"run {run_id} has already ended ({status} at step {step}): its step log is closed")
        self.run_id, self.status, self.step = run_id, status, step


@dataclass
class LakebaseConfig:
    dsn: str = ""  # libpq DSN or URI; empty: libpq reads the PG* variables itself
    instance: str = ""  # Lakebase provisioned instance name
    endpoint: str = ""  # Lakebase autoscaling endpoint projects/P/branches/B/endpoints/E
    database: str = DEFAULT_DATABASE  # database for the instance/endpoint modes
    user: str = ""  # Postgres role for the instance/endpoint modes; default: the SDK's current identity
    connect_timeout: int = 10  # seconds per connection attempt
    retry_seconds: float = 15.0  # keep retrying an unreachable server this long (restarts, failovers)
    statement_timeout: float = 30.0  # seconds a statement may run before Postgres cancels it
    lock_timeout: float = 5.0  # seconds a statement may wait for a lock another session holds
    idle_in_transaction_timeout: float = 60.0  # seconds a session may sit idle in a transaction, holding locks
    pg_env: bool = False  # PG* variables are set: with no DSN, libpq reads them itself

    @classmethod
    def from_env(cls, env=os.environ) -> "LakebaseConfig":
        return cls(dsn=env.get("LAKEBASE_DSN", ""), instance=env.get("LAKEBASE_INSTANCE", ""),
                   endpoint=env.get("LAKEBASE_ENDPOINT", ""),
                   database=env.get("LAKEBASE_DATABASE") or DEFAULT_DATABASE, user=env.get("LAKEBASE_USER", ""),
                   pg_env=any(env.get(var) for var in PG_VARS))

    def configured(self) -> bool:
        """Whether some way to reach the database is set."""
        return bool(self.dsn or self.instance or self.endpoint or self.pg_env)


# ------------------------------------------------------------------ secrets

SECRET_VARIABLES = ("LLM_API_KEY", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_PASSWORD",
                    "ARM_CLIENT_SECRET", "GOOGLE_CREDENTIALS", "DATABRICKS_METADATA_SERVICE_URL", "PGPASSWORD")
MIN_SECRET_CHARS = 8  # a shorter value is not blanked out wherever it appears: it would mangle ordinary words
_secrets, _minted, _secrets_lock = set(), deque(maxlen=50), threading.Lock()  # minted: the latest database tokens
_REDACTIONS = [  # (pattern, replacement), applied in order after the registered values
    (re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)"), r"\1***"),  # libpq key=value
    (re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),  # URL credentials
    (re.compile(r"""(?i)(["']?\b(?:\w*token|\w*secret|password|api_key)["']?\s*[:=]\s*)(["'])(?:\\.|(?!\2).)*\2"""),
     r"\1\2***\2"),  # token-like JSON fields (the SDK's debug dumps: "token": "...")
    (re.compile(r"""(?i)(\bauthorization["']?\s*[:=]\s*["']?(?:\w+\s+)?)[^\s"',]+"""), r"\1***"),  # a header
    (re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]{8,}"), r"\1***"),  # a bearer credential anywhere
    (re.compile(r"\beyJ[\w-]+(?:\.[\w-]+){1,2}"), "***"),  # JWTs (Databricks OAuth tokens), also cut short
    (re.compile(r"\bdapi[0-9a-f]{32}(?:-\d+)?\b"), "***"),  # Databricks personal access tokens
]


def add_secrets(*values):
    """From now on redact() blanks out each of `values` (of MIN_SECRET_CHARS or more) wherever it appears."""
    with _secrets_lock:
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_CHARS)


def redact(text: str) -> str:
    """`text` without secrets, for messages and logs: the values given to add_secrets() (configured keys and
    passwords) and the database tokens minted lately, then passwords and credentials in DSNs and URLs, token-like
    fields (`"token": "..."`), bearer credentials, JWTs and Databricks personal access tokens."""
    with _secrets_lock:
        values = sorted({*_secrets, *_minted}, key=len, reverse=True)  # longest first: one may contain another
    for value in values:
        text = text.replace(value, "***")
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def sdk_secrets(config) -> list[str]:
    """The secret values of a databricks-sdk `Config` (token, client secret, password...), wherever it read them
    from: the environment or a profile."""
    return [getattr(config, attr.name) for attr in config.attributes() if attr.sensitive]


def guard_secrets(env=os.environ):
    """For an entry point: redact() blanks out the secrets `env` configures (SECRET_VARIABLES, the passwords in
    LAKEBASE_DSN and LLM_BASE_URL), and every log record passes through redact() as it is made, whatever its
    level, logger or handler, so the SDK's debug dumps of requests and responses keep no secret either."""
    add_secrets(*(env.get(name) for name in SECRET_VARIABLES))
    try:  # a malformed one is refused, saying why, where it is used
        add_secrets(urlsplit(env.get("LLM_BASE_URL", "")).password)
    except ValueError:
        pass
    try:
        add_secrets(psycopg.conninfo.conninfo_to_dict(env.get("LAKEBASE_DSN", "")).get("password"))
    except psycopg.ProgrammingError:
        pass
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def redacted_record(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: the handler reports it as it always does
            return record
        redacted = redact(message)
        if redacted != message:  # else the record keeps its format and arguments, which handlers may read
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = record.exc_text and redact(record.exc_text)
        record.stack_info = record.stack_info and redact(record.stack_info)
        return record
    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)


# ------------------------------------------------------------------ credentials

@dataclass(frozen=True)
class Login:
    """Where and as whom one new connection logs in."""
    host: str
    user: str
    password: str = field(repr=False)
    dbname: str = DEFAULT_DATABASE
    port: int = 5432
    sslmode: str = "require"  # Lakebase takes the token as a plaintext password: TLS only


class CachedLogin:
    """Calls `mint` for the first connection and again once its Login is older than `max_age` seconds.
    Thread-safe: the pool opens connections from several worker threads."""

    def __init__(self, mint: Callable[[], Login], max_age: float = TOKEN_REUSE_SECONDS):
        self.mint, self.max_age = mint, max_age
        self._login, self._minted_at, self._lock = None, 0.0, threading.Lock()

    def __call__(self) -> Login:
        with self._lock:
            if self._login is None or time.monotonic() - self._minted_at >= self.max_age:
                self._login, self._minted_at = self.mint(), time.monotonic()
                password = self._login.password
                if isinstance(password, str) and len(password) >= MIN_SECRET_CHARS:  # as add_secrets() does
                    with _secrets_lock:
                        _minted.append(password)
                log.info("minted a database credential for %s at %s", self._login.user, self._login.host)
            return self._login


def _sdk(what: str, fix: str, fn, *args, **kwargs):
    """Call the SDK, turning its errors into a one-line LakebaseError that says what to fix; Unreachable when the
    SDK's retries (of 429s, 503s, connection errors) ran out, as that may pass."""
    error = LakebaseError
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        from databricks.sdk.errors import DatabricksError

        if isinstance(e, TimeoutError):  # the SDK's retries.py, with the last error as its cause
            error, cause = Unreachable, e.__cause__ or e
            message = (f"{what}: the Databricks API did not answer ({e}: "
                       f"{redact(' '.join(str(cause).split())).rstrip('.')} ({type(cause).__name__})); check that "
                       f"the workspace is up and reachable and not throttling this identity, then try again")
        elif isinstance(e, DatabricksError):
            message = f"{what}: {redact(' '.join(str(e).split())).rstrip('.')} ({type(e).__name__}); {fix}"
        else:  # our own bug: keep its traceback
            raise
    raise error(message)  # raised outside the except block, so the SDK error is not chained


def sdk_login(workspace, config: LakebaseConfig) -> Callable[[], Login]:
    """Mints Lakebase logins with the SDK, for a provisioned instance (host: its read_write_dns; token:
    database credentials) or an autoscaling endpoint (host: status.hosts.host; token: postgres credentials)."""
    kind, name = ("instance", config.instance) if config.instance else ("endpoint", config.endpoint)
    if kind == "endpoint" and not ENDPOINT_PATTERN.fullmatch(name):
        raise LakebaseError(f"LAKEBASE_ENDPOINT={name!r} must look like projects/P/branches/B/endpoints/E")
    what, fix = f"Lakebase {kind} {name!r}", f"check LAKEBASE_{kind.upper()} and that this identity may use it"
    user = [config.user]  # the current identity is looked up once, at the first mint

    def mint() -> Login:
        if config.instance:
            host = _sdk(what, fix, workspace.database.get_database_instance, name).read_write_dns
        else:
            status = _sdk(what, fix, workspace.postgres.get_endpoint, name).status
            host = status.hosts.host if status and status.hosts else None
        if not host:  # starting: a caller that retries Unreachable (the run's last step) waits for it
            raise Unreachable(f"{what} has no host yet: wait until it is running")
        if config.instance:
            token = _sdk(f"a credential for {what}", fix, workspace.database.generate_database_credential,
                         instance_names=[name], request_id=str(uuid.uuid4())).token
        else:
            token = _sdk(f"a credential for {what}", fix, workspace.postgres.generate_database_credential,
                         endpoint=name).token
        if not user[0]:
            user[0] = _sdk("the current identity", "check the Databricks auth", workspace.current_user.me).user_name
        return Login(host=host, user=user[0], password=token, dbname=config.database)
    return mint


def login_for(config: LakebaseConfig, workspace=None) -> CachedLogin | None:
    """The configured mode's (cached) login minting; None for a plain DSN. Raises on a bad configuration."""
    modes = [name for name, value in (("LAKEBASE_DSN", config.dsn), ("LAKEBASE_INSTANCE", config.instance),
                                      ("LAKEBASE_ENDPOINT", config.endpoint)) if value]
    if len(modes) > 1:
        raise LakebaseError(f"{' and '.join(modes)} are all set: keep only one way to reach the database")
    if not config.configured():
        raise LakebaseError("no database configured: set LAKEBASE_DSN (or PGHOST...), LAKEBASE_INSTANCE "
                            "or LAKEBASE_ENDPOINT")
    if not modes or config.dsn:
        try:
            add_secrets(psycopg.conninfo.conninfo_to_dict(config.dsn).get("password"))
        except psycopg.ProgrammingError:  # its message may quote a piece of the password
            raise LakebaseError("LAKEBASE_DSN is not a valid libpq connection string or URI") from None
        return None
    if workspace is None:
        from databricks.sdk import WorkspaceClient  # a slow import: only in the Lakebase modes

        workspace = WorkspaceClient()
    return CachedLogin(sdk_login(workspace, config))


# ------------------------------------------------------------------ connections

def _connect_kwargs(config: LakebaseConfig, login: Callable[[], Login] | None) -> dict:
    kwargs = {"autocommit": True, "connect_timeout": config.connect_timeout, "application_name": "async-agent",
              **KEEPALIVES}
    if login:
        got = login()
        kwargs.update(host=got.host, port=got.port, user=got.user, password=got.password, dbname=got.dbname,
                      sslmode=got.sslmode)
    return kwargs


def _set_bounds(conn, config: LakebaseConfig):
    """Give the new session its time limits (after login: not every proxy passes a startup `options` on)."""
    try:
        conn.execute("select set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false)",
                     [f"{round(seconds * 1000)}ms" for seconds in (config.statement_timeout, config.lock_timeout,
                                                                    config.idle_in_transaction_timeout)])
    except BaseException:
        conn.close()
        raise
    return conn


def connect(config: LakebaseConfig, workspace=None, *, login: Callable[[], Login] | None = None):
    """One autocommit psycopg.Connection, with the config's bounds; an unreachable server is retried for
    `config.retry_seconds`. `login` replaces the configured credential minting (default: `login_for`)."""
    login = login or login_for(config, workspace)
    deadline, delay = time.monotonic() + config.retry_seconds, 0.2
    while True:
        kwargs = _connect_kwargs(config, login)
        try:
            conn = psycopg.connect(config.dsn, **kwargs)
        except psycopg.OperationalError as e:  # keep only its text: the exception's pgconn holds the password
            message = redact(re.sub(r"^connection (failed|is bad): ", "", " ".join(str(e).split())))
        else:
            return _set_bounds(conn, config)
        answered = "FATAL:" in message and not re.search(r"starting up|shutting down|recovery", message)
        if answered or time.monotonic() + delay > deadline:
            break
        log.warning("database not reachable yet, retrying in %.1f s: %s", delay, message)
        time.sleep(delay)
        delay = min(delay * 2, 3.0)
    if not answered:
        raise Unreachable(f"cannot connect to Postgres: {message}; check that the server is up and reachable")
    fix = "check LAKEBASE_DSN or the PG* variables"
    if login:
        fix = f"check that role {kwargs['user']!r} exists there and may log in (LAKEBASE_USER picks another role)"
    raise LakebaseError(f"cannot connect to Postgres: {message}; {fix}")


class Pool(ConnectionPool):
    """A ConnectionPool whose PoolTimeout says why no connection came, and what to do: new connections failing
    (credentials refused, server down: the last failure's reason), or every connection busy."""
    _last_error: str | None = None  # why the last new connection failed; None once one succeeds
    bounds: LakebaseConfig | None = None  # the config whose time limits its sessions have (explain() names them)

    def _connect(self, timeout=None):
        try:
            conn = super()._connect(timeout)
        except Exception as e:
            self._last_error = redact(" ".join(str(e).split()))
            raise
        self._last_error = None
        return conn

    def getconn(self, timeout=None):
        try:
            return super().getconn(timeout)
        except PoolTimeout as e:
            why = self._last_error
            if why:
                raise PoolTimeout(f"new database connections fail: {why}. Check that Postgres (Lakebase) is up and "
                                  f"reachable and that its credentials are valid, then send the message again") from e
            raise PoolTimeout(f"all {self.max_size} database connections of this process stayed busy for "
                              f"{self.timeout if timeout is None else timeout:g} s. Send the message again in a "
                              f"moment") from e


def open_pool(config: LakebaseConfig, workspace=None, *, login: Callable[[], Login] | None = None, migrated=False,
              min_size=1, max_size=10, max_lifetime=MAX_LIFETIME_SECONDS, timeout=30.0) -> ConnectionPool:
    """A pool of autocommit connections: each new one logs in with a fresh enough token, each is checked
    when handed out (so dead ones after a server restart are replaced), each is recycled after max_lifetime.
    `migrated`: the schema's migrations are applied first."""
    login = login or login_for(config, workspace)
    with connect(config, login=login) as conn:  # fail now with a LakebaseError, rather than later with a PoolTimeout
        if migrated:
            migrate(conn)
    pool = Pool(config.dsn, kwargs=lambda: _connect_kwargs(config, login), min_size=min_size, max_size=max_size,
                max_lifetime=max_lifetime, timeout=timeout, name="lakebase", check=ConnectionPool.check_connection,
                configure=lambda conn: _set_bounds(conn, config), open=True)
    pool.bounds = config
    return pool


def connection_lost(e: BaseException) -> bool:
    """`e` says the connection itself is gone (a write in flight may or may not have been committed), not that
    the server refused a statement and rolled its transaction back."""
    return isinstance(e, psycopg.OperationalError) and not isinstance(e, PoolTimeout) and (
        e.sqlstate is None or e.sqlstate[:2] == "08" or e.sqlstate.startswith("57P"))  # 57P01: admin shutdown


def timed_out(e: BaseException) -> bool:
    """`e` is a statement the server cancelled at lock_timeout or statement_timeout."""
    return isinstance(e, psycopg.errors.LockNotAvailable) or (
        isinstance(e, psycopg.errors.QueryCanceled) and "statement timeout" in str(e))


def explain(e: BaseException, bounds: LakebaseConfig | None = None) -> str:
    """A database error for a person, on one line, without secrets; for a statement cancelled at one of the
    session's time limits (`bounds`: their values), which limit it hit and where to look."""
    def value(seconds):
        return f" ({seconds:g} s)" if bounds else ""

    if isinstance(e, psycopg.errors.LockNotAvailable):
        return (f"a statement waited longer than lock_timeout{value(bounds and bounds.lock_timeout)} for a lock "
                f"that another database session holds on the agent's tables, and was cancelled (pg_stat_activity "
                f"shows which session holds it)")
    if timed_out(e):
        return (f"a statement ran longer than statement_timeout{value(bounds and bounds.statement_timeout)} and "
                f"was cancelled: the database is overloaded, or a table is locked or very large")
    return " ".join(redact(str(e)).split()) or type(e).__name__


# ------------------------------------------------------------------ schema

MIGRATIONS = [
    (1, """
create table threads (thread_id text primary key, owner text, created_at timestamptz not null default now(),
                      updated_at timestamptz not null default now(), turns int not null default 0);
create index threads_updated_at on threads (updated_at);
create index threads_owner on threads (owner, updated_at);
create table thread_messages (thread_id text not null references threads on delete cascade, seq int not null,
                              turn int not null, message jsonb not null,
                              created_at timestamptz not null default now(), primary key (thread_id, seq))"""),
    (2, """
create table thread_runs (thread_id text not null references threads on delete cascade, run_id text not null,
                          idempotency_key text not null, request text not null,
                          created_at timestamptz not null default now(),
                          primary key (thread_id, run_id), unique (thread_id, idempotency_key))"""),
    (3, """
create table task_logs (run_id text not null, step int not null, status text not null check (status in
                            ('started', 'tool_call', 'tool_result', 'completed', 'failed', 'cancelled')),
                        payload jsonb not null, created_at timestamptz not null default now(),
                        primary key (run_id, step))"""),
    (4, """
create table thread_items (item_id text primary key, thread_id text not null references threads on delete cascade,
                           created_at timestamptz not null default now());
create index thread_items_thread on thread_items (thread_id)"""),
    (5, """
alter table thread_messages add column turn_key text;
create unique index thread_messages_turn_key on thread_messages (thread_id, turn_key);
alter table task_logs add column step_key text;
create unique index task_logs_step_key on task_logs (run_id, step_key);
create table run_reservations (thread_id text not null references threads on delete cascade, slot text not null,
                               idempotency_key text not null, created_at timestamptz not null default now(),
                               primary key (thread_id, slot))"""),
    (6, """
alter table thread_runs add column delivered_turn int"""),  # the turn that gave the user the run's outcome
]


def migrate(conn) -> list[int]:
    """Apply the migrations not applied yet, in order; returns their numbers. Safe to run concurrently."""
    applied = []
    with conn.transaction():
        conn.execute("select set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                     (MIGRATE_LOCK_TIMEOUT, MIGRATE_STATEMENT_TIMEOUT))
        conn.execute("select pg_advisory_xact_lock(%s::bigint)", (_LOCK_MIGRATE,))  # a second process waits here
        conn.execute("create table if not exists schema_migrations (version int primary key, "
                     "applied_at timestamptz not null default now())")
        done = {row[0] for row in conn.execute("select version from schema_migrations")}
        for version, statements in MIGRATIONS:
            if version not in done:
                conn.execute(statements)
                conn.execute("insert into schema_migrations (version) values (%s)", (version,))
                applied.append(version)
    if applied:
        log.info("applied migrations %s", applied)
    return applied


# ------------------------------------------------------------------ validation and sanitising

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, lone surrogates (a valid pair is one char in Python)


def check_id(value, what: str) -> str:
    """`value` if it is a valid thread or run id, else a ValueError saying the rule."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-128 letters, digits or _.:-, starting with a letter or "
                         f"digit")
    return value


def _clean(value):
    if isinstance(value, str):
        return UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return [_clean(v) for v in value] if isinstance(value, (list, tuple)) else value


def _storable(value, what: str) -> str:
    """The text to store: `value` itself if a str, else its JSON; unstorable characters become U+FFFD."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    # json.dumps writes a NUL as the escape \u0000 (which jsonb refuses too), and only a lone surrogate as itself
    if not UNSTORABLE.search(text) and (isinstance(value, str) or "\\u0000" not in text):
        return text
    log.warning("%s: replaced NUL / lone surrogate characters with U+FFFD to store it", what)
    log.debug("%s before sanitising: %r", what, value)
    return _clean(value) if isinstance(value, str) else json.dumps(_clean(value), ensure_ascii=False)


# ------------------------------------------------------------------ threads

class UserIdRequired(PermissionError):
    """The thread was started with a user id, and the request has none."""


def claim_thread(conn, thread_id: str, user: str | None) -> tuple[str | None, int]:
    """Decide who owns the thread, once, before a turn does anything: a new thread is created at once, owned by
    `user` (None: anonymous, for good). Returns (its owner, its turns so far); PermissionError if `user` may not
    continue it: an anonymous thread is anyone's who holds its id, an owned one its owner's alone."""
    check_id(thread_id, "thread id")
    for _ in range(3):  # another claim creating it, or a delete (delete_thread, prune), between the two: look again
        row = (conn.execute("select owner, turns from threads where thread_id = %s", (thread_id,)).fetchone()
               or conn.execute("insert into threads (thread_id, owner) values (%s, %s) on conflict (thread_id) "
                               "do nothing returning owner, turns", (thread_id, user)).fetchone())
        if row:
            break
    else:
        raise RuntimeError(f"thread {thread_id} was deleted while it was being claimed, three times")
    owner, turns = row
    if owner is not None and owner != user:
        if user is None:
            raise UserIdRequired(f"thread {thread_id} was started with a user id, so a user id is required "
                                 f"to continue it")
        raise PermissionError(f"thread {thread_id} belongs to someone else")
    return owner, turns


def _claim_thread(conn, thread_id: str, owner: str | None) -> int:
    """In a transaction: create the thread if new, lock its row, hold to the owner `claim_thread` decided (None:
    anonymous); returns its turns so far. One statement when the thread exists, as claim_thread made sure."""
    lock = "select owner, turns from threads where thread_id = %s for update"
    row = conn.execute(lock, (thread_id,)).fetchone()
    if row is None:  # deleted since claim_thread (delete_thread, prune), or never claimed: create it, then lock it
        conn.execute("insert into threads (thread_id, owner) values (%s, %s) on conflict (thread_id) do nothing",
                     (thread_id, owner))
        row = conn.execute(lock, (thread_id,)).fetchone()
    stored, turns = row
    if stored != owner:
        raise PermissionError(f"thread {thread_id} belongs to another user")
    return turns


def append_turn(conn, thread_id: str, messages: list[dict], *, owner: str | None = None, item_ids=(),
                seed: list[dict] = (), key: str | None = None, delivered=()) -> int:
    """Append one turn's messages atomically, after any turn appended concurrently; returns the turn number.
    `owner`: the thread's owner as `claim_thread` decided it (None: anonymous); another stored owner is refused.
    `item_ids`: the ids of the output items the turn issued, which find the thread again (`thread_of_items`).
    `seed`: the client's earlier messages, stored before them only if this append creates the thread's first turn.
    `key`: chosen by the caller before the first try; a turn already stored under it is not stored again (its
    number is returned), so retrying after a lost reply is safe.
    `delivered`: run ids whose outcome the turn gave the user, marked delivered in the same transaction."""
    check_id(thread_id, "thread id")
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in [*seed, *messages]):
        raise ValueError("a turn is a non-empty list of chat messages (dicts with a 'role')")
    rows = [_storable(m, f"thread {thread_id} message") for m in messages]
    with conn.transaction():
        turns = _claim_thread(conn, thread_id, owner)  # the row lock serialises turns on this thread
        stored, last = conn.execute(  # a turn already stored under the key (none without a key), the last seq
            "select (select turn from thread_messages where thread_id = %s and turn_key = %s), "
            "(select coalesce(max(seq), 0) from thread_messages where thread_id = %s)",
            (thread_id, key, thread_id)).fetchone()
        if stored is not None:
            log.info("thread %s: turn %d was already stored under this key", thread_id, stored)
            return stored
        if turns == 0:
            rows = [_storable(m, f"thread {thread_id} message") for m in seed] + rows
        with conn.cursor() as cur:
            cur.executemany("insert into thread_messages (thread_id, seq, turn, message, turn_key) "
                            "values (%s, %s, %s, %s::jsonb, %s)",
                            [(thread_id, last + i, turns + 1, row, key if i == 1 else None)
                             for i, row in enumerate(rows, 1)])
            cur.executemany("insert into thread_items (item_id, thread_id) values (%s, %s) on conflict do nothing",
                            [(check_id(item_id, "item id"), thread_id) for item_id in item_ids])
        conn.execute("update threads set turns = %s, updated_at = now() where thread_id = %s",
                     (turns + 1, thread_id))
        if delivered:
            conn.execute("update thread_runs set delivered_turn = %s where thread_id = %s and run_id = any(%s) "
                         "and delivered_turn is null", (turns + 1, thread_id, list(delivered)))
    log.debug("thread %s turn %d: %s", thread_id, turns + 1, rows)
    return turns + 1


def load_messages(conn, thread_id: str, *, last: int | None = None) -> list[dict]:
    """The thread's messages, oldest first; `last`: only the last N (primary.py cuts them to a window the model
    can take)."""
    check_id(thread_id, "thread id")
    if last is None:
        cur = conn.execute("select message from thread_messages where thread_id = %s order by seq", (thread_id,))
        return [row[0] for row in cur]
    if not isinstance(last, int) or last < 0:
        raise ValueError(f"last must be an int >= 0, got {last!r}")
    cur = conn.execute("select message from (select seq, message from thread_messages where thread_id = %s "
                       "order by seq desc limit %s) as window_ order by seq", (thread_id, last))
    return [row[0] for row in cur]


def load_window(conn, thread_id: str, last: int) -> list[dict]:
    """The thread's last `last` messages, oldest first; when none of them is a user message (a turn of many tool
    calls), preceded by the latest user message before them, so the model always sees what was asked."""
    messages = load_messages(conn, thread_id, last=last)
    if last == 0 or any(m.get("role") == "user" for m in messages):
        return messages
    cur = conn.execute("select message from thread_messages where thread_id = %s and message->>'role' = 'user' "
                       "and seq <= (select max(seq) from thread_messages where thread_id = %s) - %s "
                       "order by seq desc limit 1", (thread_id, thread_id, last))
    return [row[0] for row in cur] + messages


def thread_turns(conn, thread_id: str) -> int:
    """Completed turns of the thread so far (0 for an unknown thread)."""
    cur = conn.execute("select turns from threads where thread_id = %s", (check_id(thread_id, "thread id"),))
    return (cur.fetchone() or (0,))[0]


def thread_owner(conn, thread_id: str):
    """The thread's owner: a user id, None for an anonymous thread, or NO_THREAD if there is no such thread."""
    cur = conn.execute("select owner from threads where thread_id = %s", (check_id(thread_id, "thread id"),))
    return (cur.fetchone() or (NO_THREAD,))[0]


def thread_of_items(conn, item_ids: list[str], user: str | None) -> str | None:
    """The thread that issued the latest of `item_ids` (output item ids) and that `user` may continue (an anonymous
    thread, or one of `user`'s), or None."""
    if not item_ids:
        return None
    rows = conn.execute("select i.item_id, i.thread_id from thread_items i join threads t using (thread_id) "
                        "where i.item_id = any(%s) and (t.owner is null or t.owner = %s)", (list(item_ids), user))
    found = dict(rows.fetchall())
    return next((found[i] for i in reversed(item_ids) if i in found), None)


def list_threads(conn, *, owner: str | None = None, limit: int = 50) -> list[dict]:
    """Threads {thread_id, owner, turns, created_at, updated_at}, latest updated first; only `owner`'s if given."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select thread_id, owner, turns, created_at, updated_at from threads "
                           "where %s::text is null or owner = %s order by updated_at desc limit %s",
                           (owner, owner, limit)).fetchall()


# Messages and runs go by cascade; the runs' step logs (keyed by run id alone) are deleted alongside.
_DELETE_THREADS = """with gone as (delete from threads where {} returning thread_id),
  logs as (delete from task_logs where run_id in (select run_id from thread_runs
                                                  where thread_id in (select thread_id from gone)))
select count(*) from gone"""


def delete_thread(conn, thread_id: str) -> bool:
    """Delete a thread with its messages, runs and their step logs; False if there was no such thread."""
    query = sql.SQL(_DELETE_THREADS).format(sql.SQL("thread_id = %s"))
    return conn.execute(query, (check_id(thread_id, "thread id"),)).fetchone()[0] == 1


def prune_threads(conn, older_than: timedelta) -> int:
    """Delete the threads not updated for `older_than`, as delete_thread does; returns how many. A thread with a
    run that has not ended (no final step, and a sign of life within RUN_SILENCE) is kept, so a run's step log
    is never cut short: its step numbers only grow."""
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise ValueError(f"older_than must be a positive timedelta, got {older_than!r}")
    query = sql.SQL(_DELETE_THREADS).format(sql.SQL(_PRUNABLE))
    return conn.execute(query, (older_than, list(FINAL_STATUSES), RUN_SILENCE)).fetchone()[0]


_PRUNABLE = """updated_at < now() - %s and not exists (
  select from thread_runs r where r.thread_id = threads.thread_id
    and not exists (select from task_logs l where l.run_id = r.run_id and l.status = any(%s))
    and greatest(r.created_at, (select max(l.created_at) from task_logs l where l.run_id = r.run_id)) > now() - %s)"""


# ------------------------------------------------------------------ runs

_RUN_COLUMNS = "thread_id, run_id, idempotency_key, request, created_at"


def record_run(conn, thread_id: str, run_id: str, idempotency_key: str, request: str, *,
               owner: str | None = None) -> dict:
    """Record that the thread started job run `run_id` (creating the thread if new; `owner` as in append_turn).
    Returns the run holding `idempotency_key`: this one, or an earlier one (then the caller started a duplicate:
    cancel it)."""
    check_id(thread_id, "thread id")
    check_id(run_id, "run id")
    if not isinstance(idempotency_key, str) or not idempotency_key:
        raise ValueError("idempotency_key must be a non-empty string")
    request = _storable(request, f"run {run_id} request")
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        _claim_thread(conn, thread_id, owner)
        conn.execute("update threads set updated_at = now() where thread_id = %s", (thread_id,))
        new = cur.execute(f"insert into thread_runs (thread_id, run_id, idempotency_key, request) values "
                          f"(%s, %s, %s, %s) on conflict do nothing returning {_RUN_COLUMNS}",
                          (thread_id, run_id, idempotency_key, request)).fetchone()
    held = new or find_run(conn, thread_id, idempotency_key=idempotency_key)
    if held is None:
        raise ValueError(f"run {run_id} is already recorded for thread {thread_id} with another idempotency key")
    return held


def reserve_run(conn, thread_id: str, slot: str, idempotency_key: str, *, owner: str | None = None) -> str:
    """Before starting a job run: reserve `idempotency_key` for the run that `slot` (e.g. a turn's n-th start)
    asks for, creating the thread if new. Returns the key reserved for the slot: this one, or the one an
    earlier try reserved, which the caller must use instead so that a retry starts no second run."""
    check_id(thread_id, "thread id")
    if not all(isinstance(value, str) and value for value in (slot, idempotency_key)):
        raise ValueError("slot and idempotency_key must be non-empty strings")
    with conn.transaction():
        _claim_thread(conn, thread_id, owner)
        conn.execute("insert into run_reservations (thread_id, slot, idempotency_key) values (%s, %s, %s) "
                     "on conflict do nothing", (thread_id, slot, idempotency_key))
        return conn.execute("select idempotency_key from run_reservations where thread_id = %s and slot = %s",
                            (thread_id, slot)).fetchone()[0]


def find_run(conn, thread_id: str, *, run_id: str | None = None, idempotency_key: str | None = None) -> dict | None:
    """The thread's run with this run id or this idempotency key (give exactly one), or None."""
    check_id(thread_id, "thread id")
    if (run_id is None) == (idempotency_key is None):
        raise ValueError("find_run needs exactly one of run_id or idempotency_key")
    column = "run_id" if run_id is not None else "idempotency_key"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"select {_RUN_COLUMNS} from thread_runs where thread_id = %s and {column} = %s",
                           (thread_id, run_id if run_id is not None else idempotency_key)).fetchone()


def list_runs(conn, thread_id: str) -> list[dict]:
    """The thread's runs {thread_id, run_id, idempotency_key, request, created_at}, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"select {_RUN_COLUMNS} from thread_runs where thread_id = %s order by created_at, "
                           f"run_id", (check_id(thread_id, "thread id"),)).fetchall()


def undelivered_runs(conn, thread_id: str, *, limit: int, skip=()) -> list[str]:
    """Run ids of the thread's runs whose outcome no turn has given the user yet, oldest first, at most `limit`,
    leaving out those in `skip`."""
    cur = conn.execute("select run_id from thread_runs where thread_id = %s and delivered_turn is null and "
                       "not run_id = any(%s) order by created_at, run_id limit %s",
                       (check_id(thread_id, "thread id"), list(skip), limit))
    return [row[0] for row in cur]


# ------------------------------------------------------------------ step log

def log_step(conn, run_id: str, status: str, payload: dict, *, key: str | None = None) -> int:
    """Append a step to the run's log, committed at once so pollers see it; returns its number (1, 2, ...).
    `key`: chosen by the caller before the first try; a step already logged under it is not logged again (its
    number is returned), so retrying after a lost reply is safe. A run's log is closed once it has a final step
    (completed, failed, cancelled): RunEnded, nothing written."""
    check_id(run_id, "run id")
    if status not in STATUSES:
        raise ValueError(f"invalid step status {status!r}: one of {', '.join(STATUSES)}")
    if not isinstance(payload, dict):
        raise ValueError(f"a step payload is a dict, got {type(payload).__name__}")
    text = _storable(payload, f"run {run_id} {status} payload")
    with conn.transaction():
        # writers of one run take turns, so max(step) + 1 is unique (the primary key would refuse a duplicate)
        conn.execute("select pg_advisory_xact_lock(%s::int, hashtext(%s))", (_LOCK_RUN, run_id))
        logged = key is not None and conn.execute("select step from task_logs where run_id = %s and step_key = %s",
                                                  (run_id, key)).fetchone()
        if logged:
            log.info("run %s: step %d was already logged under this key", run_id, logged[0])
            return logged[0]
        ended = conn.execute("select step, status from task_logs where run_id = %s and status = any(%s) limit 1",
                             (run_id, list(FINAL_STATUSES))).fetchone()
        if ended:  # checked under the run's lock: of two writers ending one run, the second is refused
            raise RunEnded(run_id, ended[1], ended[0])
        step = conn.execute("insert into task_logs (run_id, step, status, payload, step_key) select %s, "
                            "coalesce(max(step), 0) + 1, %s, %s::jsonb, %s from task_logs where run_id = %s "
                            "returning step", (run_id, status, text, key, run_id)).fetchone()[0]
    log.debug("run %s step %d %s: %s", run_id, step, status, text)
    return step


def read_steps(conn, run_id: str, *, after: int = 0, limit: int = 500) -> list[dict]:
    """The run's steps numbered above `after`, in order, at most `limit`: {step, status, payload, created_at}."""
    check_id(run_id, "run id")
    if not isinstance(after, int) or after < 0 or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"after must be an int >= 0 and limit an int >= 1, got {after!r} and {limit!r}")
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select step, status, payload, created_at from task_logs where run_id = %s "
                           "and step > %s order by step limit %s", (run_id, after, limit)).fetchall()


def run_progress(conn, run_id: str, *, recent: int = 5) -> dict:
    """How far a run has got, without reading its whole log: {"steps": how many, "answered": how many tool results
    were not errors, "recent": the last `recent` steps in order (without Genie's full result, `detail`), "final": its
    completed/failed/cancelled step or None}."""
    check_id(run_id, "run id")
    with conn.cursor(row_factory=dict_row) as cur:
        counts = cur.execute("select count(*) as n, count(*) filter (where status = 'tool_result' and "
                             "payload->>'error' = 'false') as answered from task_logs where run_id = %s",
                             (run_id,)).fetchone()
        last = cur.execute("select step, status, payload - 'detail' as payload, created_at from task_logs "
                           "where run_id = %s order by step desc limit %s", (run_id, recent)).fetchall()
        final = cur.execute("select step, status, payload, created_at from task_logs where run_id = %s and status "
                            "= any(%s) order by step desc limit 1", (run_id, list(FINAL_STATUSES))).fetchone()
    return {"steps": counts["n"], "answered": counts["answered"], "recent": last[::-1], "final": final}
