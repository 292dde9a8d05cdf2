"""Where studies live: a storage URL (or path) -> an Optuna storage, with errors that say what to do.

Accepted forms:

- ``sqlite:///runs/study.db`` (relative to the working directory; ``sqlite:////abs/study.db``
  absolute): the default. The database's folder is created. SQLite locks the whole file on
  writes; several worker processes on one file wait for each other up to a busy timeout (60 s
  here unless the URL sets ``?timeout=``) instead of failing with "database is locked".
- any SQLAlchemy URL of a server, e.g. ``postgresql://user:pw@host/db`` (driver: ``pip install
  'psycopg[binary]'`` or ``psycopg2-binary``; a bare ``postgresql://`` uses whichever is
  installed) or ``mysql+pymysql://...``: many workers on many machines.
- a journal file: ``journal:///runs/study.log`` (same slash rule as SQLite) or a plain path ending
  in ``.log``/``.journal``: Optuna's ``JournalStorage`` on a ``JournalFileBackend``: an
  append-only log with file locks, the recommended storage for several processes on one machine.
- an ``optuna.storages.BaseStorage`` instance, used as it is.

Interrupted trials: a process killed while a trial runs (SIGKILL, power loss) cannot tell the
storage, so Optuna leaves that trial ``RUNNING``; finished trials are never touched (each update
is one committed transaction or one appended log line). RDB storages opened here record a
heartbeat every ``heartbeat_interval`` seconds, and the next ``study.optimize`` of any worker marks
trials whose heartbeat is older than ``grace_period`` as ``FAIL`` (Optuna's ``fail_stale_trials``).
Journal storages have no heartbeat in Optuna: :func:`fail_running_trials` marks every
``RUNNING`` trial ``FAIL`` (call it only when no other process works on the study).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["open_storage", "resolve_storage", "default_storage", "storage_label", "dashboard_command", "fail_running_trials"]

JOURNAL_SUFFIXES = (".log", ".journal")
SQLITE_TIMEOUT_S = 60
_DRIVERS = {
    "postgresql": "pip install 'psycopg[binary]' (or nni-elastic[postgres]), or psycopg2-binary",
    "mysql": "pip install PyMySQL and use mysql+pymysql://...",
}


def default_storage(study_name: str) -> str:
    """``sqlite:///runs/<study_name>.db``."""
    return f"sqlite:///runs/{study_name}.db"


def resolve_storage(storage: str, base: Path) -> str:
    """A storage URL or path with ``~`` expanded and relative file paths anchored at ``base``.

    ``sqlite:///rel.db`` and ``journal:///rel.log`` become absolute; a plain path is a journal when it
    ends in ``.log``/``.journal``, else SQLite; server URLs stay as they are.
    """
    for prefix in ("sqlite:///", "journal:///"):
        if storage.startswith(prefix) and not storage.startswith(prefix + "/"):
            path = Path(os.path.expanduser(storage[len(prefix):]))
            return f"{prefix}{path if path.is_absolute() else base / path}"
    if "://" not in storage:
        path = Path(os.path.expanduser(storage))
        path = path if path.is_absolute() else base / path
        return str(path) if path.suffix in JOURNAL_SUFFIXES else f"sqlite:///{path}"
    return storage


def _is_journal(storage: str) -> bool:
    return storage.startswith("journal:") or ("://" not in storage and storage.endswith(JOURNAL_SUFFIXES))


def _journal_path(storage: str) -> Path:
    if storage.startswith("journal:"):
        rest = storage[len("journal:"):]
        if not rest.startswith("///"):
            raise ValueError(f"storage {storage!r}: write a journal file as journal:///relative/path.log or "
                             f"journal:////absolute/path.log")
        return Path(rest[3:])
    return Path(storage)


def storage_label(storage: Union[str, os.PathLike, Any]) -> str:
    """The storage as text for messages, with any password hidden."""
    if not isinstance(storage, (str, os.PathLike)):
        return type(storage).__name__
    text = os.fspath(storage)
    if "://" in text and not text.startswith("journal:"):
        try:
            from sqlalchemy.engine import make_url

            return make_url(text).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy understands: shown as given
            return text
    return text


def dashboard_command(storage: Union[str, os.PathLike, Any]) -> Optional[str]:
    """The ``optuna-dashboard`` command line that opens this storage (None for in-memory storages)."""
    if not isinstance(storage, (str, os.PathLike)):
        return None
    text = os.fspath(storage)
    return f"optuna-dashboard {_journal_path(text) if _is_journal(text) else storage_label(text)}"


def _unreachable(storage: str, exc: BaseException) -> ValueError:
    label = storage_label(storage)
    dialect = label.split(":", 1)[0].split("+", 1)[0]
    if isinstance(exc, ImportError) and dialect in _DRIVERS:
        hint = f"the {dialect} driver is missing: {_DRIVERS[dialect]}"
    else:
        hint = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return ValueError(
        f"cannot open the Optuna storage {label!r} ({hint}). Check that the server is running and the URL is "
        f"right, or use a local storage: sqlite:///runs/study.db, or journal:///runs/study.log for several "
        f"processes on one machine"
    )


def _with_postgres_driver(url: Any) -> str:
    """A bare ``postgresql://`` URL with a driver that is installed: SQLAlchemy 2.1 defaults to
    psycopg 3, 2.0 to psycopg2; either works once named (``postgresql+psycopg://``)."""
    text = url.render_as_string(hide_password=False)
    if url.drivername != "postgresql":
        return text
    import importlib.util

    for driver in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(driver) is not None:
            return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    return text  # SQLAlchemy reports the missing driver


def open_storage(
    storage: Union[str, os.PathLike, "optuna.storages.BaseStorage", None],
    *,
    heartbeat_interval: Optional[int] = 60,
    grace_period: Optional[int] = None,
) -> Optional["optuna.storages.BaseStorage"]:
    """An Optuna storage for a URL, a journal path or a storage object (None stays None: in memory).

    Args:
        storage: see the module docstring for the accepted forms.
        heartbeat_interval: seconds between heartbeats of running trials (RDB storages; None: off).
        grace_period: seconds without heartbeat after which a running trial counts as dead
            (default: twice the interval).

    Raises:
        ValueError: the storage cannot be opened (server unreachable, driver missing, bad URL);
            the message names the URL (password hidden) and suggests a local storage.
    """
    import optuna

    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    text = os.fspath(storage)
    if _is_journal(text):
        try:
            from optuna.storages.journal import JournalFileBackend, JournalStorage
        except ImportError:  # Optuna < 4.0
            from optuna.storages import JournalFileStorage as JournalFileBackend, JournalStorage

        path = _journal_path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in text:
        raise ValueError(f"storage {text!r} is neither a URL nor a journal file; use sqlite:///{text} or "
                         f"journal:///{text} (or a path ending in .log)")
    engine_kwargs: dict[str, Any] = {}
    try:
        from sqlalchemy.engine import make_url

        url = make_url(text)
    except Exception as exc:
        raise _unreachable(text, exc) from exc
    given = text
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            try:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _unreachable(given, exc) from exc
        if "timeout" not in url.query:
            engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif url.get_backend_name() == "postgresql":
        if "connect_timeout" not in url.query:
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        text = _with_postgres_driver(url)
    kwargs: dict[str, Any] = {}
    if heartbeat_interval is not None:
        kwargs = {"heartbeat_interval": int(heartbeat_interval),
                  "grace_period": int(grace_period) if grace_period is not None else 2 * int(heartbeat_interval)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(text, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # OperationalError, missing driver, unknown dialect: all mean "cannot open"
        raise _unreachable(given, exc) from exc


def fail_running_trials(study: "optuna.Study") -> list[int]:
    """Mark every ``RUNNING`` trial of ``study`` as ``FAIL``; returns their numbers.

    For trials left behind by a killed process on storages without heartbeat (journal files).
    Only safe when no other process is working on the study: its running trials would be failed too.
    """
    import optuna

    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        numbers.append(t.number)
    return numbers
