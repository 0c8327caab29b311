"""A throwaway PostgreSQL server for the shared-queue tests (Debian's `postgresql` package).

`PgServer` runs initdb into a fresh temporary folder and `postgres` on a Unix socket in that folder
(no TCP port, so parallel runs never collide), with fsync off: the tests restart the server but never
crash the machine. PostgreSQL refuses to run as root, and the tests run as root here and in CI, so
as root the folder is handed to the unprivileged `nobody` user and every PostgreSQL program runs as
`nobody` through `runuser`. `scripts/install-postgres.sh` installs the package where it is missing;
without it the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb, else initdb's folder on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


class PgServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ember-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody", "nogroup")
            self._as_user = ["runuser", "-u", "nobody", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "ember", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip
        self.start()
        self._databases = 0

    def _run(self, program: str, *args: str) -> None:
        cmd = [*self._as_user, str(self.bindir / program), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr.strip()[-2000:]}\n{log}")

    def start(self) -> None:
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://ember@/{database}?host={self.root}"

    def new_database(self) -> str:
        """A fresh, empty database -> its URL (each test gets its own queue)."""
        import psycopg

        self._databases += 1
        name = f"t{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
