"""Shared fixtures: a real throwaway Postgres and a scripted chat model served over HTTP."""
import os
import sys

import pg_fixture
import psycopg
import pytest
from pg_fixture import session_server
from psycopg import sql

# The SDK reads any DATABRICKS_* variable and ~/.databrickscfg: keep the developer's own workspace out of tests.
for _key in [k for k in os.environ if k.startswith("DATABRICKS_")]:
    del os.environ[_key]
os.environ["DATABRICKS_CONFIG_FILE"] = os.devnull


@pytest.fixture(scope="session")
def pg_server():
    server = session_server()
    yield server
    if server.handle is not None:
        server.handle.cleanup()


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh, empty database on the session's server."""
    dsn = pg_server.fresh_database()
    yield dsn
    pg_server.drop_database(dsn)


@pytest.fixture(scope="module")
def own_server():
    """A server of the test module's own, with pg_fixture.PASSWORD_ROLE logging in by password only."""
    server = pg_fixture.start_own_server()
    yield server
    server.handle.cleanup()


@pytest.fixture
def own(own_server):
    """The own server, running (even if an earlier test failed while it was stopped): tests may stop and start it."""
    pg_fixture.start(own_server)
    return own_server


@pytest.fixture
def own_dsn(own):
    """A fresh database on the own server."""
    dsn = own.fresh_database()
    yield dsn
    pg_fixture.start(own)
    own.drop_database(dsn)


@pytest.fixture
def lakebase_emulator(own):
    """(the local workspace emulator, a WorkspaceClient on it): its Lakebase instance db1 and endpoint
    pg_fixture.LAKEBASE_ENDPOINT are the own server, and every token it mints (`emulator.minted`) becomes the
    password of its user's role, valid for an hour, as in Lakebase."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config

    import localws
    import localws.emulator

    host, user = psycopg.conninfo.conninfo_to_dict(own.base_dsn)["host"], localws.emulator.DEFAULT_USER
    with psycopg.connect(own.base_dsn, autocommit=True) as admin:
        if not admin.execute("select 1 from pg_roles where rolname = %s", (user,)).fetchone():
            admin.execute(sql.SQL("create role {} login").format(sql.Identifier(user)))
        if not admin.execute("select 1 from pg_database where datname = 'databricks_postgres'").fetchone():
            admin.execute("create database databricks_postgres")
    pg_fixture.allow_password_login(own, user)
    minted = []

    def on_credential(user, token, expires_at):
        with psycopg.connect(own.base_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("alter role {} password {} valid until {}").format(
                sql.Identifier(user), sql.Literal(token), sql.Literal(expires_at.isoformat())))
        minted.append(token)

    with localws.Emulator(database_instances={"db1": host}, postgres_endpoints={pg_fixture.LAKEBASE_ENDPOINT: host},
                          on_credential=on_credential) as emu:
        emu.minted = minted
        yield emu, WorkspaceClient(config=Config(host=emu.url, token=emu.token, auth_type="pat",
                                                 retry_timeout_seconds=5))


@pytest.fixture
def scripted_model():
    """A scripted chat-completions server on 127.0.0.1; fails the test if over- or under-consumed."""
    from scripted import ScriptedModel

    model = ScriptedModel()
    model.start()
    yield model
    model.stop()
    model.check()


def pytest_terminal_summary(terminalreporter):
    """The reliability suite's tally (tests/test_reliability.py): cases run, faults injected, what was lost."""
    module = next((m for m in list(sys.modules.values())
                   if (getattr(m, "__file__", None) or "").endswith("test_reliability.py")), None)
    outcomes = {}  # nodeid -> passed?, over its setup, call and teardown reports
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "test_reliability.py::" in getattr(report, "nodeid", ""):
                outcomes[report.nodeid] = outcomes.get(report.nodeid, True) and report.outcome == "passed"
    if module is None or not outcomes:
        return
    tally, failed = module.TALLY, sum(not ok for ok in outcomes.values())
    terminalreporter.write_sep("-", "reliability and security")
    terminalreporter.write_line(
        f"{len(outcomes)} cases run ({failed} failed), {tally['faults']} faults injected; lost: "
        f"{tally['lost_turns']} turns (missing or half-saved), {tally['lost_steps']} steps")
