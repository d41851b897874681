"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, started in
a temporary folder on a free port (``scripts/install-system-deps.sh`` installs it).

The server refuses to run as root, so as root it runs as the ``postgres`` user
(``runuser``). Where the package is missing the tests that need it skip and say why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.ports import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable_reason() -> str | None:
    """Why no server can be started here (None = it can)."""
    if _bin_dir() is None:
        return "PostgreSQL is not installed (Debian package postgresql; scripts/install-system-deps.sh)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: the PostgreSQL server refuses to run as root"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .[test])"
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throw-away server; yields the DSN of its ``postgres`` database."""
    bindir = _bin_dir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="tw-pg-"))
    data = root / "data"
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
    port = free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, env=env)
    log = root / "server.log"
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                          "-c synchronous_commit=off -c full_page_writes=off",
                    "start"], check=True, capture_output=True, env=env)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop"], capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_dsn: str) -> str:
    """A new empty database on the server; its DSN."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(server_dsn, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return server_dsn.rsplit("/", 1)[0] + "/" + name


try:
    import pytest
except ImportError:  # pragma: no cover - the tests always have pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def pg_server() -> Iterator[str]:
        """A PostgreSQL server for the session (skips, saying why, where none can run)."""
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        with postgres_server() as dsn:
            yield dsn

    @pytest.fixture
    def pg_dsn(pg_server: str) -> str:
        """A new, empty database for one test."""
        return fresh_database(pg_server)
