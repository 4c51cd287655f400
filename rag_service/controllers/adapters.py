"""/v1/adapters: list, load (POST {"name", "path"}), unload (DELETE /v1/adapters/{name})."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from rag_service.adapters import AdapterInfo, AdapterManager
from rag_service.dependencies import provide_chat
from rag_service.errors import NotReady
from rag_service.openapi import error_responses
from rag_service.schemas import NamePath

__all__ = ["AdapterController", "AdapterLoad"]


class AdapterLoad(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")]
    path: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


def provide_adapters(state: State) -> AdapterManager:
    provide_chat(state)  # loading / failed start errors first
    manager: AdapterManager | None = state.get("adapters")
    if manager is None:
        raise NotReady("adapters are not available")
    return manager


class AdapterController(Controller):
    path = "/adapters"
    dependencies = {"adapters": Provide(provide_adapters, sync_to_thread=False)}

    # Any key may list them: /v1/models shows the same adapters.
    @get("/", sync_to_thread=False, opt={"access": "key"}, responses=error_responses())
    def list_adapters(self, adapters: AdapterManager) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [_public(a, adapters) for a in adapters.registry.list()],
        }

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        opt={"access": "admin", "collection": "*"},
        responses=error_responses(404, 409, 502, 504),
    )
    async def load(self, data: AdapterLoad, adapters: AdapterManager) -> dict[str, Any]:
        info = await adapters.load(data.name, data.path)
        return _public(info, adapters)

    @delete(
        "/{name:str}",
        status_code=HTTP_204_NO_CONTENT,
        opt={"access": "admin", "collection": "*"},
        responses=error_responses(404, 502, 504),
    )
    async def unload(self, name: NamePath, adapters: AdapterManager) -> None:
        await adapters.unload(name)


def _public(info: AdapterInfo, adapters: AdapterManager) -> dict[str, Any]:
    """An adapter as the API shows it: its path relative to the adapters directory (what a
    load names), never where that directory is on this machine."""
    path = Path(info.path)
    root = adapters.adapters_dir.resolve()
    shown = path.relative_to(root).as_posix() if root in path.parents else path.name
    return {**info.to_dict(), "path": shown, "object": "adapter"}
