"""Scoped API keys: who a request is (a :class:`Principal`) and the durable :class:`KeyStore`.

Beside the one admin key ``RAG_API_KEY`` the service issues keys that carry scopes, each a
collection name (or ``"*"`` for every collection) and an access level. ``write`` implies
``read`` and ``admin`` implies ``write``:

* read: search, list and get documents, see the collection in the list, chat retrieval;
* write: upsert and delete documents (a first upsert creates the collection, with the
  default options, so a write key may create a collection it is scoped to by name);
* admin: create (with options) and delete the collection. Admin on ``"*"`` also manages
  adapters and keys and reads /metrics, like ``RAG_API_KEY`` itself.

Any valid key may embed text and list models. A key's secret (``rag-`` + 43 URL-safe
characters, 256 random bits) is shown once, when it is made; the store keeps its SHA-256 only.
A plain fast hash is enough here because the secret is random and long: there is no
dictionary to try, so the salt and work factor that passwords need would only slow down every
request. Lookups go to an in-memory map rebuilt on each change, so the guard never waits on
the store; writes swap the map once committed, so a revoked key is refused by this process
from the next request on. Where the keys live: ``<data_dir>/keys.sqlite3`` with the embedded
engine, the ``rag_api_keys`` table with the postgres engine (every replica shares them). With
the postgres engine every process also reloads the map every ``refresh_s`` (2 s), so a key
issued or revoked through one worker or replica is honoured by all the others within that time
(the embedded engine is one process: its own changes are all there are).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol

import msgspec

from indexes.engine import KeyRowStore
from rag_service.errors import Forbidden, NotFound

__all__ = [
    "ALL",
    "MASTER",
    "OPEN",
    "Access",
    "ApiKey",
    "EngineKeyRows",
    "KeyCreate",
    "KeyCreated",
    "KeyInfo",
    "KeyList",
    "KeyRow",
    "KeyRows",
    "KeyStore",
    "Principal",
    "Scope",
    "SqliteKeyRows",
    "hash_secret",
]

log = logging.getLogger(__name__)

Access = Literal["read", "write", "admin"]
RANK: dict[str, int] = {"read": 1, "write": 2, "admin": 3}
ALL = "*"
SECRET_PREFIX = "rag-"
MAX_SCOPES = 64

ScopeCollection = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})\Z",
        description="a collection name, or * for every collection",
    ),
]


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    collection: ScopeCollection
    access: Access


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=MAX_SCOPES)]


class KeyInfo(msgspec.Struct):
    id: str
    name: str
    scopes: list[Scope]
    created_at: int
    hint: str  # the secret's last four characters, to tell keys apart
    object: str = "api_key"


class KeyCreated(KeyInfo):
    key: str = ""  # the secret: in this answer only, never again


class KeyList(msgspec.Struct):
    data: list[KeyInfo]
    object: str = "list"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the admin key (or an open service), or one scoped key."""

    key_id: str | None
    grants: Mapping[str, int] = field(default_factory=dict)  # collection or "*" -> rank
    unrestricted: bool = False

    @classmethod
    def of_scopes(cls, key_id: str, scopes: Iterable[Scope]) -> Principal:
        grants: dict[str, int] = {}
        for s in scopes:
            grants[s.collection] = max(grants.get(s.collection, 0), RANK[s.access])
        return cls(key_id, grants)

    def allows(self, access: Access, collection: str) -> bool:
        if self.unrestricted:
            return True
        held = max(self.grants.get(collection, 0), self.grants.get(ALL, 0))
        return held >= RANK[access]

    def require(self, access: Access, collection: str, *, param: str | None = None) -> None:
        """Raise :class:`Forbidden` unless this principal has ``access`` on ``collection``."""
        if self.allows(access, collection):
            return
        target = "every collection" if collection == ALL else f"collection {collection!r}"
        raise Forbidden(f"API key {self.key_id} has no {access} access to {target}", param=param)


MASTER = Principal(None, unrestricted=True)  # RAG_API_KEY
OPEN = Principal(None, unrestricted=True)  # no RAG_API_KEY: the service is open


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    digest: bytes
    hint: str
    scopes: tuple[Scope, ...]
    created_at: float
    principal: Principal

    def info(self) -> KeyInfo:
        return KeyInfo(
            id=self.id,
            name=self.name,
            scopes=list(self.scopes),
            created_at=int(self.created_at),
            hint=self.hint,
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    digest BLOB NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""

# (id, name, digest, hint, scopes as JSON, created_at)
KeyRow = tuple[str, str, bytes, str, str, float]


class KeyRows(Protocol):
    """Where key rows are kept: each engine's own store."""

    async def load(self) -> list[KeyRow]: ...

    async def insert(self, row: KeyRow) -> None: ...

    async def delete(self, key_id: str) -> bool: ...

    def close(self) -> None: ...


class SqliteKeyRows:
    """Key rows in ``<data_dir>/keys.sqlite3`` (the embedded engine)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _load(self) -> list[KeyRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, digest, hint, scopes, created_at FROM api_keys"
            ).fetchall()
        return [(r[0], r[1], bytes(r[2]), r[3], r[4], float(r[5])) for r in rows]

    def _insert(self, row: KeyRow) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, name, digest, hint, scopes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )

    def _delete(self, key_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount > 0

    async def load(self) -> list[KeyRow]:
        return await asyncio.to_thread(self._load)

    async def insert(self, row: KeyRow) -> None:
        await asyncio.to_thread(self._insert, row)

    async def delete(self, key_id: str) -> bool:
        return await asyncio.to_thread(self._delete, key_id)


class EngineKeyRows:
    """Key rows in the storage engine's database (postgres: shared by every replica)."""

    def __init__(self, engine: KeyRowStore) -> None:
        self.engine = engine

    async def load(self) -> list[KeyRow]:
        return await self.engine.api_keys_load()

    async def insert(self, row: KeyRow) -> None:
        await self.engine.api_keys_insert(row)

    async def delete(self, key_id: str) -> bool:
        return await self.engine.api_keys_delete(key_id)

    def close(self) -> None:
        return None


class KeyStore:
    """API keys served from an in-memory map, kept in :class:`KeyRows`."""

    def __init__(self, rows: KeyRows, *, refresh_s: float = 2.0) -> None:
        self.rows = rows
        self.refresh_s = refresh_s
        self._by_digest: dict[bytes, ApiKey] = {}

    async def open(self) -> None:
        await self.refresh()

    def close(self) -> None:
        self.rows.close()

    def __len__(self) -> int:
        return len(self._by_digest)

    async def refresh(self) -> None:
        keys: dict[bytes, ApiKey] = {}
        for key_id, name, digest, hint, scopes_json, created_at in await self.rows.load():
            scopes = tuple(msgspec.json.decode(scopes_json, type=list[Scope]))
            keys[digest] = ApiKey(
                key_id,
                name,
                digest,
                hint,
                scopes,
                created_at,
                Principal.of_scopes(key_id, scopes),
            )
        self._by_digest = keys  # one assignment: readers see the old map or the new one

    async def run_refresh(self) -> None:
        """Reload every ``refresh_s``: changes made by other workers and replicas."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # the store may be away; keep the last map
                log.warning("API keys could not be reloaded: %s", exc)

    # ---- reads: the in-memory map, safe on the event loop ---------------------------------
    def authenticate(self, secret: str) -> Principal | None:
        """The principal of a key's secret, or None when no live key has it."""
        digest = hash_secret(secret)
        key = self._by_digest.get(digest)
        # The map is keyed by the digest; comparing the stored digest in constant time keeps
        # the final check independent of how many leading bytes matched.
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key.principal

    def list_keys(self) -> list[ApiKey]:
        return sorted(self._by_digest.values(), key=lambda k: (k.created_at, k.id))

    # ---- writes --------------------------------------------------------------------------
    async def create(self, name: str, scopes: Iterable[Scope]) -> tuple[ApiKey, str]:
        """Make a key; returns it and its secret (the only time the secret exists)."""
        scopes = tuple(scopes)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        digest = hash_secret(secret)
        row: KeyRow = (
            key_id,
            name,
            digest,
            secret[-4:],
            msgspec.json.encode(list(scopes)).decode(),
            time.time(),
        )
        await self.rows.insert(row)
        await self.refresh()
        return self._by_digest[digest], secret

    async def delete(self, key_id: str) -> None:
        """Revoke a key; refused from the next request on. NotFound when there is none."""
        if not await self.rows.delete(key_id):
            raise NotFound(f"API key {key_id!r} does not exist", param="id")
        await self.refresh()
