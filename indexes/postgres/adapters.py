"""The shared adapter registry: which PEFT adapters every replica serves, in ``rag_adapters``.

``version`` starts at 1 and grows by one each time a name is put again, so a replica can tell
that an adapter it has loaded was replaced under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

__all__ = ["AdapterRecord", "delete_adapter", "list_adapters", "put_adapter"]

_COLS = "name, path, version, rank, alpha, extract(epoch FROM loaded_at)::float8, metadata"


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    path: str
    version: int
    rank: int | None
    alpha: float | None
    loaded_at: float
    metadata: dict[str, Any]


def _record(row: Any) -> AdapterRecord:
    return AdapterRecord(
        str(row[0]),
        str(row[1]),
        int(row[2]),
        None if row[3] is None else int(row[3]),
        None if row[4] is None else float(row[4]),
        float(row[5]),
        dict(row[6] or {}),
    )


async def list_adapters(conn: AsyncConnection) -> list[AdapterRecord]:
    cur = await conn.execute(f"SELECT {_COLS} FROM rag_adapters ORDER BY name")
    return [_record(r) for r in await cur.fetchall()]


async def put_adapter(
    conn: AsyncConnection,
    name: str,
    path: str,
    *,
    rank: int | None,
    alpha: float | None,
    metadata: dict[str, Any] | None,
) -> AdapterRecord:
    cur = await conn.execute(
        "INSERT INTO rag_adapters AS a (name, path, rank, alpha, metadata) "
        "VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET path = excluded.path, rank = excluded.rank, "
        "alpha = excluded.alpha, metadata = excluded.metadata, loaded_at = now(), "
        "version = a.version + 1 "
        f"RETURNING {_COLS}",
        (name, path, rank, alpha, Jsonb(metadata or {})),
    )
    row = await cur.fetchone()
    assert row is not None
    return _record(row)


async def delete_adapter(conn: AsyncConnection, name: str) -> bool:
    cur = await conn.execute("DELETE FROM rag_adapters WHERE name = %s", (name,))
    return cur.rowcount > 0
