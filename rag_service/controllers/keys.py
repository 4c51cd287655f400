"""/v1/keys: list, issue (POST {"name", "scopes"}) and revoke (DELETE /v1/keys/{id}) scoped
API keys. Admin only: RAG_API_KEY or a key with admin on every collection."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from rag_service.errors import Forbidden, NotReady
from rag_service.keys import ALL, KeyCreate, KeyCreated, KeyList, KeyStore
from rag_service.openapi import error_responses

__all__ = ["KeyController"]

ADMIN_ALL = {"access": "admin", "collection": ALL}


def provide_keys(state: State) -> KeyStore:
    if state["settings"].api_key is None:
        raise Forbidden(
            "API keys need an admin key: set RAG_API_KEY and restart (without it the service "
            "is open to everyone and issues no keys)"
        )
    keys: KeyStore | None = state.get("keys")
    if keys is None:
        error = state.get("startup_error")
        raise NotReady(f"service failed to start: {error}" if error else "service is starting")
    return keys


class KeyController(Controller):
    path = "/keys"
    dependencies = {"keys": Provide(provide_keys, sync_to_thread=False)}

    @get("/", sync_to_thread=False, opt=ADMIN_ALL, responses=error_responses())
    def list_keys(self, keys: KeyStore) -> KeyList:
        return KeyList(data=[k.info() for k in keys.list_keys()])

    @post("/", status_code=HTTP_201_CREATED, opt=ADMIN_ALL, responses=error_responses())
    async def create_key(self, data: KeyCreate, keys: KeyStore) -> KeyCreated:
        key, secret = await keys.create(data.name, data.scopes)
        info = key.info()
        return KeyCreated(
            id=info.id,
            name=info.name,
            scopes=info.scopes,
            created_at=info.created_at,
            hint=info.hint,
            key=secret,
        )

    @delete(
        "/{key_id:str}",
        status_code=HTTP_204_NO_CONTENT,
        opt=ADMIN_ALL,
        responses=error_responses(404),
    )
    async def delete_key(self, key_id: str, keys: KeyStore) -> None:
        await keys.delete(key_id)
