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
SQLite; writes run on a worker thread and swap the map once committed, so a revoked key is
refused from the next request on. One process owns a data directory: another process using
the same key file sees changes only when it restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from rag_service.errors import Forbidden, NotFound

__all__ = [
    "ALL",
    "MASTER",
    "OPEN",
    "Access",
    "ApiKey",
    "KeyCreate",
    "KeyCreated",
    "KeyInfo",
    "KeyList",
    "KeyStore",
    "Principal",
    "Scope",
    "hash_secret",
]

Access = Literal["read", "write", "admin"]
RANK: dict[str, int] = {"read": 1, "write": 2, "admin": 3}
ALL = "*"
SECRET_PREFIX = "rag-"
MAX_SCOPES = 64

ScopeCollection = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$",
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


class KeyStore:
    """API keys in SQLite (``<data_dir>/keys.sqlite3``), served from an in-memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute(_SCHEMA)
        self._by_digest: dict[bytes, ApiKey] = {}
        self._reload()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __len__(self) -> int:
        return len(self._by_digest)

    def _reload(self) -> None:
        rows = self._conn.execute(
            "SELECT id, name, digest, hint, scopes, created_at FROM api_keys"
        ).fetchall()
        keys: dict[bytes, ApiKey] = {}
        for key_id, name, digest, hint, scopes_json, created_at in rows:
            scopes = tuple(msgspec.json.decode(scopes_json, type=list[Scope]))
            keys[bytes(digest)] = ApiKey(
                key_id,
                name,
                bytes(digest),
                hint,
                scopes,
                created_at,
                Principal.of_scopes(key_id, scopes),
            )
        self._by_digest = keys  # one assignment: readers see the old map or the new one

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

    # ---- writes: SQLite, call on a worker thread ------------------------------------------
    def create(self, name: str, scopes: Iterable[Scope]) -> tuple[ApiKey, str]:
        """Make a key; returns it and its secret (the only time the secret exists)."""
        scopes = tuple(scopes)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        now = time.time()
        digest = hash_secret(secret)
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys (id, name, digest, hint, scopes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, name, digest, secret[-4:], msgspec.json.encode(list(scopes)), now),
            )
            self._reload()
            key = self._by_digest[digest]
        return key, secret

    def delete(self, key_id: str) -> None:
        """Revoke a key; refused from the next request on. NotFound when there is none."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
            if cur.rowcount == 0:
                raise NotFound(f"API key {key_id!r} does not exist", param="id")
            self._reload()
