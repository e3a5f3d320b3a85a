"""Shared fixtures: a real throwaway Postgres and a scripted chat model served over HTTP."""
import os

import pytest

from pg_fixture import session_server

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


@pytest.fixture
def scripted_model():
    """A scripted chat-completions server on 127.0.0.1; fails the test if over- or under-consumed."""
    from scripted import ScriptedModel

    model = ScriptedModel()
    model.start()
    yield model
    model.stop()
    model.check()
