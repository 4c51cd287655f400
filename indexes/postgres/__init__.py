"""The ``postgres`` storage engine: PostgreSQL + pgvector + tsvector, for any number of replicas.

Layout: :mod:`~indexes.postgres.engine` (the engine: pool, migrations at start, collection
cache, create / drop / list, the shared adapter registry), :mod:`~indexes.postgres.collection`
(one collection: writes in one transaction, reads, search), :mod:`~indexes.postgres.search`
(the retrieval queries), :mod:`~indexes.postgres.sql` (index options, filters, text queries),
:mod:`~indexes.postgres.schema` (tables, migrations, per-collection partitions),
:mod:`~indexes.postgres.adapters` and :mod:`~indexes.postgres.errors` (psycopg's errors mapped
to the storage seam's).
"""

from indexes.postgres.adapters import AdapterRecord
from indexes.postgres.collection import PostgresCollection
from indexes.postgres.engine import PostgresEngine
from indexes.postgres.errors import SchemaTooNew
from indexes.postgres.schema import SCHEMA_VERSION
from indexes.postgres.sql import parse_index

__all__ = [
    "SCHEMA_VERSION",
    "AdapterRecord",
    "PostgresCollection",
    "PostgresEngine",
    "SchemaTooNew",
    "parse_index",
]
