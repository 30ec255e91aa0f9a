"""Where a study's trials live: an Optuna journal file under the results directory by default,
or any RDB URL (PostgreSQL) so that workers on many machines share one study."""
from __future__ import annotations

from pathlib import Path

import optuna

from bench.errors import UsageError
from bench.run.provenance import redact
from bench.study.spec import StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_storage(results_dir: str | Path) -> str:
    return str(Path(results_dir) / "studies" / "optuna.journal")


def open_storage(url: str):
    """An Optuna storage from an RDB URL or a journal file path; UsageError when unreachable."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
        path = Path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        except OSError as e:
            raise UsageError(f"cannot open the study journal {path} ({e.strerror}); pass --results-dir "
                             f"or --storage to a writable place") from None
        return optuna.storages.JournalStorage(backend)
    try:
        created = create_schema_once(url)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, skip_table_creation=created)
    except ImportError as e:
        raise UsageError(f"--storage {redact(url)}: its database driver is not installed "
                         f"({e.__cause__ or e}); for PostgreSQL pip install 'ssvit-bench[postgres]'") from None
    except Exception as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if is_connection_error(e):
            raise UsageError(f"cannot reach --storage {redact(url)} ({type(e).__name__}: {first}); check the "
                             f"URL and that the server runs") from None
        raise UsageError(f"--storage {redact(url)} was reached but opening its Optuna tables failed "
                         f"({type(e).__name__}: {first}); check that the database is an Optuna storage of "
                         f"this Optuna version (`optuna storage upgrade --storage URL` migrates an old one)") from None


# Any 64-bit key works; this one is the suite's, so its workers queue behind each other only.
SCHEMA_LOCK = 0x55566974


def create_schema_once(url: str) -> bool:
    """Create Optuna's tables while holding a database-wide lock (PostgreSQL advisory lock,
    MySQL GET_LOCK), so workers that open a fresh database at the same instant queue for the
    schema instead of racing to create it (which fails with a UniqueViolation on pg_type).
    Returns whether the schema now exists (False: a database this does not lock, e.g. SQLite)."""
    import sqlalchemy
    engine = sqlalchemy.create_engine(url)
    try:
        name = engine.dialect.name
        if name not in ("postgresql", "mysql", "mariadb"):
            return False  # SQLite: one machine, the file lock serialises creation
        with engine.connect() as conn:
            if name == "postgresql":
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({SCHEMA_LOCK})"))
            else:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK('ssvit_bench_schema', 600)"))
            try:
                optuna.storages.RDBStorage(url).remove_session()  # creates what is missing
            finally:
                if name == "postgresql":
                    conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})"))
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK('ssvit_bench_schema')"))
        return True
    finally:
        engine.dispose()


def is_connection_error(e: Exception) -> bool:
    import sqlalchemy
    return isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError, OSError))


def study_name(spec: StudySpec, dataset: str, preset: str | None) -> str:
    return f"{spec.name}:{dataset}:{preset or 'default'}"
