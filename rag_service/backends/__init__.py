"""Generation backends: the same small protocol for an upstream server and a local model,
and one more for those that serve adapters (both built-in ones do)."""

from rag_service.backends.base import AdapterBackend, ChatBackend, completion_id

__all__ = ["AdapterBackend", "ChatBackend", "completion_id"]
