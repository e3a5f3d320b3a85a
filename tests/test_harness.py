"""The harness itself: a real server, and databases that do not leak into each other."""
import psycopg


def test_fresh_databases_are_real_empty_and_apart(pg_server, pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()[0] == 0
        assert conn.info.server_version >= 140000
        conn.execute("create table leak(x int)")  # committed when the block ends
    other = pg_server.fresh_database()  # made after the table was: it would have it if databases were shared
    try:
        with psycopg.connect(other) as conn:
            assert conn.execute("select to_regclass('public.leak')").fetchone()[0] is None
    finally:
        pg_server.drop_database(other)
