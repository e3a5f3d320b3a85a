"""The sample dataset of the local workspace: `sample_data/*.csv` loaded into Postgres schema `sample`.

`load_sample(conn)` loads it once (safe from two processes); the offline Genie (answerer.py) and a real model
writing SQL both read it there, logged in as the reader role of `reader_login(conn)`, which may read schema
`sample` and nothing else (call it after `load_sample`: a reload drops the role's grants). Orders run from
2024-01-01 to 2025-12-31.
"""
import hashlib
import logging
import secrets
from pathlib import Path

import psycopg
from psycopg.sql import SQL, Identifier, Literal

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "sample_data"
MARKER = "offline sample data"  # schema comment prefix: the schema is ours to reload
SCHEMA = """\
create table sample.customers (customer_id int primary key, name text not null unique, region text not null,
    segment text not null, signup_date date not null);
create table sample.products (product_id int primary key, name text not null unique, category text not null,
    unit_price numeric(10,2) not null check (unit_price > 0));
create table sample.orders (order_id int primary key,
    customer_id int not null references sample.customers, product_id int not null references sample.products,
    order_date date not null, quantity int not null check (quantity > 0), amount numeric(12,2) not null,
    status text not null check (status in ('completed', 'shipped', 'cancelled', 'returned')));
create index on sample.orders (order_date);"""
TABLES = {"customers": "customer_id, name, region, segment, signup_date",
          "products": "product_id, name, category, unit_price",
          "orders": "order_id, customer_id, product_id, order_date, quantity, amount, status"}


READER = "localws_genie_{oid}"  # the reader role: one per database (its password is kept in that database)


def load_sample(conn, data_dir=DATA_DIR) -> bool:
    """Create schema `sample` and load the CSVs unless this exact data is there; True if the data loaded now."""
    return _load(conn, data_dir)


def reader_login(conn) -> dict | None:
    """Create (or repair: grant it schema `sample` again) this database's reader role and return its login,
    `{"user", "password"}`; None if the role of `conn` may not create roles (then Genie's SQL can only run as that
    role).

    The role logs in, reads the tables of schema `sample` and can do nothing else: it is no superuser, has no
    grants elsewhere, and Postgres keeps server files, configuration, other sessions' SQL and their backends
    from such a role. Its random password is kept in `local_workspace.genie_login`, which only the role of
    `conn` reads, so two processes on one database share it."""
    try:
        return _reader_login(conn)
    except psycopg.errors.InsufficientPrivilege:
        return None


def _reader_login(conn):
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('local_workspace'))")  # jobs.py creates the schema too
        oid = conn.execute("select oid from pg_database where datname = current_database()").fetchone()[0]
        role = READER.format(oid=oid)
        conn.execute("create schema if not exists local_workspace")
        conn.execute("create table if not exists local_workspace.genie_login("
                     "role text primary key, password text not null)")
        conn.execute("insert into local_workspace.genie_login values (%s, %s) on conflict do nothing",
                     (role, secrets.token_urlsafe(24)))
        password = conn.execute("select password from local_workspace.genie_login where role = %s",
                                (role,)).fetchone()[0]
        powers = conn.execute("select rolsuper or rolcreaterole or rolcreatedb or rolreplication or rolbypassrls "
                              "from pg_roles where rolname = %s", (role,)).fetchone()
        if powers and powers[0]:
            raise RuntimeError(f"role {role} has more than reading schema sample; drop it, the next start makes it")
        create = "create role {} login nosuperuser nocreatedb nocreaterole noinherit noreplication nobypassrls"
        conn.execute(SQL((create if powers is None else "alter role {} login") + " password {}").format(
            Identifier(role), Literal(password)))
        if conn.execute("select 1 from pg_namespace where nspname = 'sample'").fetchone():
            conn.execute(SQL("grant usage on schema sample to {0}; grant select on all tables in schema sample to {0}")
                         .format(Identifier(role)))
    return {"user": role, "password": password}


def _load(conn, data_dir):
    files = {t: (Path(data_dir) / f"{t}.csv").read_bytes() for t in TABLES}
    marker = f"{MARKER} {hashlib.sha256(b''.join(files.values())).hexdigest()[:16]}"
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('offline.load_sample'))")  # a second loader waits
        row = conn.execute("select obj_description(oid, 'pg_namespace') from pg_namespace "
                           "where nspname = 'sample'").fetchone()
        if row and row[0] == marker:
            return False
        if row and not (row[0] or "").startswith(MARKER):
            raise RuntimeError("schema 'sample' exists and was not made by localws.sample.load_sample; "
                               "drop or rename it, or use another database")
        if row:
            log.info("sample data changed: reloading schema sample")
            conn.execute("drop schema sample cascade")
        conn.execute("create schema sample")
        for statement in SCHEMA.split(";\n"):
            conn.execute(statement)
        with conn.cursor() as cur:
            for table, columns in TABLES.items():  # parents first, for the foreign keys
                with cur.copy(f"copy sample.{table} ({columns}) from stdin with (format csv, header true)") as copy:
                    copy.write(files[table])
        conn.execute(psycopg.sql.SQL("comment on schema sample is {}").format(psycopg.sql.Literal(marker)))
    log.info("loaded the sample data into schema sample")
    return True
