"""Where psycopg's errors become the storage seam's: one table, one context manager.

=====================================================  ============================
psycopg / psycopg_pool                                 storage error
=====================================================  ============================
PoolTimeout (no connection in time)                    StoreUnavailable
SerializationFailure, DeadlockDetected,                StoreBusy
LockNotAvailable (lock_timeout), QueryCanceled
DataError (NaN in a vector, text PostgreSQL refuses)   ValueError (bad input)
OperationalError, InterfaceError (connection lost,     StoreUnavailable
server shutting down, too many connections)
any other psycopg.Error                                StorageError
=====================================================  ============================
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from indexes.engine import StorageError, StoreBusy, StoreUnavailable

__all__ = ["RETRYABLE", "SchemaTooNew", "map_errors"]

# Worth one retry of the whole transaction: nothing of it was committed.
RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
_BUSY = (*RETRYABLE, pg_errors.LockNotAvailable, pg_errors.QueryCanceled)


class SchemaTooNew(StorageError):
    """The database was migrated by a newer version of the service than this one."""


def _reason(exc: psycopg.Error) -> str:
    primary = exc.diag.message_primary if exc.diag is not None else None
    if primary:
        return primary
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def map_errors(where: str) -> Iterator[None]:
    """Re-raise psycopg's errors inside the block as storage errors (``where`` names the
    database in the message)."""
    try:
        yield
    except PoolTimeout as exc:
        raise StoreUnavailable(f"no connection to the database {where} in time") from exc
    except _BUSY as exc:
        raise StoreBusy(f"the database is busy ({_reason(exc)}): retry shortly") from exc
    except psycopg.DataError as exc:
        raise ValueError(f"the database refused the data: {_reason(exc)}") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise StoreUnavailable(f"the database {where} is unavailable: {_reason(exc)}") from exc
    except psycopg.Error as exc:
        state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        raise StorageError(f"database error{state}: {_reason(exc)}") from exc
