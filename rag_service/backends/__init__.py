"""Generation backends: the same small protocol for an upstream server and a local model."""

from rag_service.backends.base import ChatBackend, completion_id

__all__ = ["ChatBackend", "completion_id"]
