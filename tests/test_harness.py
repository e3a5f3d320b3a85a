"""The harness itself: a real server, and databases that do not leak between tests."""
import psycopg


def test_fresh_database_is_real_and_empty(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()[0] == 0
        conn.execute("create table leak(x int)")
        assert conn.info.server_version >= 140000


def test_next_database_does_not_see_the_last(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select to_regclass('public.leak')").fetchone()[0] is None
