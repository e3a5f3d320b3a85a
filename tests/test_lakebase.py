"""lakebase.py against real Postgres: schema, threads, runs, step log, sanitising, connecting (errors, restarts,
short-lived passwords) and the instance/endpoint modes through the real SDK and the local emulator."""
import json
import logging
import secrets
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pg_fixture
import psycopg
import pytest
from helpers import ROOT, assistant, refuse_inserts, user, workspace

import lakebase
from lakebase import LakebaseConfig, LakebaseError, Login


@pytest.fixture
def conn(pg_dsn):
    with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as conn:
        lakebase.migrate(conn)
        yield conn


def run_threads(target, args_list, timeout=60):
    """Run target(*args) in threads, all at once; re-raise the first error; bounded."""
    errors, start = [], threading.Barrier(len(args_list))

    def body(*args):
        try:
            start.wait(timeout=10)
            target(*args)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=args, daemon=True) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


# ------------------------------------------------------------------ schema

def test_migrate_applies_once_in_order(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        versions = [version for version, _ in lakebase.MIGRATIONS]
        assert lakebase.migrate(conn) == versions == sorted(versions)
        assert lakebase.migrate(conn) == []
        assert [r[0] for r in conn.execute("select version from schema_migrations order by version")] == versions
        tables = {r[0] for r in conn.execute("select tablename from pg_tables where schemaname = 'public'")}
        assert {"schema_migrations", "threads", "thread_messages", "thread_runs", "task_logs", "thread_items",
                "run_reservations"} <= tables


def test_migrate_from_two_processes_at_once(pg_dsn):
    child = ("import json, sys, psycopg, lakebase; "
             "print(json.dumps(lakebase.migrate(psycopg.connect(sys.argv[1], autocommit=True))))")
    with psycopg.connect(pg_dsn, autocommit=True) as holder:
        # hold the migration lock so both children are surely waiting on it, then let them race
        holder.execute("select pg_advisory_lock(%s::bigint)", (lakebase._LOCK_MIGRATE,))
        procs = [subprocess.Popen([sys.executable, "-c", child, pg_dsn], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.monotonic() + 30
        while holder.execute("select count(*) from pg_locks where locktype = 'advisory' and not granted"
                             ).fetchone()[0] < 2:
            assert time.monotonic() < deadline, "the children never reached the lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        holder.execute("select pg_advisory_unlock(%s::bigint)", (lakebase._LOCK_MIGRATE,))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    assert sorted(results) == [[], [version for version, _ in lakebase.MIGRATIONS]]


# ------------------------------------------------------------------ threads

def test_append_and_load_a_thread(conn):
    assert lakebase.thread_turns(conn, "t1") == 0
    assert lakebase.load_messages(conn, "t1") == []
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "start_run", "arguments": '{"q": "x"}'}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "run 42 started"}
    assert lakebase.append_turn(conn, "t1", [user("hi"), assistant("hello")]) == 1
    assert lakebase.append_turn(conn, "t1", [user("revenue?"), call, result, assistant("started run 42")]) == 2
    assert lakebase.append_turn(conn, "other", [user("elsewhere")]) == 1
    assert lakebase.load_messages(conn, "t1") == [user("hi"), assistant("hello"), user("revenue?"), call, result,
                                                  assistant("started run 42")]
    assert lakebase.thread_turns(conn, "t1") == 2
    assert conn.execute("select seq, turn from thread_messages where thread_id = 't1' order by seq").fetchall() == [
        (1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)]


def test_the_last_messages_are_the_last_n_in_order(conn):
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
    lakebase.append_turn(conn, "t", [user("one"), assistant("1")])
    lakebase.append_turn(conn, "t", [user("two"), call, result, assistant("2")])
    assert lakebase.load_messages(conn, "t", last=3) == [call, result, assistant("2")]
    assert lakebase.load_messages(conn, "t", last=2) == [result, assistant("2")]  # primary.py cuts the window
    assert lakebase.load_messages(conn, "t", last=100) == lakebase.load_messages(conn, "t")
    assert lakebase.load_messages(conn, "t", last=0) == []


def test_a_turn_writes_only_its_own_rows_and_storage_stays_near_the_raw_size(conn):
    answer = {"role": "assistant", "content": "The revenue by region was: " + ", ".join(
        f"region {i}: {i * 1234.5:.2f}" for i in range(40))}
    raw = 0
    for turn in range(1, 401):
        messages = [user(f"question number {turn}: what about region {turn % 40}?"), answer]
        raw += sum(len(json.dumps(m)) for m in messages)
        assert lakebase.append_turn(conn, "long", messages) == turn
        if turn == 1:
            first = conn.execute("select ctid, xmin::text from thread_messages where thread_id = 'long'").fetchall()
    # the first turn's rows were never rewritten by the 399 turns after it
    assert conn.execute("select ctid, xmin::text from thread_messages where thread_id = 'long' and turn = 1"
                        ).fetchall() == first
    assert conn.execute("select count(*) from thread_messages").fetchone()[0] == 800
    size = conn.execute("select pg_total_relation_size('thread_messages')").fetchone()[0]
    assert size < 2 * raw, (size, raw)  # the checkpointer this replaces stored ~100x more (1.4x measured)


def test_concurrent_turns_on_one_thread_stay_whole(pg_dsn, conn):
    writers, turns, parts = 6, 25, 3

    def write(writer):
        with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as own:
            for t in range(turns):
                lakebase.append_turn(own, "busy", [user(f"{writer}/{t}/{p}") for p in range(parts)])

    run_threads(write, [(w,) for w in range(writers)])
    rows = conn.execute("select seq, turn, message->>'content' from thread_messages where thread_id = 'busy' "
                        "order by seq").fetchall()
    assert [r[0] for r in rows] == list(range(1, writers * turns * parts + 1))  # none lost, no gaps
    by_turn = {}
    for _, turn, content in rows:
        by_turn.setdefault(turn, []).append(content.split("/"))
    assert sorted(by_turn) == list(range(1, writers * turns + 1))
    for turn, contents in by_turn.items():  # each turn: one writer's messages, whole and in order
        assert len({(w, t) for w, t, _ in contents}) == 1 and [p for *_, p in contents] == ["0", "1", "2"], turn
    for w in range(writers):  # each writer's turns in the order it wrote them
        mine = [int(c[0][1]) for _, c in sorted(by_turn.items()) if c[0][0] == str(w)]
        assert mine == list(range(turns))
    assert lakebase.thread_turns(conn, "busy") == writers * turns


def test_thread_owner_is_enforced(conn):
    assert lakebase.thread_owner(conn, "t") is lakebase.NO_THREAD
    lakebase.append_turn(conn, "t", [user("mine")], owner="alice")
    lakebase.append_turn(conn, "anon", [user("nobody's")])
    assert lakebase.thread_owner(conn, "t") == "alice"
    assert lakebase.thread_owner(conn, "anon") is None
    with pytest.raises(PermissionError, match="another user"):
        lakebase.append_turn(conn, "t", [user("forged")], owner="mallory")
    with pytest.raises(PermissionError):
        lakebase.append_turn(conn, "anon", [user("claim")], owner="mallory")
    with pytest.raises(PermissionError):
        lakebase.record_run(conn, "t", "9", "k", "forged", owner="mallory")
    assert lakebase.append_turn(conn, "t", [user("again")], owner="alice") == 2
    assert lakebase.load_messages(conn, "t") == [user("mine"), user("again")]
    assert lakebase.list_runs(conn, "t") == []


def test_claim_thread_decides_the_owner_once(conn):
    assert lakebase.claim_thread(conn, "anon", None) == (None, 0)  # created now, anonymous for good
    assert lakebase.claim_thread(conn, "anon", "bob") == (None, 0)
    lakebase.append_turn(conn, "anon", [user("by bob")], owner=None)
    assert lakebase.claim_thread(conn, "anon", None) == (None, 1)
    assert lakebase.claim_thread(conn, "t", "alice") == ("alice", 0)
    with pytest.raises(lakebase.UserIdRequired, match="thread t was started with a user id, so a user id is "
                                                      "required to continue it"):
        lakebase.claim_thread(conn, "t", None)
    with pytest.raises(PermissionError, match="thread t belongs to someone else"):
        lakebase.claim_thread(conn, "t", "mallory")
    with pytest.raises(PermissionError):  # a write holds to the decided owner, anonymous included
        lakebase.append_turn(conn, "t", [user("as if anonymous")], owner=None)
    with pytest.raises(PermissionError):
        lakebase.record_run(conn, "anon", "7", "k", "as if bob's", owner="bob")
    assert [lakebase.thread_owner(conn, t) for t in ("anon", "t")] == [None, "alice"]


def test_item_ids_find_the_thread_that_issued_them_for_who_may_continue_it(conn):
    lakebase.append_turn(conn, "anon", [user("hi"), assistant("hello")], item_ids=["msg_a1"])
    lakebase.append_turn(conn, "mine", [user("hi"), assistant("hello")], owner="alice", item_ids=["msg_b1", "fc_b2"])
    lakebase.append_turn(conn, "mine", [user("more")], owner="alice", item_ids=["msg_b3"])
    assert lakebase.thread_of_items(conn, ["msg_a1"], None) == lakebase.thread_of_items(conn, ["msg_a1"], "x") == "anon"
    assert lakebase.thread_of_items(conn, ["fc_b2", "msg_zz"], "alice") == "mine"
    assert lakebase.thread_of_items(conn, ["msg_b1", "msg_a1"], "alice") == "anon"  # the latest known id decides
    assert lakebase.thread_of_items(conn, ["msg_b1"], None) is None  # not for anyone but alice
    assert lakebase.thread_of_items(conn, ["msg_b1"], "mallory") is None
    assert lakebase.thread_of_items(conn, ["msg_zz"], "alice") is lakebase.thread_of_items(conn, [], None) is None
    lakebase.delete_thread(conn, "mine")
    assert conn.execute("select count(*) from thread_items").fetchone()[0] == 1


def test_concurrent_claims_of_a_new_thread_have_one_winner(pg_dsn, conn):
    won, refused = [], []

    def claim(name):
        with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as own:
            try:
                won.append((name, lakebase.claim_thread(own, "contested", name)))
            except PermissionError:
                refused.append(name)

    run_threads(claim, [(f"user{i}",) for i in range(6)])  # all at once, behind a barrier
    assert len(won) == 1 and len(refused) == 5
    assert won[0][1] == (won[0][0], 0) and lakebase.thread_owner(conn, "contested") == won[0][0]


def test_a_failed_turn_leaves_no_trace(conn):
    with pytest.raises(TypeError):  # not JSON-serialisable: found before anything is written
        lakebase.append_turn(conn, "t", [user("ok"), {"role": "user", "content": object()}])
    assert lakebase.thread_owner(conn, "t") is lakebase.NO_THREAD


# ------------------------------------------------------------------ runs

def test_runs_and_idempotency_keys(conn):
    first = lakebase.record_run(conn, "t", "101", "key-a", "revenue by region", owner="alice")
    assert (first["run_id"], first["idempotency_key"], first["request"]) == ("101", "key-a", "revenue by region")
    assert lakebase.thread_owner(conn, "t") == "alice"  # recording a run creates the thread
    lakebase.record_run(conn, "t", "102", "key-b", "margin by product", owner="alice")
    # the same key again (a retried request that started a duplicate job): the earlier run wins
    assert lakebase.record_run(conn, "t", "103", "key-a", "revenue by region", owner="alice") == first
    assert lakebase.record_run(conn, "t", "101", "key-a", "revenue by region", owner="alice") == first
    with pytest.raises(ValueError, match="another idempotency key"):
        lakebase.record_run(conn, "t", "101", "key-c", "x", owner="alice")
    assert lakebase.find_run(conn, "t", run_id="101") == first
    assert lakebase.find_run(conn, "t", idempotency_key="key-b")["run_id"] == "102"
    assert lakebase.find_run(conn, "t", run_id="103") is None
    assert lakebase.find_run(conn, "other", run_id="101") is None
    assert [r["run_id"] for r in lakebase.list_runs(conn, "t")] == ["101", "102"]
    with pytest.raises(psycopg.errors.UniqueViolation):  # the schema itself refuses a second key holder
        conn.execute("insert into thread_runs (thread_id, run_id, idempotency_key, request) "
                     "values ('t', '104', 'key-b', 'x')")
    with pytest.raises(ValueError, match="exactly one"):
        lakebase.find_run(conn, "t")


# ------------------------------------------------------------------ step log

def test_log_steps_and_read_them_with_a_cursor(pg_dsn, conn):
    assert lakebase.log_step(conn, "777", "started", {"request": "q", "thread_id": None}) == 1
    assert lakebase.log_step(conn, "777", "tool_call", {"call_id": "c", "name": "query_genie", "arguments": {}}) == 2
    assert lakebase.log_step(conn, "other", "started", {"request": "r", "thread_id": "t"}) == 1
    assert lakebase.log_step(conn, "777", "completed", {"answer": "42"}) == 3
    with psycopg.connect(pg_dsn, autocommit=True) as poller:  # committed at once: another session sees it
        steps = lakebase.read_steps(poller, "777")
    assert [(s["step"], s["status"]) for s in steps] == [(1, "started"), (2, "tool_call"), (3, "completed")]
    assert steps[2]["payload"] == {"answer": "42"} and steps[0]["created_at"] <= steps[2]["created_at"]
    assert [s["step"] for s in lakebase.read_steps(conn, "777", after=1)] == [2, 3]
    assert [s["step"] for s in lakebase.read_steps(conn, "777", after=1, limit=1)] == [2]
    assert lakebase.read_steps(conn, "777", after=3) == []
    plan = " ".join(r[0] for r in conn.execute(
        "explain select * from task_logs where run_id = '777' and step > 1 order by step limit 10"))
    assert "task_logs_pkey" in plan


def test_a_run_is_delivered_by_the_turn_that_told_it_and_only_once(conn):
    for run_id in ("1", "3", "5"):
        lakebase.record_run(conn, "t-told", run_id, f"k{run_id}", "q")
    assert lakebase.undelivered_runs(conn, "t-told", limit=2) == ["1", "3"]  # oldest first, bounded
    assert lakebase.undelivered_runs(conn, "t-told", limit=5, skip=["3"]) == ["1", "5"]
    assert lakebase.append_turn(conn, "t-told", [user("thanks")], delivered=["1", "3"]) == 1
    assert lakebase.append_turn(conn, "t-told", [user("ok")], delivered=["3"]) == 2  # told again: still turn 1's
    assert lakebase.undelivered_runs(conn, "t-told", limit=5) == ["5"]
    assert dict(conn.execute("select run_id, delivered_turn from thread_runs").fetchall()) == {
        "1": 1, "3": 1, "5": None}
    refuse_inserts(conn, "thread_messages", "disk full")
    with pytest.raises(psycopg.Error, match="disk full"):  # a turn that is not stored delivers nothing
        lakebase.append_turn(conn, "t-told", [user("and?")], delivered=["5"])
    assert lakebase.undelivered_runs(conn, "t-told", limit=5) == ["5"]


def test_concurrent_writers_of_one_run_get_unique_steps(pg_dsn, conn):
    def write(writer):
        with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as own:
            for i in range(30):
                lakebase.log_step(own, "shared", "tool_result", {"writer": writer, "i": i})

    run_threads(write, [(w,) for w in range(4)])
    steps = lakebase.read_steps(conn, "shared", limit=1000)
    assert [s["step"] for s in steps] == list(range(1, 121))
    assert sorted((s["payload"]["writer"], s["payload"]["i"]) for s in steps) == [
        (w, i) for w in range(4) for i in range(30)]


@pytest.mark.parametrize("final", lakebase.FINAL_STATUSES)
def test_a_runs_step_log_is_closed_by_its_final_step(conn, final):
    lakebase.log_step(conn, "901", "started", {"request": "q"})
    assert lakebase.log_step(conn, "901", final, {"answer": "42"}, key="end") == 2
    assert lakebase.log_step(conn, "901", final, {"answer": "42"}, key="end") == 2  # a retry finds its step
    for status in lakebase.STATUSES:
        with pytest.raises(lakebase.RunEnded, match=f"^run 901 has already ended \\({final} at step 2\\): its step "
                                                    f"log is closed$"):
            lakebase.log_step(conn, "901", status, {"answer": "another"})
    assert [(s["step"], s["status"]) for s in lakebase.read_steps(conn, "901")] == [(1, "started"), (2, final)]
    assert lakebase.run_progress(conn, "901")["final"]["payload"] == {"answer": "42"}
    assert lakebase.log_step(conn, "902", "started", {}) == 1  # other runs go on


def test_of_two_writers_ending_one_run_only_one_does(pg_dsn, conn):
    lakebase.log_step(conn, "shared", "started", {})
    ended, refused = [], []

    def end(writer):
        with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as own:
            try:
                ended.append(lakebase.log_step(own, "shared", "completed", {"answer": writer}))
            except lakebase.RunEnded:
                refused.append(writer)

    run_threads(end, [(w,) for w in range(4)])
    assert ended == [2] and len(refused) == 3
    assert [s["status"] for s in lakebase.read_steps(conn, "shared")] == ["started", "completed"]


# ------------------------------------------------------------------ sanitising

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtZSJ9.c2lnbmF0dXJl"
REDACTED = [  # (text, as redact() gives it)
    ('{"token": "local-abc", "expire_time": "2026"}', '{"token": "***", "expire_time": "2026"}'),  # the SDK's dump
    ("{'access_token': 'x\\'y', 'expires_in': 3600}", "{'access_token': '***', 'expires_in': 3600}"),
    ("> * Authorization: Bearer dapi-local", "> * Authorization: Bearer ***"),
    (f"token {JWT}, cut short: {JWT[:30]}... (2 more bytes)", "token ***, cut short: ***... (2 more bytes)"),
    ("dapi0123456789abcdef0123456789abcdef-2 refused", "*** refused"),
    ("basic statistics, max_tokens 5, the bearer of news", "basic statistics, max_tokens 5, the bearer of news")]


def test_configured_secrets_and_token_like_text_are_redacted_in_messages_and_every_log_record(caplog):
    key, password, proxy = ("secret-" + secrets.token_hex(8) for _ in range(3))
    lakebase.guard_secrets({"LLM_API_KEY": key, "LAKEBASE_DSN": f"host=h user=u password={password}",
                            "LLM_BASE_URL": f"https://user:{proxy}@proxy.example/v1", "PGPASSWORD": "short"})
    assert lakebase.redact(f"401: bad key {key}; {password} {proxy} short") == "401: bad key ***; *** *** short"
    for text, redacted in REDACTED:
        assert lakebase.redact(text) == redacted
    caplog.set_level(logging.DEBUG)
    try:
        raise ValueError(f"refused {key}")
    except ValueError:
        logging.getLogger("databricks.sdk").debug("POST /x\n< %s", '{"token": "t-123"}', exc_info=True)
    assert caplog.records[-1].getMessage() == 'POST /x\n< {"token": "***"}'
    logging.getLogger("databricks.sdk").warning("run %s of %s", 5, "job")  # nothing to redact: kept as it was
    assert (caplog.records[-1].msg, caplog.records[-1].args) == ("run %s of %s", (5, "job"))
    assert "ValueError: refused ***" in caplog.text and key not in caplog.text



BAD = {"text\x00key": ["nul \x00 here", {"lone": "surrogate \ud800 and \udfff"}], "fine": "ok \U0001f600", "n": 1}
CLEAN = {"text\ufffdkey": ["nul \ufffd here", {"lone": "surrogate \ufffd and \ufffd"}], "fine": "ok \U0001f600",
         "n": 1}


def test_a_step_with_unstorable_characters_is_stored_sanitised(conn, caplog):
    with caplog.at_level(logging.WARNING, logger="lakebase"):
        assert lakebase.log_step(conn, "r1", "tool_result", BAD) == 1
    assert lakebase.read_steps(conn, "r1")[0]["payload"] == CLEAN
    assert "U+FFFD" in caplog.text and "\x00" not in caplog.text


def test_a_message_with_unstorable_characters_is_stored_sanitised(conn, caplog):
    with caplog.at_level(logging.WARNING, logger="lakebase"):
        lakebase.append_turn(conn, "t", [user("a\x00b \ud83d"), {"role": "tool", "tool_call_id": "c", **BAD}])
        lakebase.record_run(conn, "t", "5", "k", "request \x00 text")
    assert lakebase.load_messages(conn, "t") == [user("a\ufffdb \ufffd"), {"role": "tool", "tool_call_id": "c",
                                                                            **CLEAN}]
    assert lakebase.find_run(conn, "t", run_id="5")["request"] == "request \ufffd text"
    assert caplog.text.count("U+FFFD") == 3  # one warning per sanitised message or field


# ------------------------------------------------------------------ list, delete, prune

def test_list_delete_and_prune(conn):
    for name, owner in [("old", "alice"), ("mid", "bob"), ("new", "alice")]:
        lakebase.append_turn(conn, name, [user(name)], owner=owner)
        lakebase.record_run(conn, name, f"run-{name}", "k", "q", owner=owner)
        lakebase.log_step(conn, f"run-{name}", "started", {"request": "q", "thread_id": name})
    lakebase.log_step(conn, "run-unrelated", "started", {"request": "q", "thread_id": None})
    conn.execute("update threads set updated_at = now() - interval '40 days' where thread_id = 'old'")
    conn.execute("update task_logs set created_at = now() - interval '40 days' where run_id = 'run-old'")
    conn.execute("update thread_runs set created_at = now() - interval '40 days' where run_id = 'run-old'")
    conn.execute("update threads set updated_at = now() - interval '5 days' where thread_id = 'mid'")
    assert [t["thread_id"] for t in lakebase.list_threads(conn)] == ["new", "mid", "old"]
    assert [t["thread_id"] for t in lakebase.list_threads(conn, owner="alice")] == ["new", "old"]
    assert [t["thread_id"] for t in lakebase.list_threads(conn, limit=1)] == ["new"]
    assert lakebase.list_threads(conn)[0]["turns"] == 1

    assert lakebase.prune_threads(conn, timedelta(days=30)) == 1
    assert [t["thread_id"] for t in lakebase.list_threads(conn)] == ["new", "mid"]
    assert lakebase.delete_thread(conn, "mid") is True
    assert lakebase.delete_thread(conn, "mid") is False
    assert [t["thread_id"] for t in lakebase.list_threads(conn)] == ["new"]
    # their messages, runs and the runs' step logs went with them; the rest stayed
    assert conn.execute("select thread_id from thread_messages").fetchall() == [("new",)]
    assert conn.execute("select run_id from thread_runs").fetchall() == [("run-new",)]
    assert sorted(r[0] for r in conn.execute("select run_id from task_logs")) == ["run-new", "run-unrelated"]


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call", [
    lambda c: lakebase.append_turn(c, "", [user("x")]),
    lambda c: lakebase.append_turn(c, "-starts-with-dash", [user("x")]),
    lambda c: lakebase.append_turn(c, "has space", [user("x")]),
    lambda c: lakebase.append_turn(c, "x" * 129, [user("x")]),
    lambda c: lakebase.append_turn(c, "t'; drop table threads; --", [user("x")]),
    lambda c: lakebase.append_turn(c, None, [user("x")]),
    lambda c: lakebase.append_turn(c, "t", []),
    lambda c: lakebase.append_turn(c, "t", [{"content": "no role"}]),
    lambda c: lakebase.append_turn(c, "t", "not a list of dicts"),
    lambda c: lakebase.load_messages(c, "t", last=-1),
    lambda c: lakebase.log_step(c, "r", "finished", {}),
    lambda c: lakebase.log_step(c, "r", "STARTED", {}),
    lambda c: lakebase.log_step(c, "r", "started", ["not", "a", "dict"]),
    lambda c: lakebase.log_step(c, "r/1", "started", {}),
    lambda c: lakebase.read_steps(c, "r", after=-1),
    lambda c: lakebase.read_steps(c, "r", limit=0),
    lambda c: lakebase.record_run(c, "t", "1", "", "q"),
    lambda c: lakebase.prune_threads(c, timedelta(0)),
    lambda c: lakebase.prune_threads(c, 30),
])
def test_bad_input_is_refused_with_a_value_error(conn, call):
    with pytest.raises(ValueError):
        call(conn)
    assert conn.execute("select (select count(*) from threads) + (select count(*) from task_logs)").fetchone()[0] == 0


def test_valid_ids_are_accepted(conn):
    for thread_id in ["a", "A-1_b.c:d", "x" * 128, "9f1c2d3e-0000-4000-8000-000000000000"]:
        assert lakebase.append_turn(conn, thread_id, [user("x")]) == 1
    assert lakebase.log_step(conn, "local-9f1c2d3e-0000-4000-8000-000000000000", "started", {}) == 1


# ------------------------------------------------------------------ configuration and connecting

def test_config_from_env():
    env = {"LAKEBASE_DSN": "", "LAKEBASE_INSTANCE": "db1", "LAKEBASE_USER": "sp-uuid", "OTHER": "x"}
    assert LakebaseConfig.from_env(env) == LakebaseConfig(instance="db1", user="sp-uuid",
                                                         database="databricks_postgres")
    env = {"LAKEBASE_ENDPOINT": "projects/p/branches/b/endpoints/e", "LAKEBASE_DATABASE": "app"}
    assert (LakebaseConfig.from_env(env).endpoint, LakebaseConfig.from_env(env).database) == (
        "projects/p/branches/b/endpoints/e", "app")
    assert LakebaseConfig.from_env({}) == LakebaseConfig()


@pytest.mark.parametrize("config, says", [
    (LakebaseConfig(), "no database configured"),
    (LakebaseConfig(dsn="host=/tmp", instance="db1"), "keep only one"),
    (LakebaseConfig(instance="db1", endpoint="projects/p/branches/b/endpoints/e"), "keep only one"),
    (LakebaseConfig(endpoint="db1"), "projects/P/branches/B/endpoints/E"),
    (LakebaseConfig(dsn="host=x password=se cret"), "not a valid"),
])
def test_configuration_errors_say_what_to_fix(monkeypatch, config, says):
    for var in lakebase.PG_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LakebaseError, match=says) as info:
        lakebase.connect(config, workspace=object())  # the workspace is never used: it fails before
    assert "\n" not in str(info.value) and "cret" not in str(info.value)


def test_pg_variables_are_a_configuration(monkeypatch, pg_dsn):
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    monkeypatch.setenv("PGHOST", params["host"])
    monkeypatch.setenv("PGDATABASE", params["dbname"])
    monkeypatch.setenv("PGUSER", params["user"])
    config = LakebaseConfig.from_env()
    assert config.configured() and not config.dsn
    with lakebase.connect(config) as conn:
        assert conn.execute("select current_database()").fetchone()[0] == params["dbname"]


def test_connections_are_autocommit_with_keepalives(pg_dsn):
    with lakebase.connect(LakebaseConfig(dsn=pg_dsn)) as conn:
        params = conn.info.get_parameters()
        assert conn.autocommit is True
        assert (params["keepalives"], params["keepalives_idle"], params["application_name"]) == (
            "1", "30", "async-agent")


def test_every_session_has_time_limits_and_a_statement_over_them_says_which(pg_dsn):
    config = LakebaseConfig(dsn=pg_dsn, statement_timeout=0.3, lock_timeout=0.2, idle_in_transaction_timeout=9)
    pool = lakebase.open_pool(config, max_size=1)
    try:
        with lakebase.connect(config) as single, pool.connection() as pooled:
            for conn in (single, pooled):
                assert [conn.execute(f"show {name}").fetchone()[0] for name in (
                    "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")] == [
                    "300ms", "200ms", "9s"]
            with pytest.raises(psycopg.errors.QueryCanceled) as slow:
                single.execute("select pg_sleep(5)")
            single.execute("begin")
            single.execute("lock table pg_class in share mode")  # held by one session, wanted by the other
            with pytest.raises(psycopg.errors.LockNotAvailable) as locked, pooled.transaction():
                pooled.execute("lock table pg_class in exclusive mode")
            single.execute("rollback")
    finally:
        pool.close()
    assert lakebase.explain(slow.value, config).startswith("a statement ran longer than statement_timeout (0.3 s)")
    assert lakebase.explain(locked.value, pool.bounds).startswith(
        "a statement waited longer than lock_timeout (0.2 s) for a lock that another database session holds")


def test_keyed_writes_are_stored_once(conn):
    assert [lakebase.append_turn(conn, "t", [user(text)], key=key) for text, key in
            [("a", "k1"), ("a", "k1"), ("b", "k2"), ("c", None), ("c", None)]] == [1, 1, 2, 3, 4]
    assert [m["content"] for m in lakebase.load_messages(conn, "t")] == ["a", "b", "c", "c"]
    assert [lakebase.log_step(conn, "r", status, {}, key=key) for status, key in
            [("started", "s1"), ("started", "s1"), ("completed", "s2")]] == [1, 1, 2]
    assert [lakebase.reserve_run(conn, "t", slot, key) for slot, key in
            [("turn 5 #0", "key-a"), ("turn 5 #0", "key-b"), ("turn 5 #1", "key-c")]] == ["key-a", "key-a", "key-c"]


def test_a_seed_is_stored_only_by_the_append_that_creates_the_first_turn(conn):
    seed = [user("my name is Ada"), assistant("Hi Ada")]
    for text in ("one", "two"):
        lakebase.append_turn(conn, "t", [user(text), assistant("ok")], seed=seed)
    assert [m["content"] for m in lakebase.load_messages(conn, "t")] == ["my name is Ada", "Hi Ada", "one", "ok",
                                                                         "two", "ok"]


def test_a_window_without_a_user_message_reaches_back_to_one(conn):
    calls = [{"role": "tool", "tool_call_id": f"c{i}", "content": f"r{i}"} for i in range(6)]
    lakebase.append_turn(conn, "t", [user("first"), assistant("ok")])
    lakebase.append_turn(conn, "t", [user("second"), *calls, assistant("done")])
    assert [m["content"] for m in lakebase.load_window(conn, "t", 3)] == ["second", "r4", "r5", "done"]
    assert [m["content"] for m in lakebase.load_window(conn, "t", 8)] == ["second", *[f"r{i}" for i in range(6)],
                                                                          "done"]
    assert lakebase.load_window(conn, "t", 0) == []


def test_unreachable_server_fails_in_bounded_time():
    started = time.monotonic()
    with pytest.raises(LakebaseError, match="up and reachable"):
        lakebase.connect(LakebaseConfig(dsn="host=/nonexistent-dir dbname=x", retry_seconds=1))
    assert time.monotonic() - started < 5


def test_the_dsn_mode_never_imports_the_sdk(pg_dsn):
    child = ("import sys, lakebase; conn = lakebase.connect(lakebase.LakebaseConfig(dsn=sys.argv[1])); "
             "lakebase.migrate(conn); lakebase.log_step(conn, 'r', 'started', {}); "
             "print(sorted(m for m in sys.modules if m.startswith('databricks')))")
    done = subprocess.run([sys.executable, "-c", child, pg_dsn], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # importing databricks.sdk costs 1-2.5 s


@pytest.mark.parametrize("password", ["", None, "server"])
def test_a_minted_password_too_short_to_redact_changes_no_log_line(password):
    login = lakebase.CachedLogin(lambda: Login(host="h", user="u", password=password))
    assert login().password == password
    assert lakebase.redact("cannot connect: server down") == "cannot connect: server down"


def test_redact():
    text = "password=hunter2 and PASSWORD = 'a b' postgresql://me:pa55@host/db eyJhbGciOi.eyJzdWIiOi.c2lnbmF0 user=me"
    assert lakebase.redact(text) == "password=*** and PASSWORD = *** postgresql://me:***@host/db *** user=me"


# ------------------------------------------------------------------ an own server: restarts, short-lived passwords

ROLE = pg_fixture.PASSWORD_ROLE


def backend(conn):
    return conn.execute("select pg_backend_pid(), current_user").fetchone()


def test_pool_hands_out_working_connections_after_a_restart(own, own_dsn):
    config = LakebaseConfig(dsn=own_dsn)
    with lakebase.open_pool(config, min_size=2, max_size=2, timeout=20) as pool:
        with pool.connection() as conn:
            before = backend(conn)[0]
        pg_fixture.stop(own)
        pg_fixture.start(own)
        for _ in range(3):  # every pooled connection died with the server: each is checked and replaced
            with pool.connection() as conn:
                assert conn.execute("select 1").fetchone() == (1,) and backend(conn)[0] != before


def test_single_connection_reconnects_after_a_restart(own, own_dsn):
    config = LakebaseConfig(dsn=own_dsn, retry_seconds=30)
    conn = lakebase.connect(config)
    lakebase.migrate(conn)
    lakebase.log_step(conn, "r", "started", {})
    pg_fixture.stop(own)
    restarted = threading.Timer(1.0, pg_fixture.start, args=(own,))
    restarted.start()
    try:
        with pytest.raises(psycopg.OperationalError):  # what worker.StepLog catches to reconnect
            lakebase.log_step(conn, "r", "tool_call", {})
        started = time.monotonic()
        conn = lakebase.connect(config)  # waits for the server to come back
        assert time.monotonic() - started > 0.5
        assert lakebase.log_step(conn, "r", "tool_call", {}) == 2
    finally:
        restarted.join(30)
        conn.close()


def test_each_connection_logs_in_with_a_fresh_enough_token(own):
    mint = pg_fixture.ShortLivedPasswords(own, valid_for=2.5)
    login = lakebase.CachedLogin(mint, max_age=1.0)
    config = LakebaseConfig(instance="stand-in")
    first = lakebase.connect(config, login=login)
    second = lakebase.connect(config, login=login)
    assert len(mint.minted) == 1 and backend(first)[1] == ROLE  # a young token is reused
    time.sleep(1.1)
    third = lakebase.connect(config, login=login)
    assert len(mint.minted) == 2
    time.sleep(1.6)  # the first token has expired now
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=mint.host, user=ROLE, password=mint.minted[0], dbname="postgres")
    for conn in (first, second, third):  # expiry is checked only at login: open connections carry on
        assert backend(conn)[1] == ROLE
        conn.close()
    with lakebase.connect(config, login=login) as fourth:
        assert backend(fourth)[1] == ROLE and len(mint.minted) == 3


def test_pool_recycles_connections_with_fresh_tokens(own):
    mint = pg_fixture.ShortLivedPasswords(own, valid_for=2.0)
    login = lakebase.CachedLogin(mint, max_age=0.5)
    with lakebase.open_pool(LakebaseConfig(instance="stand-in"), login=login, min_size=1, max_size=1,
                            max_lifetime=1.0, timeout=10) as pool:
        pids = set()
        deadline = time.monotonic() + 5  # well past the first tokens' expiry
        while time.monotonic() < deadline:
            with pool.connection() as conn:
                pids.add(backend(conn)[0])
            time.sleep(0.2)
        with pool.connection() as conn:
            assert backend(conn)[1] == ROLE
    assert len(pids) >= 3 and len(mint.minted) >= 3


def test_a_refused_login_says_what_to_fix_and_never_shows_the_token(own):
    token = "tok-SECRET-" + secrets.token_hex(8)
    host = psycopg.conninfo.conninfo_to_dict(own.base_dsn)["host"]
    login = lakebase.CachedLogin(lambda: Login(host=host, user=ROLE, password=token, dbname="postgres"))
    started = time.monotonic()
    with pytest.raises(LakebaseError) as info:
        lakebase.connect(LakebaseConfig(instance="stand-in"), login=login)
    assert time.monotonic() - started < 5  # a refusal is final: not retried
    error = info.value
    assert "password authentication failed" in str(error) and f"role {ROLE!r}" in str(error)
    assert "LAKEBASE_USER" in str(error) and "\n" not in str(error)
    assert error.__cause__ is None and error.__context__ is None  # psycopg's error holds the password
    assert token not in repr(error) and token not in str(error.args)


def test_a_refused_dsn_login_never_shows_the_password(own):
    host = psycopg.conninfo.conninfo_to_dict(own.base_dsn)["host"]
    dsn = f"postgresql://{ROLE}:wrong-pa55word@/postgres?host={host}"
    with pytest.raises(LakebaseError, match="LAKEBASE_DSN") as info:
        lakebase.connect(LakebaseConfig(dsn=dsn))
    assert "wrong-pa55word" not in str(info.value) and info.value.__context__ is None


# ------------------------------------------------------------------ instance and endpoint modes: real SDK, emulator

ENDPOINT = pg_fixture.LAKEBASE_ENDPOINT


@pytest.mark.parametrize("config", [LakebaseConfig(instance="db1"), LakebaseConfig(endpoint=ENDPOINT)])
def test_lakebase_modes_log_in_with_a_minted_token_as_the_current_user(lakebase_emulator, config):
    import localws
    import localws.emulator

    emu, workspace = lakebase_emulator
    with lakebase.connect(config, workspace) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == (
            localws.emulator.DEFAULT_USER, "databricks_postgres")
    assert len(emu.minted) == 1
    paths = [r.path for r in emu.requests]
    assert "/api/2.0/preview/scim/v2/Me" in paths
    assert ("/api/2.0/database/credentials" if config.instance else "/api/2.0/postgres/credentials") in paths


@pytest.mark.parametrize("config, says", [
    (LakebaseConfig(instance="missing"), "Lakebase instance 'missing': .*does not exist.*check LAKEBASE_INSTANCE"),
    (LakebaseConfig(endpoint="projects/p/branches/main/endpoints/nope"), "does not exist.*check LAKEBASE_ENDPOINT"),
])
def test_an_unknown_instance_or_endpoint_says_so(lakebase_emulator, config, says):
    with pytest.raises(LakebaseError, match=says) as info:
        lakebase.connect(config, lakebase_emulator[1])
    assert "\n" not in str(info.value) and info.value.__context__ is None


def test_run_progress_reads_the_count_the_last_steps_and_the_end(conn):
    run = "77"
    lakebase.log_step(conn, run, "started", {"request": "q"})
    for i in range(3):
        lakebase.log_step(conn, run, "tool_call", {"name": "query_genie", "arguments": {"question": f"q{i}"}})
        lakebase.log_step(conn, run, "tool_result", {"output": f"o{i}", "detail": {"rows": [["x"]] * 1000}})
    assert lakebase.run_progress(conn, run)["final"] is None
    lakebase.log_step(conn, run, "completed", {"answer": "42"})
    lakebase.log_step(conn, "78", "failed", {"error": "another run"})
    progress = lakebase.run_progress(conn, run, recent=3)
    assert progress["steps"] == 8
    assert [(s["step"], s["status"]) for s in progress["recent"]] == [(6, "tool_call"), (7, "tool_result"),
                                                                      (8, "completed")]
    assert progress["recent"][1]["payload"] == {"output": "o2"}  # Genie's full rows are left in the log
    assert (progress["final"]["step"], progress["final"]["payload"]) == (8, {"answer": "42"})
    assert lakebase.run_progress(conn, "79") == {"steps": 0, "answered": 0, "recent": [], "final": None}


@pytest.mark.parametrize("config, path", [(LakebaseConfig(instance="db1"), "/api/2.0/database/credentials"),
                                          (LakebaseConfig(endpoint=ENDPOINT), "/api/2.0/postgres/credentials")])
def test_a_credential_api_that_stays_unavailable_is_unreachable_in_one_line(lakebase_emulator, config, path):
    emu, _ = lakebase_emulator
    emu.inject("POST", path, 503, times=None)  # the SDK retries it for its retry_timeout_seconds, then gives up
    with pytest.raises(lakebase.Unreachable, match=r"^a credential for Lakebase .*: the Databricks API did not "
                                                   r"answer \(Timed out after .*injected fault.*check that the "
                                                   r"workspace is up") as info:
        lakebase.connect(config, workspace(emu, retry_timeout=1))
    assert "\n" not in str(info.value) and info.value.__context__ is None
    assert len(emu.calls("POST", path)) >= 1 and emu.minted == []


def test_an_instance_with_no_host_yet_is_unreachable_and_mints_no_credential(lakebase_emulator):
    emu, w = lakebase_emulator
    emu.database_instances["starting"] = None  # read_write_dns: null
    with pytest.raises(lakebase.Unreachable, match="'starting' has no host yet: wait until it is running"):
        lakebase.connect(LakebaseConfig(instance="starting"), w)
    assert emu.calls("POST", "/api/2.0/database/credentials") == []
