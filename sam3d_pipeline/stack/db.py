"""PostgreSQL for the local stack (``sam3d-pipeline up --db postgres``): Prefect's production database, on one machine.

``LocalPostgres`` owns one PostgreSQL cluster in its own folder under the state dir (``<state dir>/postgres/``):

- ``prepare()`` finds Debian's server binaries (``initdb``, ``postgres``: on ``PATH``, else under
  ``/usr/lib/postgresql/<version>/bin``, the ``postgresql`` package; ``make postgres`` installs it), runs
  ``initdb`` once into ``postgres/data`` with a generated password (``postgres/password``, mode 0600;
  password login only, loopback only), and returns the ``postgres`` command line for a free loopback port.
  The stack starts that command as one of its processes (its PID in ``stack.json``, stopped by PID by
  ``down``; SIGTERM is PostgreSQL's "smart" shutdown: it exits once the Prefect server, stopped first, is gone).
- ``wait_ready()`` waits until the server accepts the password and creates the ``prefect`` database;
  ``url`` is Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL`` (``postgresql+asyncpg://``; asyncpg comes
  with Prefect).

PostgreSQL refuses to run as root. Started by root, the server and ``initdb`` run as the ``postgres`` account
(created by Debian's package), else as ``nobody``, through ``setpriv`` (util-linux): the data folder is handed
to that account, and the process keeps one capability, ``CAP_DAC_READ_SEARCH`` (read and traverse any
folder), so a state dir under a private folder such as ``/root`` or a 0700 temporary folder stays reachable.
Started by any other user, it runs as that user. A re-run of ``up`` reuses the cluster (Prefect's data
survives ``down``, as the SQLite file does); deleting ``<state dir>/postgres/`` starts afresh.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DB_NAME = "prefect"
DB_USER = "sam3d"
SERVER_ACCOUNTS = ("postgres", "nobody")
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresError(RuntimeError):
    """The local PostgreSQL could not be set up or did not answer; the message says why and what to do."""


def find_binary(name: str) -> Path:
    """``name`` (``initdb``, ``postgres``, ``pg_ctl``) on ``PATH``, else in the newest Debian ``postgresql`` folder.

    Raises:
        PostgresError: not installed (``make postgres`` installs Debian's ``postgresql``).
    """
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(glob.glob(DEBIAN_BIN_GLOB), key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                                   if x.isdigit()])
    for folder in reversed(versions):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PostgresError(f"{name} not found on PATH or under {DEBIAN_BIN_GLOB}: install PostgreSQL's server "
                        "(`make postgres`, or `apt-get install postgresql`)")


def installed() -> bool:
    """Whether this machine can run the stack's PostgreSQL: its server binaries and an account to run them as."""
    try:
        find_binary("postgres"), find_binary("initdb"), server_account()
    except PostgresError:
        return False
    return True


@dataclass(frozen=True)
class ServerAccount:
    """Who the PostgreSQL processes run as: ``prefix`` goes before their command line (empty: as ourselves)."""

    name: str
    uid: int
    gid: int
    prefix: tuple[str, ...] = ()


def server_account() -> ServerAccount:
    """Ourselves when not root; as root the ``postgres`` account (else ``nobody``) through ``setpriv``.

    Raises:
        PostgresError: root, but neither account exists, or ``setpriv`` is missing.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return ServerAccount(me.pw_name, me.pw_uid, me.pw_gid)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresError("running as root: PostgreSQL needs another account, and setpriv (util-linux) is missing")
    for name in SERVER_ACCOUNTS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        prefix = (setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
                  "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--")
        return ServerAccount(name, entry.pw_uid, entry.pw_gid, prefix)
    raise PostgresError(f"running as root: PostgreSQL refuses root, and none of the accounts {SERVER_ACCOUNTS} "
                        "exists to run it")


class LocalPostgres:
    """One PostgreSQL cluster under ``root`` (``<state dir>/postgres``) for the local stack's Prefect server.

    Args:
        root: the cluster's folder: ``data/`` (the cluster), ``password``.
        port: the loopback port the server listens on.
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root.resolve()
        self.data_dir = self.root / "data"
        self.password_file = self.root / "password"
        self.port = port

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        """``PREFECT_API_DATABASE_CONNECTION_URL`` for this server."""
        return f"postgresql+asyncpg://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"

    def prepare(self, timeout_s: float = 120.0) -> list[str]:
        """Initialise the cluster when there is none yet; return the command line that runs the server.

        Raises:
            PostgresError: binaries or account missing, or ``initdb`` failed (its output is quoted).
        """
        account = server_account()
        postgres = find_binary("postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(account, timeout_s)
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": "",
                    "max_connections": "200", "logging_collector": "off"}
        return [*account.prefix, str(postgres), "-D", str(self.data_dir),
                *(arg for name, value in settings.items() for arg in ("-c", f"{name}={value}"))]

    def _initdb(self, account: ServerAccount, timeout_s: float) -> None:
        initdb = find_binary("initdb")
        if self.data_dir.exists():  # a half-made cluster from an interrupted first start
            shutil.rmtree(self.data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(24) + "\n")
        for path in (self.data_dir, self.password_file):
            os.chown(path, account.uid, account.gid)
        argv = [*account.prefix, str(initdb), "-D", str(self.data_dir), "-U", DB_USER, "--auth=scram-sha-256",
                f"--pwfile={self.password_file}", "-E", "UTF8", "--locale=C", "--no-instructions"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=self.root)
        except subprocess.TimeoutExpired:
            raise PostgresError(f"initdb into {self.data_dir} did not finish within {timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise PostgresError(f"initdb into {self.data_dir} failed ({done.returncode}, as {account.name}): "
                                f"{(done.stdout + done.stderr)[-1500:]}")

    def wait_ready(self, timeout_s: float, log: Path, proc: subprocess.Popen | None = None) -> None:
        """Wait until the server accepts our password, then create the ``prefect`` database if missing.

        Raises:
            PostgresError: the server exited, or did not answer within ``timeout_s`` (see ``log``).
        """
        import asyncpg

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise PostgresError(f"PostgreSQL exited with status {proc.returncode}; see {log}")
            try:
                asyncio.run(self._create_database())
                return
            except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as exc:  # not listening, or starting up
                last = str(exc)
            except asyncpg.PostgresError as exc:
                raise PostgresError(f"PostgreSQL on port {self.port}: {exc}; see {log}") from None
            time.sleep(0.2)
        raise PostgresError(f"PostgreSQL did not answer on port {self.port} within {timeout_s:.0f} s ({last}); "
                            f"see {log}")

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=self.password,
                                     database="postgres", timeout=3)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME):
                await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        finally:
            await conn.close()
