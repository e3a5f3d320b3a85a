"""localws: the sample dataset loader, the Genie answerer (rules and chat path) and the stand-in chat model.

Expected numbers come from a plain-Python computation over the CSVs, never from the SQL under test.
"""
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from decimal import Decimal

import jsonschema
import psycopg
import pytest
from helpers import tool_call, tool_result, user
from sample_truth import CUSTOMERS, DATA, ORDERS, PRODUCTS, grouped, in_year, key, measure, money, pct

import lakebase
import localws.answerer
import localws.sample
from localws.answerer import CannotAnswer, GenieAnswerer
from localws.sample import load_sample
from localws.stand_in import stand_in_reply


def num(cell):
    return None if cell is None else Decimal(cell)


@pytest.fixture
def genie(sample_dsn):
    return GenieAnswerer(sample_dsn)


def count_rows(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {t: conn.execute(f"select count(*) from sample.{t}").fetchone()[0]
                for t in ("customers", "products", "orders")}


CSV_COUNTS = {"customers": len(CUSTOMERS), "products": len(PRODUCTS), "orders": len(ORDERS)}


# ---------------------------------------------------------------- the dataset

def test_generator_reproduces_the_csvs_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(DATA / "generate.py"), str(tmp_path)], check=True, timeout=120)
    for name in ("customers", "products", "orders"):
        assert (tmp_path / f"{name}.csv").read_bytes() == (DATA / f"{name}.csv").read_bytes(), name


def test_dataset_is_small_and_has_growth_and_seasonality():
    assert sum(p.stat().st_size for p in DATA.glob("*.csv")) < 1_000_000
    assert 3000 <= len(ORDERS) <= 6000
    dates = sorted(o["order_date"] for o in ORDERS)
    assert (dates[0], dates[-1]) == ("2024-01-01", "2025-12-31")
    assert len({d[:7] for d in dates}) == 24
    by_year = grouped("revenue", "year")
    assert by_year["2025"] > by_year["2024"] * Decimal("1.1")
    months = grouped("orders", "month")
    assert months["2025-12"] > 1.5 * months["2025-02"]


def test_load_sample_twice_loads_once_with_the_csv_counts_and_constraints(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert load_sample(conn) is True
        assert load_sample(conn) is False
        kinds = conn.execute("select constraint_type, count(*) from information_schema.table_constraints "
                             "where table_schema = 'sample' and constraint_type in ('PRIMARY KEY', 'FOREIGN KEY') "
                             "group by 1 order by 1").fetchall()
        assert kinds == [("FOREIGN KEY", 2), ("PRIMARY KEY", 3)]
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("insert into sample.orders values (999999, 999999, 1, '2025-01-01', 1, 1.00, 'completed')")
        types = dict(conn.execute("select column_name, data_type from information_schema.columns "
                                  "where table_schema = 'sample' and table_name = 'orders'").fetchall())
        assert types["order_date"] == "date" and types["amount"] == "numeric" and types["quantity"] == "integer"
    assert count_rows(pg_dsn) == CSV_COUNTS


def test_load_sample_from_two_connections_at_once(pg_dsn):
    results, errors, barrier = [], [], threading.Barrier(2)

    def load():
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                barrier.wait(timeout=10)
                results.append(load_sample(conn))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and sorted(results) == [False, True]
    assert count_rows(pg_dsn) == CSV_COUNTS


def test_load_sample_reloads_changed_data_and_refuses_a_foreign_schema(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        load_sample(conn)
        conn.execute("delete from sample.orders where order_id > 10")
        conn.execute(f"comment on schema sample is '{localws.sample.MARKER} older'")
        assert load_sample(conn) is True
        assert count_rows(pg_dsn) == CSV_COUNTS
        conn.execute("drop schema sample cascade")
        conn.execute("create schema sample")
        conn.execute("create table sample.mine (x int)")
        with pytest.raises(RuntimeError, match="not made by localws.sample.load_sample"):
            load_sample(conn)
        assert conn.execute("select to_regclass('sample.mine')").fetchone()[0] is not None


# ---------------------------------------------------------------- the offline Genie: each shape

@pytest.mark.parametrize("question, metric, year", [
    ("What was the total revenue in 2025?", "revenue", 2025),
    ("total sales", "revenue", None),
    ("How many orders?", "orders", None),
    ("how many orders in 2024", "orders", 2024),
    ("what was the average order value in 2024", "aov", 2024),
    ("How many customers bought in 2025?", "customers", 2025),
    ("units sold in 2024", "quantity", 2024),
])
def test_totals(genie, question, metric, year):
    result = genie.answer(question)
    expected = measure(metric, in_year(year))
    assert [[num(c) for c in row] for row in result.rows] == [[expected]]
    assert len(result.columns) == 1
    assert result.columns[0]["type_name"] == ("DECIMAL" if metric in ("revenue", "aov") else "LONG")
    shown = money(expected) if metric in ("revenue", "aov") else f"{expected:,}"
    assert shown in result.text and (str(year) in result.text if year else True)
    assert result.sql.lower().startswith("select")


@pytest.mark.parametrize("question, metric, dim, n, year, ascending", [
    ("top 5 products by revenue", "revenue", "product", 5, None, False),
    ("Top 3 customers by orders in 2025", "orders", "customer", 3, 2025, False),
    ("Which region has the most sales?", "revenue", "region", 1, None, False),
    ("best-selling categories", "quantity", "category", 5, None, False),
    ("which month had the lowest revenue?", "revenue", "month", 1, None, True),
    ("least popular product in 2025", "orders", "product", 1, 2025, True),
    ("bottom 2 segments by customers in 2024", "customers", "segment", 2, 2024, True),
    ("top ten products by average order value", "aov", "product", 10, None, False),
])
def test_top_n(genie, question, metric, dim, n, year, ascending):
    result = genie.answer(question)
    expected = grouped(metric, dim, year)
    values = sorted(expected.values(), reverse=not ascending)[:n]
    assert [num(v) for _, v in result.rows] == values  # ties may come in any order: compare values, then keys
    assert all(expected[k] == num(v) for k, v in result.rows)
    assert [c["name"] for c in result.columns][0] == dim
    top_key, top_value = result.rows[0]
    assert top_key in result.text and (money(values[0]) if metric in ("revenue", "aov") else f"{values[0]:,}") \
        in result.text


@pytest.mark.parametrize("question, metric, dim, year", [
    ("revenue by month in 2025", "revenue", "month", 2025),
    ("monthly sales", "revenue", "month", None),
    ("orders per quarter", "orders", "quarter", None),
    ("revenue by year", "revenue", "year", None),
    ("sales by region", "revenue", "region", None),
    ("units by category in 2024", "quantity", "category", 2024),
    ("total quantity sold per product category", "quantity", "category", None),
    ("customers by segment", "customers", "segment", None),
    ("average order value by product", "aov", "product", None),
    ("How many orders per customer in 2025?", "orders", "customer", 2025),
])
def test_breakdowns(genie, question, metric, dim, year):
    result = genie.answer(question)
    expected = grouped(metric, dim, year)
    assert {k: num(v) for k, v in result.rows} == expected
    if dim in ("month", "quarter", "year"):
        assert [k for k, _ in result.rows] == sorted(expected)
        assert result.columns[0]["type_name"] == ("INT" if dim == "year" else "STRING")
    else:
        assert [num(v) for _, v in result.rows] == sorted(expected.values(), reverse=True)
    assert f"{len(expected)} rows" in result.text


def test_year_over_year_growth(genie):
    result = genie.answer("How did revenue grow year over year?")
    r24, r25 = grouped("revenue", "year")["2024"], grouped("revenue", "year")["2025"]
    assert [c["name"] for c in result.columns] == ["year", "revenue", "previous_revenue", "growth_pct"]
    assert [[num(c) for c in row] for row in result.rows] == [[2024, r24, None, None], [2025, r25, r24, pct(r25, r24)]]
    assert f"{pct(r25, r24)}%" in result.text and money(r25) in result.text
    assert genie.answer("2025 vs 2024 sales").rows == result.rows[1:]


def test_month_over_month_growth_in_a_year_compares_january_with_december_before(genie):
    result = genie.answer("month-over-month order growth in 2025")
    months = grouped("orders", "month")
    assert len(result.rows) == 12
    for month, value, previous, growth in result.rows:
        before = f"{int(month[:4]) - (month[5:] == '01')}-{12 if month[5:] == '01' else int(month[5:]) - 1:02d}"
        assert (int(value), int(previous)) == (months[month], months[before])
        assert num(growth) == pct(Decimal(months[month]), Decimal(months[before]))
    assert "2025-12" in result.text and f"{months['2025-12']:,}" in result.text


def test_growth_by_dimension_ranks_by_growth(genie):
    result = genie.answer("revenue growth by region")
    r24, r25 = grouped("revenue", "region", 2024), grouped("revenue", "region", 2025)
    expected = {k: (r24[k], r25[k], pct(r25[k], r24[k])) for k in r25}
    assert [c["name"] for c in result.columns] == ["region", "revenue_2024", "revenue_2025", "growth_pct"]
    assert {k: (num(a), num(b), num(g)) for k, a, b, g in result.rows} == expected
    growths = [num(g) for *_, g in result.rows]
    assert growths == sorted(growths, reverse=True)
    fastest = genie.answer("Which category grew fastest in orders?")
    o24, o25 = grouped("orders", "category", 2024), grouped("orders", "category", 2025)
    best = max(pct(Decimal(o25[k]), Decimal(o24[k])) for k in o25)
    assert len(fastest.rows) == 1 and num(fastest.rows[0][3]) == best and fastest.rows[0][0] in fastest.text


def test_a_year_without_data_says_so(genie):
    result = genie.answer("total revenue in 2023")
    assert result.rows == [[None]] and "no data in 2023" in result.text


def test_question_text_never_reaches_the_sql(genie, sample_dsn):
    result = genie.answer("total revenue in 2025'); --")
    assert "--" not in result.sql and "'2025-01-01'" in result.sql
    assert num(result.rows[0][0]) == measure("revenue", in_year(2025))
    with pytest.raises(CannotAnswer, match="'drop table sample'"):
        genie.answer("total revenue in 2025'); drop table sample.orders; --")
    assert count_rows(sample_dsn)["orders"] == len(ORDERS)


# ---------------------------------------------------------------- follow-ups and refusals

def test_follow_ups_reuse_the_previous_question(genie):
    history = []

    def ask(question):
        result = genie.answer(question, list(history))
        history.append(question)
        return {row[0]: num(row[-1]) for row in result.rows}

    assert ask("total revenue in 2025") == {str(measure("revenue", in_year(2025))): measure("revenue", in_year(2025))}
    assert ask("and by month?") == grouped("revenue", "month", 2025)
    assert ask("what about 2024?") == grouped("revenue", "month", 2024)
    assert ask("and orders?") == grouped("orders", "month", 2024)
    assert ask("for all years?") == grouped("orders", "month")


def test_follow_up_history_as_the_emulator_passes_it(genie):
    history = [{"question": "top 3 products by orders", "text": "...", "sql": "select ..."}]
    result = genie.answer("and in 2024?", history)
    expected = grouped("orders", "product", 2024)
    assert len(result.rows) == 3 and all(expected[k] == int(v) for k, v in result.rows)
    assert [int(v) for _, v in result.rows] == sorted(expected.values(), reverse=True)[:3]


def test_a_new_full_question_ignores_the_history(genie):
    result = genie.answer("top 3 products by orders", ["revenue by month in 2025"])
    assert [int(v) for _, v in result.rows] == sorted(grouped("orders", "product").values(), reverse=True)[:3]


@pytest.mark.parametrize("question, history", [
    ("What's the weather like?", []),
    ("what about 2024?", []),
    ("how many products are there?", []),
    ("tell me a joke", ["total revenue in 2025"]),
])
def test_unknown_questions_say_what_can_be_answered(genie, question, history):
    with pytest.raises(CannotAnswer) as e:
        genie.answer(question, history)
    message = str(e.value)
    assert question in message
    for example in ("top 5 products by revenue", "revenue by month in 2025", "year over year", "what about 2024?"):
        assert example in message


@pytest.mark.parametrize("question, word", [
    ("How many orders did we get in December 2025?", "december"),
    ("How much revenue did the West region make?", "west"),
    ("sales in Q4 2025", "q4"),
    ("what were our sales last year?", "last year"),
    ("how many orders were cancelled?", "cancelled"),
    ("top products in electronics", "electronics"),
])
def test_filters_other_than_a_year_are_refused_not_ignored(genie, question, word):
    with pytest.raises(CannotAnswer, match=f"can't narrow the data to '{word}': the only filter I apply is a year"
                                           ".*top 5 products by revenue"):
        genie.answer(question)


@pytest.mark.parametrize("question, word", [
    ("Which customers churned?", "churned"),  # would have been: the top 5 customers by revenue
    ("What was the median order value?", "median"),  # the average
    ("How many new customers in 2025?", "new"),  # active customers
    ("total profit by region", "profit"),  # revenue by region
    ("revenue per employee in 2024", "employee"),  # total revenue
])
def test_a_question_the_rules_would_change_is_refused_in_a_few_lines(genie, question, word):
    with pytest.raises(CannotAnswer) as e:
        genie.answer(question)
    message = str(e.value)
    assert message.startswith(f"I can't answer {question!r} as asked: I don't know what {word!r} means here")
    assert "top 5 products by revenue" in message and len(message) < 500, message


# ---------------------------------------------------------------- the chat path

class FakeChat:
    """A chat client with scripted replies; records what it was asked; fails when asked once too often."""

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def complete(self, messages, **kw):
        self.calls.append((messages, kw))
        assert self.replies, "FakeChat asked more often than scripted"
        return {"role": "assistant", "content": self.replies.pop(0)}


def test_chat_path_runs_the_models_select_and_shows_it_the_schema_and_history(sample_dsn):
    chat = FakeChat("Here you go:\n```sql\nselect c.region, count(*) as n\nfrom sample.orders o\n"
                    "join sample.customers c using (customer_id)\ngroup by 1 order by 1;\n```")
    result = GenieAnswerer(sample_dsn, chat=chat).answer(
        "and all orders by region?", ["total revenue in 2025", {"question": "by month?", "sql": "select 1"}])
    expected = defaultdict(int)
    for o in ORDERS:
        expected[key(o, "region")] += 1
    assert result.rows == [[k, str(v)] for k, v in sorted(expected.items())]
    assert result.columns == [{"name": "region", "type_name": "STRING"}, {"name": "n", "type_name": "LONG"}]
    assert result.sql.startswith("select c.region") and not result.sql.endswith(";")
    assert "5 rows" in result.text and not chat.replies
    (system, user), _ = chat.calls[0]
    assert "create table sample.orders" in system["content"] and "completed" in system["content"]
    assert "total revenue in 2025" in user["content"] and "by month?" in user["content"]
    assert user["content"].endswith("Question: and all orders by region?")


@pytest.mark.parametrize("reply", [
    "delete from sample.orders",
    "select 1; delete from sample.orders",
    "I cannot write SQL for that.",
    "",
])
def test_chat_path_rejects_anything_but_one_select(sample_dsn, reply):
    with pytest.raises(CannotAnswer, match="single SELECT"):
        GenieAnswerer(sample_dsn, chat=FakeChat(reply)).answer("delete everything")
    assert count_rows(sample_dsn)["orders"] == len(ORDERS)


def test_chat_path_runs_read_only(sample_dsn):
    chat = FakeChat("with gone as (delete from sample.orders returning *) select count(*) from gone")
    with pytest.raises(CannotAnswer, match="the query failed"):
        GenieAnswerer(sample_dsn, chat=chat).answer("sneaky")
    assert count_rows(sample_dsn)["orders"] == len(ORDERS)


@pytest.mark.parametrize("reply", ["select nextval('sample.counter')", "select * from sample.orders for update"])
def test_chat_path_runs_in_a_read_only_transaction(sample_dsn, reply):
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        conn.execute("create sequence sample.counter")  # the reader may use it: only the transaction stops it
        conn.execute(psycopg.sql.SQL("grant usage on sequence sample.counter to {}").format(
            psycopg.sql.Identifier(localws.sample.reader_login(conn)["user"])))
    with pytest.raises(CannotAnswer, match="read-only transaction"):
        GenieAnswerer(sample_dsn, chat=FakeChat(reply)).answer("sneaky")
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        assert conn.execute("select last_value, is_called from sample.counter").fetchone() == (1, False)


SECRET = "select 'the other session''s secret'"
ESCAPES = {  # what a prompt-injected question could make the model write, and how Postgres refuses the reader
    "other schemas": ("select * from public.thread_messages", "permission denied for table thread_messages"),
    "the workspace's schema": ("select * from local_workspace.genie_login", "permission denied for schema"),
    "server files": ("select pg_read_file('postgresql.conf')", "permission denied for function pg_read_file"),
    "directory listings": ("select * from pg_ls_dir('.')", "permission denied for function pg_ls_dir"),
    "server settings": ("select current_setting('data_directory')", "permission denied to examine"),
    "reloading the configuration": ("select pg_reload_conf()", "permission denied for function pg_reload_conf"),
    "terminating backends": ("select pg_terminate_backend(pid) from pg_stat_activity where pid <> pg_backend_pid()",
                             "permission denied to terminate process"),
    "becoming a superuser": ("select set_config('role', (select min(rolname) from pg_roles where rolsuper), true)",
                             "permission denied to set role"),
}


@pytest.fixture
def other_session(sample_dsn):
    """A session of the database's own role, with a thread stored and a secret in its last statement."""
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        lakebase.migrate(conn)
        lakebase.append_turn(conn, "t1", [{"role": "user", "content": "my private question"}], owner="ana")
        conn.execute(SECRET)
        yield conn


@pytest.mark.parametrize("sql, refusal", ESCAPES.values(), ids=ESCAPES.keys())
def test_chat_path_sql_runs_as_a_role_that_reads_schema_sample_only(sample_dsn, other_session, sql, refusal):
    with pytest.raises(CannotAnswer, match=refusal):
        GenieAnswerer(sample_dsn, chat=FakeChat(sql)).answer("what else is on this server?")
    assert other_session.execute("select 1").fetchone() == (1,)  # not terminated
    assert GenieAnswerer(sample_dsn, chat=FakeChat("select count(*) from sample.orders")).answer(
        "how many orders?").rows == [[str(len(ORDERS))]]


def test_chat_path_sql_does_not_see_other_sessions_sql(sample_dsn, other_session):
    result = GenieAnswerer(sample_dsn, chat=FakeChat("select query from pg_stat_activity")).answer("who is here?")
    assert not [row for row in result.rows if row[0] and "secret" in row[0]]
    assert ["<insufficient privilege>"] in result.rows


def test_the_reader_role_is_shared_and_regranted_after_a_reload(sample_dsn):
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        login = localws.sample.reader_login(conn)
        assert localws.sample.reader_login(conn) == login  # a second process gets the same password
        attributes = conn.execute("select rolsuper, rolcreaterole, rolcreatedb, rolcanlogin from pg_roles "
                                  "where rolname = %s", (login["user"],)).fetchone()
        assert attributes == (False, False, False, True)
        conn.execute(f"comment on schema sample is '{localws.sample.MARKER} older'")
        assert load_sample(conn) is True  # dropping the schema took the reader's grants with it
    chat = FakeChat("select count(*) from sample.products")
    assert GenieAnswerer(sample_dsn, chat=chat).answer("how many products?").rows == [[str(len(PRODUCTS))]]


def test_an_answerer_given_the_login_uses_it_and_sets_up_no_role(sample_dsn):
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        login = localws.sample.reader_login(conn)  # as start() does, once
        conn.execute("drop table local_workspace.genie_login")  # a second set-up would make it again
    result = GenieAnswerer(sample_dsn, chat=FakeChat("select current_user"), login=login).answer("who am I?")
    assert result.rows == [[login["user"]]]
    with psycopg.connect(sample_dsn, autocommit=True) as conn:
        assert conn.execute("select to_regclass('local_workspace.genie_login')").fetchone() == (None,)


def test_chat_path_streams_a_huge_result_and_keeps_the_first_rows(sample_dsn):
    started = time.monotonic()
    # generate_series in the select list streams (in FROM it would be materialised first)
    chat = FakeChat("select generate_series(1, 30000000) as g, repeat('x', 100) as pad")
    result = GenieAnswerer(sample_dsn, chat=chat).answer("everything")
    assert len(result.rows) == 5000 and result.truncated and time.monotonic() - started < 5


def test_chat_path_sql_error_carries_the_database_message(sample_dsn):
    with pytest.raises(CannotAnswer, match='column "nope" does not exist'):
        GenieAnswerer(sample_dsn, chat=FakeChat("select nope from sample.orders")).answer("nope?")


def test_chat_path_statement_timeout(sample_dsn):
    started = time.monotonic()
    with pytest.raises(CannotAnswer, match="longer than 200 ms"):
        GenieAnswerer(sample_dsn, chat=FakeChat("select pg_sleep(5)"), timeout_ms=200).answer("slow?")
    assert time.monotonic() - started < 4


def test_chat_path_caps_rows_at_the_genie_limit(sample_dsn):
    result = GenieAnswerer(sample_dsn, chat=FakeChat("select g from generate_series(1, 5003) g")).answer("many")
    assert len(result.rows) == localws.answerer.MAX_ROWS == 5000 and result.truncated
    assert result.rows[-1] == ["5000"] and "first 5,000" in result.text


def test_chat_path_column_types_and_values_are_as_databricks_sends_them(sample_dsn):
    chat = FakeChat("select 1::int as i, 2::bigint as l, 1.50::numeric(4,2) as d, 2.5::float8 as f, "
                    "date '2024-01-02' as dt, timestamp '2024-01-02 03:04:05' as ts, true as b, 'x' as s, "
                    "null::text as n")
    result = GenieAnswerer(sample_dsn, chat=chat).answer("types")
    assert [c["type_name"] for c in result.columns] == ["INT", "LONG", "DECIMAL", "DOUBLE", "DATE", "TIMESTAMP",
                                                        "BOOLEAN", "STRING", "STRING"]
    assert result.rows == [["1", "2", "1.50", "2.5", "2024-01-02", "2024-01-02 03:04:05", "true", "x", None]]


# ---------------------------------------------------------------- the stand-in model

def _tool(name, **params):
    return {"type": "function", "function": {"name": name, "description": name, "parameters": {
        "type": "object", "properties": {p: {"type": t} for p, t in params.items()}, "required": list(params)}}}


PRIMARY = [_tool("start_databricks_job", request="string"), _tool("poll_databricks_job", run_id="string"),
           _tool("terminate_databricks_job", run_id="string")]
WORKER = [_tool("query_genie", question="string")]
TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
    "tool_calls": {"type": "array", "minItems": 1, "items": TOOL_CALL}}}
CHOICE = {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
    "index": {"const": 0}, "message": MESSAGE, "finish_reason": {"enum": ["stop", "tool_calls"]}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
RESPONSE_SCHEMA = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {"id": {"type": "string", "pattern": "^chatcmpl-"}, "object": {"const": "chat.completion"},
                   "created": {"type": "integer"}, "model": {"type": "string"},
                   "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": CHOICE}, "usage": USAGE}}


def reply(messages, tools=PRIMARY):
    """The stand-in's response, checked for the exact wire shape; returns (content, [(name, arguments dict)])."""
    body = {"model": "databricks-claude-sonnet-4-5", "messages": messages, "tools": tools, "max_tokens": 100}
    response = stand_in_reply(json.loads(json.dumps(body)))
    jsonschema.validate(response, RESPONSE_SCHEMA)
    choice = response["choices"][0]
    calls = choice["message"].get("tool_calls", [])
    assert choice["finish_reason"] == ("tool_calls" if calls else "stop")
    assert (choice["message"]["content"] is None) == bool(calls)
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response["model"] == "databricks-claude-sonnet-4-5"
    again = stand_in_reply(json.loads(json.dumps(body)))
    assert {**again, "created": 0} == {**response, "created": 0}, "not deterministic"
    arguments = [json.loads(c["function"]["arguments"]) for c in calls]
    assert all(isinstance(a, dict) for a in arguments)
    assert len({c["id"] for c in calls}) == len(calls)
    return choice["message"]["content"], [(c["function"]["name"], a) for c, a in zip(calls, arguments)]


SYSTEM = {"role": "system", "content": "You are the primary agent."}
STARTED = [SYSTEM, user("What was the revenue growth in 2025?"),
           tool_call("start_databricks_job", {"request": "What was the revenue growth in 2025?"}, "c1"),
           tool_result("c1", json.dumps({"run_id": 123, "state": "PENDING"})),
           {"role": "assistant", "content": "I started a job for that: run 123."}]


@pytest.mark.parametrize("text", ["hello", "Hi there!", "who are you?", "What are you?"])
def test_primary_greets_and_says_it_is_the_stand_in(text):
    content, calls = reply([SYSTEM, user(text)])
    assert not calls and "offline stand-in model" in content and "not a real language model" in content
    assert content.startswith("Hello!") == text.lower().startswith(("hello", "hi"))


@pytest.mark.parametrize("text, expected", [
    ("thanks!", "You're welcome!"), ("bye", "Goodbye!"), ("ok bye then", "Goodbye!"),
    ("help", "I can start a job that answers a question about the sample sales data"),
    ("what can you do?", "I can start a job that answers a question about the sample sales data")])
def test_primary_answers_thanks_bye_and_help_plainly(text, expected):
    content, calls = reply([SYSTEM, user(text)])
    assert not calls and content.startswith(expected) and "Hello!" not in content, content


def test_primary_takes_no_run_id_from_its_own_example():
    asked, _ = reply([SYSTEM, user("is it done?")])
    assert "Which run should I check on?" in asked
    content, calls = reply([SYSTEM, user("is it done?"), {"role": "assistant", "content": asked},
                            user("is it done?")])
    assert not calls and "Which run" in content


def news(run_id, **report):
    """The agent's poll of a run that ended unasked (primary.Turn hands such news to the model)."""
    call_id = f"unasked_{run_id}"
    return [tool_call("poll_databricks_job", {"run_id": run_id}, call_id),
            tool_result(call_id, json.dumps({"run_id": run_id, "state": "TERMINATED SUCCESS", "steps": 4,
                                             **report, "unasked": True}))]


def test_primary_tells_runs_that_ended_unasked_whatever_the_user_said():
    answered = news("123", answer="Revenue grew 26.4% in 2025.")
    content, calls = reply([*STARTED, user("thanks"), *answered])
    assert not calls and content.startswith("Run 123 has ended since we last spoke: it is TERMINATED SUCCESS")
    assert "Revenue grew 26.4% in 2025." in content and content.endswith("You're welcome!")
    content, calls = reply([*STARTED, user("is it done?"), *answered])  # already told: no poll of its own
    assert not calls and "Revenue grew 26.4% in 2025." in content
    failed = news("123", state="TERMINATED FAILED", error="Genie space 'x' can't be used")
    message = stand_in_reply({"messages": [*STARTED, user("top 3 products by revenue"), *failed],
                              "tools": PRIMARY})["choices"][0]["message"]
    assert "Genie space 'x' can't be used" in message["content"]  # said, with the new question's job started
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["start_databricks_job"]


@pytest.mark.parametrize("text", ["What was the revenue growth in 2025?", "top 5 products by revenue",
                                  "how many cancelled orders were there?", "Hi! What were sales by region?"])
def test_primary_starts_a_job_for_a_data_question(text):
    content, calls = reply([SYSTEM, user(text)])
    assert content is None and calls == [("start_databricks_job", {"request": text})]


@pytest.mark.parametrize("text, run_id", [("is run 42 done?", "42"), ("status of 17", "17"),
                                          ("any update on run local-1a2b?", "local-1a2b")])
def test_primary_polls_the_run_the_user_names(text, run_id):
    assert reply([*STARTED, user(text)]) == (None, [("poll_databricks_job", {"run_id": run_id})])


@pytest.mark.parametrize("text", ["is it done?", "What's the status?", "any update?", "check please",
                                  "what's the progress of my revenue question?"])
def test_primary_polls_the_latest_run_mentioned_earlier(text):
    assert reply([*STARTED, user(text)]) == (None, [("poll_databricks_job", {"run_id": "123"})])
    later = [*STARTED, user("and orders by month?"),
             tool_call("start_databricks_job", {"request": "and orders by month?"}, "c2"),
             tool_result("c2", '{"run_id": "124"}'), user("top customers?")]
    assert reply([*later, user(text)])[1] == [("poll_databricks_job", {"run_id": "124"})]
    said = [SYSTEM, user("hi"), {"role": "assistant", "content": "Run 31 is RUNNING, with 2 steps logged."}]
    assert reply([*said, user(text)])[1] == [("poll_databricks_job", {"run_id": "31"})]


def test_primary_asks_which_run_when_there_is_none():
    content, calls = reply([{"role": "system", "content": 'Poll with the run id, e.g. "run_id": "123".'},
                            user("is it done?")])
    assert not calls and "Which run" in content
    content, calls = reply([SYSTEM, user("cancel it")])
    assert not calls and "Which run should I cancel" in content


@pytest.mark.parametrize("text, run_id", [("cancel it", "123"), ("Stop run 8", "8"), ("abort", "123"),
                                          ("please terminate the job", "123")])
def test_primary_cancels(text, run_id):
    assert reply([*STARTED, user(text)]) == (None, [("terminate_databricks_job", {"run_id": run_id})])


def test_primary_asks_to_clarify_anything_else():
    content, calls = reply([SYSTEM, user("blorp")])
    assert not calls and "What would you like to know?" in content and "stand-in" in content


def test_primary_relays_a_poll_result():
    poll = {"run_id": "123", "state": "TERMINATED", "result_state": "SUCCESS",
            "steps": [{"step": i, "status": s} for i, s in enumerate(
                ["started", "tool_call", "tool_result", "completed"], 1)],
            "answer": "Revenue grew 26.4% in 2025."}
    messages = [*STARTED, user("is it done?"), tool_call("poll_databricks_job", {"run_id": "123"}, "c2"),
                tool_result("c2", json.dumps(poll))]
    content, calls = reply(messages)
    assert not calls
    assert "Run 123 is TERMINATED" in content and "4 steps" in content and "Revenue grew 26.4% in 2025." in content
    failed = {"run_id": 123, "state": "FAILED", "steps": 3, "error": "Genie space 'x' can't be used"}
    content, _ = reply([*messages[:-1], tool_result("c2", json.dumps(failed))])
    assert "FAILED" in content and "3 steps" in content and "Genie space 'x' can't be used" in content
    cancelled = {"run_id": "123", "state": "TERMINATED (CANCELED)", "steps": 2, "cancelled": "SIGTERM"}
    content, _ = reply([*messages[:-1], tool_result("c2", json.dumps(cancelled))])
    assert "TERMINATED (CANCELED)" in content and "Cancelled: SIGTERM" in content
    queued = {"run_id": "123", "state": "QUEUED", "steps": 0, "queued": "MAX_CONCURRENT_RUNS_REACHED: Queued."}
    content, _ = reply([*messages[:-1], tool_result("c2", json.dumps(queued))])
    assert "Run 123 is QUEUED" in content and "Queued: MAX_CONCURRENT_RUNS_REACHED: Queued." in content


def test_primary_relays_start_terminate_and_errors():
    start = [SYSTEM, user("top products"), tool_call("start_databricks_job", {"request": "top products"}, "s"),
             tool_result("s", '{"run_id": "12"}')]
    content, _ = reply(start)
    assert "run 12" in content and "is it done?" in content
    stop = [*start, user("cancel"), tool_call("terminate_databricks_job", {"run_id": "12"}, "t"),
            tool_result("t", '{"run_id": "12", "state": "TERMINATING"}')]
    content, _ = reply(stop)
    assert "cancel run 12" in content and "TERMINATING" in content
    content, calls = reply([*stop[:-1], tool_result("t", "Error: run 12 does not exist.")])
    assert not calls and "did not work" in content and "run 12 does not exist." in content


GENIE_OUTPUT = ("Genie: Total revenue in 2025: $735,672.70.\n\nSQL:\nselect sum(o.amount) as revenue\n"
                "from sample.orders o\n\nRows (1 in all):\nrevenue\n735672.70")


def test_worker_asks_genie_then_restates_its_answer_with_the_table():
    request = [{"role": "system", "content": "You are a data analyst."}, user("total revenue in 2025")]
    content, calls = reply(request, WORKER)
    assert content is None and calls == [("query_genie", {"question": "total revenue in 2025"})]
    content, calls = reply([*request, tool_call("query_genie", calls[0][1], "g1"),
                            tool_result("g1", GENIE_OUTPUT)], WORKER)
    assert not calls
    assert content == "Total revenue in 2025: $735,672.70.\n\nRows (1 in all):\nrevenue\n735672.70"


def test_worker_restates_an_answer_without_genie_s_suggestions():
    request = [user("total revenue in 2025"), tool_call("query_genie", {"question": "total revenue"}, "g1"),
               tool_result("g1", GENIE_OUTPUT + "\n\nGenie suggests asking next: And by month? | What about 2024?")]
    content, _ = reply(request, WORKER)
    assert content == "Total revenue in 2025: $735,672.70.\n\nRows (1 in all):\nrevenue\n735672.70"


def test_worker_splits_two_questions_and_answers_both():
    request = [user("top 3 products by revenue and also orders by month in 2025")]
    content, calls = reply(request, WORKER)
    assert [a["question"] for _, a in calls] == ["top 3 products by revenue?", "orders by month in 2025?"]
    first, second = (f"call_{i}" for i in range(2))
    messages = [*request, {"role": "assistant", "content": None, "tool_calls": [
        {"id": first, "type": "function", "function": {"name": "query_genie", "arguments": "{}"}},
        {"id": second, "type": "function", "function": {"name": "query_genie", "arguments": "{}"}}]},
        tool_result(first, GENIE_OUTPUT), tool_result(second, "Error: Genie could not answer: no such thing.")]
    content, _ = reply(messages, WORKER)
    assert "$735,672.70" in content and "I could not get the data: Genie could not answer: no such thing." in content


def test_worker_reports_an_error_result():
    messages = [user("weather?"), tool_call("query_genie", {"question": "weather?"}, "g"),
                tool_result("g", "Error: Genie could not answer: I can answer questions about the sample data.")]
    content, calls = reply(messages, WORKER)
    assert not calls and content.startswith("I could not get the data: Genie could not answer: I can answer")


def test_plain_chat_echoes_and_accepts_content_parts():
    content, calls = reply([user([{"type": "text", "text": "Say something"}])], None)
    assert not calls and content == "(offline stand-in model) You said: Say something"


# ---------------------------------------------------------------- with the real tool loop

class InProcess:
    """The chat client interface, answered by stand_in_reply (the emulator serves it over HTTP)."""

    def complete(self, messages, *, tools=None, **kw):
        return stand_in_reply({"messages": messages, "tools": tools})["choices"][0]["message"]


def test_worker_loop_with_the_offline_genie(genie):
    from genie import Answer, render, table
    from llm import Tool, run_tools

    def query_genie(question):
        result = genie.answer(question)
        columns = [c["name"] for c in result.columns]
        return render(Answer(question, status="COMPLETED", text=result.text, query=result.sql, columns=columns,
                             row_count=len(result.rows), table=table(columns, result.rows, 6000)))

    tool = Tool("query_genie", "Ask Genie.", WORKER[0]["function"]["parameters"], query_genie)
    answer = run_tools(InProcess(), [user("revenue by quarter in 2025")], [tool], max_calls=3)
    quarters = grouped("revenue", "quarter", 2025)
    assert "Revenue by quarter in 2025: 4 rows" in answer
    assert all(f"{q} | {v}" in answer for q, v in quarters.items())


def test_primary_walk_through_with_the_tool_loop():
    from llm import Tool, run_tools

    runs, calls = [], []

    def start(request):
        runs.append(request)
        calls.append(("start", request))
        return {"run_id": str(len(runs)), "state": "PENDING"}

    def poll(run_id):
        calls.append(("poll", run_id))
        return {"run_id": run_id, "state": "TERMINATED", "steps": [{}, {}, {}, {}], "answer": "It is $1."}

    def terminate(run_id):
        calls.append(("terminate", run_id))
        return {"run_id": run_id, "state": "TERMINATING"}

    tools = [Tool(t["function"]["name"], "", t["function"]["parameters"], fn)
             for t, fn in zip(PRIMARY, (start, poll, terminate))]
    messages = [SYSTEM]

    def turn(text):
        messages.append(user(text))
        return run_tools(InProcess(), messages, tools, max_calls=3)

    assert "stand-in" in turn("hello")
    assert "run 1" in turn("What was total revenue in 2025?")
    assert "It is $1." in turn("is it done?")
    assert "run 2" in turn("and top 3 products by orders")  # a follow-up: sent with the request it follows
    assert "cancel run 2" in turn("cancel it")
    assert "run 3" in turn("top 5 customers by revenue")  # not a follow-up: sent as it is
    assert calls == [("start", "What was total revenue in 2025?"), ("poll", "1"),
                     ("start", "What was total revenue in 2025? and also top 3 products by orders"),
                     ("terminate", "2"), ("start", "top 5 customers by revenue")]


def test_a_follow_up_across_turns_is_answered_in_one_genie_conversation(sample_dsn):
    """'what about 2024?' after a job about 2025: the worker asks Genie both, the second as a follow-up."""
    started = [SYSTEM, user("total revenue in 2025"),
               tool_call("start_databricks_job", {"request": "total revenue in 2025"}, "c1"),
               tool_result("c1", json.dumps({"run_id": 7})), {"role": "assistant", "content": "Started run 7."}]
    _, calls = reply([*started, user("what about 2024?")])
    assert calls == [("start_databricks_job", {"request": "total revenue in 2025 and also what about 2024?"})]
    _, asks = reply([SYSTEM, user(calls[0][1]["request"])], tools=WORKER)
    questions = [arguments["question"] for _, arguments in asks]
    assert questions == ["total revenue in 2025?", "what about 2024?"]
    genie = GenieAnswerer(sample_dsn)
    answers = [genie.answer(question, questions[:i]) for i, question in enumerate(questions)]
    assert [[num(r[0]) for r in a.rows] for a in answers] == [[measure("revenue", in_year(2025))],
                                                               [measure("revenue", in_year(2024))]]
