-- lakebase_grants.sql: the Postgres roles and privileges the async agent needs in its Lakebase database.
--
-- Two Databricks identities connect to the database, each as the Postgres role named after it:
--
--   app_role     The primary agent. On Model Serving this is the service principal whose OAuth secret the
--                endpoint uses (role name = its application id, a UUID). In a terminal it is you (your email).
--                Needs: read and write threads, thread_messages, thread_runs and thread_items, read task_logs.
--   worker_role  The job's run-as identity, which runs worker.py: you with the dev target, or the job's
--                run_as service principal. Needs only: read and insert task_logs, read schema_migrations.
--                Defaults to app_role. One identity for both is the simplest setup (see "Ownership" below).
--
-- Both processes call lakebase.migrate() when they start. CREATE TABLE IF NOT EXISTS needs CREATE on the
-- schema even when the table already exists, so both roles get USAGE and CREATE on the schema. The primary
-- has to be running before it can start a job run, so in practice the primary migrates first: its role
-- creates the tables and owns them.
--
-- Who runs this: a Databricks identity that can create roles in the database, such as the Lakebase
-- instance or project owner (a member of databricks_superuser). Log in with an OAuth token, because a
-- native Postgres password role cannot create Databricks roles. With Databricks CLI 0.285 or newer:
--
--   databricks psql <instance name> -- -v app_role=<application id or email> \
--       -v worker_role=<application id or email> -f lakebase_grants.sql
--   (Lakebase Autoscaling: databricks psql projects/<p>/branches/<b>/endpoints/<e> -- -v ... -f ...)
--
-- Optional: -v schema=<name> if lakebase.py is configured for a schema other than public.
-- Run it once before the first start, so that both roles can connect, and again after the primary has
-- started once (and after each release that adds tables): grants on tables only reach tables that exist.
-- Running it again is always safe. psql only: the Lakebase SQL editor does not understand \if or :'variables'.
--
-- Ownership. The role that creates a table owns it, and only the owner (or a member of the owner's role) can
-- grant on it or change it. So if your admin role may not grant on the app role's tables, the script warns
-- about those statements, applies the rest and names the role that can finish: run it again as that role
-- (databricks psql ... --profile <that service principal's profile>). With one identity for both processes
-- none of this matters: it owns everything it needs. With two, deploy the agent (python primary.py deploy)
-- before `databricks bundle deploy` when a release adds a migration. Otherwise the worker may apply the
-- migration first and fail on a table that the primary's role owns.

\set ON_ERROR_STOP on

\if :{?app_role}
\else
DO $$ BEGIN RAISE EXCEPTION 'lakebase_grants.sql needs -v app_role=<service principal application id, or email>'; END $$;
\endif
\if :{?worker_role}
\else
\set worker_role :app_role
\endif
\if :{?schema}
\else
\set schema public
\endif

-- 1. A Postgres role for each Databricks identity, which logs in with an OAuth token as its password. An email
--    is a USER and anything else is a SERVICE_PRINCIPAL's application id. databricks_create_role fails for
--    a role that already exists, so existing roles are skipped.
CREATE EXTENSION IF NOT EXISTS databricks_auth;

SELECT databricks_create_role(name, CASE WHEN name LIKE '%@%' THEN 'USER' ELSE 'SERVICE_PRINCIPAL' END) AS created
  FROM (SELECT DISTINCT unnest(ARRAY[:'app_role', :'worker_role']) AS name) AS identities
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = identities.name);

-- 2. The privileges, each statement on its own: one the current role may not run is reported as a WARNING and
--    the rest still apply. So an admin who does not own the tables can run this, and so can the tables'
--    owner (the app role) to finish what the admin could not.
SET agent_grants.app_role = :'app_role';
SET agent_grants.worker_role = :'worker_role';
SET agent_grants.schema = :'schema';

DO $$
DECLARE
    app    text := current_setting('agent_grants.app_role');
    worker text := current_setting('agent_grants.worker_role');
    s      text := current_setting('agent_grants.schema');
    todo   text[] := '{}';  -- statements still to run ...
    runner text[] := '{}';  -- ... and the role that can run each one
    left_for text[] := '{}';
    t record;
    i int;
BEGIN
    IF to_regnamespace(s) IS NULL THEN
        todo := todo || format('CREATE SCHEMA %I', s);
        runner := runner || 'the database owner'::text;
    END IF;
    -- Both processes connect, and both run the migrations, which need CREATE on the schema.
    IF NOT (has_database_privilege(app, current_database(), 'CONNECT')
            AND has_database_privilege(worker, current_database(), 'CONNECT')) THEN
        todo := todo || format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), app, worker);
        runner := runner || 'the database owner'::text;
    END IF;
    IF to_regnamespace(s) IS NULL OR NOT (
            has_schema_privilege(app, s, 'USAGE') AND has_schema_privilege(app, s, 'CREATE')
            AND has_schema_privilege(worker, s, 'USAGE') AND has_schema_privilege(worker, s, 'CREATE')) THEN
        todo := todo || format('GRANT USAGE, CREATE ON SCHEMA %I TO %I, %I', s, app, worker);
        runner := runner || 'the database owner'::text;
    END IF;
    -- The tables that exist now, each privilege a role lacks. Their owner (normally the app role) has them all.
    FOR t IN
        SELECT g.*, pg_get_userbyid(c.relowner) AS owner
          FROM (VALUES
                ('threads',           'SELECT, INSERT, UPDATE, DELETE', app),
                ('thread_messages',   'SELECT, INSERT, UPDATE, DELETE', app),
                ('thread_runs',       'SELECT, INSERT, UPDATE, DELETE', app),
                ('thread_items',      'SELECT, INSERT, UPDATE, DELETE', app),
                ('task_logs',         'SELECT',                         app),
                ('schema_migrations', 'SELECT, INSERT',                 app),
                ('task_logs',         'SELECT, INSERT',                 worker),
                ('schema_migrations', 'SELECT, INSERT',                 worker)) AS g(tbl, privileges, grantee)
          JOIN pg_class AS c ON c.relnamespace = to_regnamespace(s) AND c.relname = g.tbl
         WHERE NOT (SELECT bool_and(has_table_privilege(g.grantee, c.oid, privilege))
                      FROM unnest(string_to_array(g.privileges, ', ')) AS privilege)
    LOOP
        todo := todo || format('GRANT %s ON %I.%I TO %I', t.privileges, s, t.tbl, t.grantee);
        runner := runner || t.owner::text;
    END LOOP;
    -- Tables created later. When the worker applies a new migration before the primary does, it owns the new
    -- tables: the primary gets full use of them. There is no default the other way round, because it would
    -- give the worker every future table of the primary. Tables the primary adds that the worker needs are
    -- granted by running this script again.
    IF worker <> app AND NOT EXISTS (
            SELECT FROM pg_default_acl AS d, aclexplode(d.defaclacl) AS acl
             WHERE d.defaclrole = to_regrole(quote_ident(worker)) AND d.defaclnamespace = to_regnamespace(s)
               AND d.defaclobjtype = 'r' AND acl.grantee = to_regrole(quote_ident(app))) THEN
        todo := todo
            || format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I '
                      'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I', worker, s, app)
            || format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO %I',
                      worker, s, app);
        runner := runner || worker || worker;
    END IF;
    FOR i IN 1 .. coalesce(array_length(todo, 1), 0) LOOP
        BEGIN
            EXECUTE todo[i];
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'not applied: %: %', todo[i], SQLERRM;
            IF NOT runner[i] = ANY (left_for) THEN
                left_for := left_for || runner[i];
            END IF;
        END;
    END LOOP;
    IF cardinality(left_for) > 0 THEN
        RAISE WARNING 'Some privileges are not in place yet. Run this script again as: %',
                      array_to_string(left_for, ', ');
    END IF;
END $$;

-- 3. What each role can do now. No table rows means the tables do not exist yet: start the primary once, then
--    run this script again.
SELECT r.name AS role,
       has_database_privilege(r.name, current_database(), 'CONNECT') AS "connect",
       has_schema_privilege(r.name, :'schema', 'USAGE') AS "usage",
       has_schema_privilege(r.name, :'schema', 'CREATE') AS "create"
  FROM (SELECT DISTINCT unnest(ARRAY[:'app_role', :'worker_role']) AS name) AS r
 ORDER BY 1;

SELECT r.name AS role, c.relname AS "table",
       concat_ws(', ',
                 CASE WHEN has_table_privilege(r.name, c.oid, 'SELECT') THEN 'select' END,
                 CASE WHEN has_table_privilege(r.name, c.oid, 'INSERT') THEN 'insert' END,
                 CASE WHEN has_table_privilege(r.name, c.oid, 'UPDATE') THEN 'update' END,
                 CASE WHEN has_table_privilege(r.name, c.oid, 'DELETE') THEN 'delete' END) AS privileges
  FROM (SELECT DISTINCT unnest(ARRAY[:'app_role', :'worker_role']) AS name) AS r
 CROSS JOIN pg_class AS c
 WHERE c.relnamespace = to_regnamespace(:'schema') AND c.relkind IN ('r', 'p')
   AND c.relname IN ('threads', 'thread_messages', 'thread_runs', 'thread_items', 'task_logs', 'schema_migrations')
 ORDER BY 1, 2;
