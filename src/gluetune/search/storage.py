"""The database behind `gluetune search --storage URL`: one Optuna study shared by the workers of
several machines (Optuna's RDBStorage: PostgreSQL, MySQL, SQLite).

- The URL's password is never printed: every message shows the URL with `***` (`masked`), and the
  search folder's `search.json` keeps the URL without it (`without_password`); the command hands
  the whole URL to its workers in their environment (`URL_ENV`), never on a command line.
- The first connection's errors are one line naming --storage and what to do: a wrong password,
  a missing database, a server that cannot be reached, a driver that is not installed.
- On PostgreSQL the commands of every machine take a server-side lock (an advisory lock, released
  by the server when its holder dies) around what must happen once: creating Optuna's tables and the
  study, enqueueing the space's points, and counting the budget before a worker asks for a trial
  (so all machines together run exactly `--trials`). On other databases a lost race of the table
  creation is retried and the budget is counted per machine.
- Workers record a heartbeat every `GLUETUNE_HEARTBEAT_S` seconds (default 30); a trial whose
  heartbeat is older than 4 of them is failed by the next worker that looks and enqueued again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import re
import time
import zlib

from ..errors import UserError, one_line

HEARTBEAT_ENV = "GLUETUNE_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 30.0
GRACE_HEARTBEATS = 4  # a trial silent for this many heartbeats is stale: failed and retried
URL_ENV = "GLUETUNE_SEARCH_STORAGE"  # the whole URL (password included), from the command to its workers
INSTALL_DRIVER = 'pip install "gluetune[search-db]"'
LOCK_TIMEOUT_S = 600
_LOCK_SPACE = 0x676C7475  # advisory locks: the first key ("gltu"), the second from the lock's name
_SCHEMA_LOCK = "optuna tables"
_UNREACHABLE = ("is the server running", "connection refused", "could not translate host name", "no such file or directory",
                "name or service not known", "timeout expired", "timed out", "can't connect", "network is unreachable",
                "no route to host", "connection is bad")


def heartbeat_seconds() -> float:
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{HEARTBEAT_ENV}={text!r}: expected a number of seconds above 0 (default {DEFAULT_HEARTBEAT_S:g})")
    return value


def grace_seconds() -> float:
    return GRACE_HEARTBEATS * heartbeat_seconds()


# ---------------------------------------------------------------- the URL


# scheme://user:password@ (a password with @, / or ? is written percent-encoded in a URL)
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):([^@/?#]+)@")


def masked(url: str) -> str:
    """The URL as it may be printed: its password shown as ***."""
    return _PASSWORD.sub(r"\1:***@", str(url))


def without_password(url: str) -> str:
    """The URL as search.json keeps it (a server that needs the password gets it from the command,
    or from PGPASSWORD / ~/.pgpass)."""
    return _PASSWORD.sub(r"\1@", str(url))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def with_driver(url: str) -> str:
    """`url` checked, with the driver gluetune[search-db] installs where the URL names none:
    `postgresql://` is SQLAlchemy's psycopg2; with only psycopg 3 installed it becomes
    `postgresql+psycopg://` (and Heroku's `postgres://` means `postgresql://`)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise UserError(f"--storage {masked(url)}: not a database URL; expected e.g. "
                        "postgresql://user:password@host:5432/database") from None
    scheme, rest = url.split("://", 1)
    if scheme == "postgres":
        scheme = "postgresql"
    if scheme == "postgresql" and not _importable("psycopg2") and _importable("psycopg"):
        scheme = "postgresql+psycopg"
    return f"{scheme}://{rest}"


def is_postgresql(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


# ---------------------------------------------------------------- errors


def storage_error(url: str, err: BaseException) -> UserError:
    """The first connection's failure as one line naming --storage and what to do (no password)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        user, database, password = parsed.username, parsed.database, parsed.password
    except Exception:  # noqa: BLE001
        user = database = password = None
    where = f"--storage {masked(url)}"
    chain, seen = [], err
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = one_line(err) or type(err).__name__
    if password:
        text = text.replace(password, "***")
    low = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, ImportError) for e in chain) or type(err).__name__ == "NoSuchModuleError":
        return UserError(f"{where}: the database driver is not installed ({text}); {INSTALL_DRIVER} installs psycopg "
                         "for postgresql:// URLs (MySQL: pip install PyMySQL, with mysql+pymysql://)")
    if "password authentication failed" in low or "access denied for user" in low or "no password supplied" in low:
        return UserError(f"{where}: the server refused the password of user '{user}'; put the right one in the URL "
                         "(user:password@host), or in PGPASSWORD or ~/.pgpass")
    if ("database" in low and "does not exist" in low) or "unknown database" in low:
        return UserError(f"{where}: the server has no database '{database}'; create it (createdb {database}, or "
                         f"CREATE DATABASE {database};) or name an existing one at the end of the URL")
    if any(marker in low for marker in _UNREACHABLE):
        return UserError(f"{where}: cannot reach the database server ({text}); start it, or check the host, port "
                         "and socket folder in the URL")
    return UserError(f"{where}: cannot open the study's database ({text})")


# ---------------------------------------------------------------- locks held on the server

_lock_engines: dict[str, object] = {}


def _lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) - 2**31  # a signed 32-bit key


@contextlib.contextmanager
def server_lock(url: str, name: str):
    """Held by one process of all machines at a time on PostgreSQL (an advisory lock named `name`,
    released by the server if its holder dies); on other databases no lock (the caller copes)."""
    if not is_postgresql(url):
        yield False
        return
    import sqlalchemy

    engine = _lock_engines.get(url)
    if engine is None:  # a connection per use: nothing is held between uses
        engine = _lock_engines[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT set_config('lock_timeout', :ms, false)"),
                           {"ms": str(LOCK_TIMEOUT_S * 1000)})
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:space, :key)"),
                           {"space": _LOCK_SPACE, "key": _lock_key(name)})
        try:
            yield True
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:space, :key)"),
                               {"space": _LOCK_SPACE, "key": _lock_key(name)})
            connection.commit()


def _race_errors() -> tuple[type[BaseException], ...]:
    """What two processes creating Optuna's tables (or one study) at once get: a duplicate type or
    table, a duplicate key (PostgreSQL: pg_type_typname_nsp_index, alembic_version)."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    return sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, StorageInternalError


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a wrong password, a missing database or driver, or an unreachable server raise."""
    import sqlalchemy.exc

    return sqlalchemy.exc.SQLAlchemyError, ImportError


def once(url: str, name: str, create, attempts: int = 5):
    """`create()` under the server lock `name` (PostgreSQL), retrying a lost race elsewhere; a
    connection failure becomes one line naming --storage."""
    for attempt in range(1, attempts + 1):
        try:
            with server_lock(url, name):
                return create()
        except _race_errors() as err:
            if attempt == attempts:
                raise storage_error(url, err) from None
            time.sleep(random.uniform(0.2, 0.6) * attempt)
        except _connection_errors() as err:
            raise storage_error(url, err) from None
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- Optuna's storage


def retry_callback_class():
    """Optuna's callback that enqueues a failed trial again (params, user attributes, retry history)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def open_rdb(url: str):
    """Optuna's RDBStorage on `url` with heartbeats, its tables created once whatever the number
    of machines starting at the same moment."""
    from optuna.storages import RDBStorage

    # Optuna 4.9 renamed the retry callback and RDBStorage's argument for it.
    callback = retry_callback_class()
    argument = "heartbeat_stale_trial_callback" if callback.__name__.startswith("RetryHeart") else "failed_trial_callback"
    beat = heartbeat_seconds()
    return once(url, _SCHEMA_LOCK, lambda: RDBStorage(
        url, heartbeat_interval=beat, grace_period=GRACE_HEARTBEATS * beat, engine_kwargs={"pool_pre_ping": True},
        **{argument: callback(max_retry=None)}))
