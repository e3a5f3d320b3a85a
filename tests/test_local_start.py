"""localws.start() on a shared machine: the data stays private, the embedded server's socket out of other users'
reach, and what start-up had to change is said in a line. As root, another user is played by `nobody`."""
import os
import pwd
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
