"""localws.start() on a shared machine: the data stays private, the embedded server's socket out of other users'
reach, and what start-up had to change is said in a line. As root, another user is played by `nobody`."""
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import psycopg
import pytest
from helpers import ROOT, wait_ended, workspace

import localws

AS_ROOT = os.geteuid() == 0


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def connects_as_nobody(path) -> bool:
    """Whether user nobody can connect to the unix socket at `path`, from a child process that becomes nobody."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # only system calls here: the child of a threaded process
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def test_the_data_directory_and_run_logs_are_private(scratch):
    data_dir = scratch / "data"
    (data_dir / "runs").mkdir(parents=True)
    for d in (data_dir, data_dir / "runs"):  # as an older version left them
        d.chmod(0o755)
    said = []
    with localws.start(ROOT, data_dir=data_dir, say=said.append) as ws:
        job_id = ws.emulator.add_job({"name": "fake", "tasks": [{"task_key": "t", "spark_python_task": {
            "python_file": "tests/fixtures/fake_worker.py"}}]})
        w = workspace(ws.emulator)
        run_id = w.jobs.run_now(job_id).run_id
        wait_ended(w, run_id)
        logs = sorted(ws.emulator.log_dir.glob(f"run-{run_id}.*"))
        assert [p.name for p in logs] == [f"run-{run_id}.stderr", f"run-{run_id}.stdout"]
        assert {mode(p) for p in logs} == {0o600}
        assert mode(ws.emulator.log_dir) == mode(data_dir / "runs") == mode(data_dir / "pgdata") == 0o700
        # the server's own user passes through the data directory as root (by group: ours), nobody else
        assert mode(data_dir) == (0o710 if AS_ROOT else 0o700)
    assert [line for line in said if "private" in line] == [
        f"note: made {d} private to you (its mode was 755, now {now})"
        for d, now in ((data_dir, "710" if AS_ROOT else "700"), (data_dir / "runs", "700"))]


def test_the_socket_is_out_of_other_users_reach_and_the_parents_are_not_opened(scratch):
    home = scratch / "home"
    home.mkdir(mode=0o700)
    too_long = home / ("d" * 100)  # for a socket in pgdata: the package would put it in a shared directory
    parents = {d: mode(d) for d in too_long.parents}
    said = []
    if AS_ROOT:  # where the package makes that directory world-writable
        with pytest.raises(localws.StartError, match="too long for the embedded Postgres's socket.*shorter --data-dir"):
            localws.start(ROOT, data_dir=too_long, say=said.append)
    data_dir = home / "data" if AS_ROOT else too_long
    with localws.start(ROOT, data_dir=data_dir, say=said.append) as ws:
        socket_file = Path(psycopg.conninfo.conninfo_to_dict(ws.dsn)["host"]) / ".s.PGSQL.5432"
        closed = [d for d in socket_file.parents if d.stat().st_uid in (os.geteuid(), ws.postgres.pgdata.stat().st_uid)
                  and mode(d) & 0o007 == 0]
        assert closed, f"some directory on the way to {socket_file} must keep others out"
        with psycopg.connect(ws.dsn) as conn:  # we can
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        if AS_ROOT:
            assert not connects_as_nobody(socket_file)
            control = Path(tempfile.mkdtemp(prefix="local-start-open-"))
            try:
                control.chmod(0o777)
                with socket.socket(socket.AF_UNIX) as listener:  # the check itself works: nobody reaches this one
                    listener.bind(str(control / "s"))
                    os.chmod(control / "s", 0o777)
                    listener.listen()
                    assert connects_as_nobody(control / "s")
            finally:
                shutil.rmtree(control)
    for d, before in parents.items():  # at most a pass-through bit more, never read or write for others
        assert mode(d) & ~before & ~0o011 == 0, (d, oct(before), oct(mode(d)))
    if AS_ROOT:
        assert mode(home) == 0o710
        (line,) = [line for line in said if "passed through" in line]
        assert line.startswith("note: as root, the embedded Postgres runs as system user embedded_postgres;")
        assert line.endswith(f"{home} (group root), {data_dir} (group root)")


def a_project(tmp_path, **files) -> Path:
    """A copy of this project's bundle (databricks.yml, job.yml) with `files` (name: text) written over it."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("databricks.yml", "job.yml"):
        shutil.copy(ROOT / name, project / name)
    for name, text in files.items():
        (project / name.replace("_", ".")).write_text(text)
    return project


BROKEN_BUNDLES = {  # file: text -> what the one line says
    "not YAML": ({"job_yml": "resources:\n  jobs:\n    w: [unclosed\n"}, r"job\.yml is not valid YAML at line 4"),
    "a variable without a default": (
        {"job_yml": "resources: {jobs: {w: {name: '${var.warehouse}', tasks: [{task_key: t}]}}}"},
        r"job\.yml: the job uses \$\{var\.warehouse\}, which has no default in databricks\.yml's variables"),
    "two jobs": ({"job_yml": "resources: {jobs: {a: {name: a}, b: {name: b}}}"}, r"defines 2 jobs: a, b"),
    "resources not a mapping": ({"job_yml": "resources: [jobs]"}, r"job\.yml: resources\.jobs must map"),
    "no python_file": ({"job_yml": "resources: {jobs: {w: {tasks: [{task_key: t}]}}}"},
                       r"job\.yml: the job's first task needs spark_python_task\.python_file"),
    "a text file": ({"databricks_yml": "just words"}, r"databricks\.yml must be a mapping of keys"),
}


@pytest.mark.parametrize("files, says", BROKEN_BUNDLES.values(), ids=BROKEN_BUNDLES.keys())
def test_a_broken_bundle_is_one_line_naming_the_file(tmp_path, pg_dsn, files, says):
    with pytest.raises(localws.StartError, match=r"the local workspace can't run the bundle's job: .*" + says) as e:
        localws.start(a_project(tmp_path, **files), data_dir=tmp_path / "data", dsn=pg_dsn)
    assert "\n" not in str(e.value)


def test_a_missing_bundle_is_one_line(tmp_path, pg_dsn):
    (tmp_path / "project").mkdir()
    with pytest.raises(localws.StartError, match=r"can't read .*databricks\.yml: No such file or directory"):
        localws.start(tmp_path / "project", data_dir=tmp_path / "data", dsn=pg_dsn)


def test_a_data_directory_that_can_not_be_ours_is_refused_and_left_as_it_is(tmp_path, pg_dsn):
    (tmp_path / "a-file").write_text("not a directory")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp is
    refusals = {tmp_path / "a-file": "is a file, not a directory: choose another --data-dir",
                Path("/proc/nope"): r"can't be made \(.*\): choose another --data-dir",
                shared: r"is shared \(its sticky bit is set\): choose a directory of your own as --data-dir"}
    if AS_ROOT:  # another user's directory, which root could change
        others = tmp_path / "others"
        others.mkdir(mode=0o755)
        os.chown(others, pwd.getpwnam("nobody").pw_uid, -1)
        refusals[others] = r"is another user's: choose a directory of your own"
    for data_dir, says in refusals.items():
        before = os.stat(data_dir).st_mode if data_dir.exists() else None
        with pytest.raises(localws.StartError, match=f"the data directory {re.escape(str(data_dir))} {says}"):
            localws.start(ROOT, data_dir=data_dir, dsn=pg_dsn)
        assert (os.stat(data_dir).st_mode if data_dir.exists() else None) == before


def test_a_run_log_directory_that_can_not_be_made_is_one_line(tmp_path, pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # this database's run logs go to runs/<its store key>
        conn.execute("create schema local_workspace; create table local_workspace.store(key text not null); "
                     "insert into local_workspace.store values ('taken')")
    (tmp_path / "data" / "runs").mkdir(parents=True)
    (tmp_path / "data" / "runs" / "taken").write_text("a file where the run logs go")
    with pytest.raises(localws.StartError, match=r"did not start: .*runs/taken: File exists; fix that, or choose"):
        localws.start(ROOT, data_dir=tmp_path / "data", dsn=pg_dsn)
