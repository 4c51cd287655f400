"""The ``rag-service`` command line: ``serve`` runs the service; ``ingest``, ``search``,
``eval``, ``questions`` and ``reindex`` talk to a running one over HTTP (see
:mod:`rag_service.cli.client` for how they find it). One module per subcommand family."""

from rag_service.cli.main import main, worker_app

__all__ = ["main", "worker_app"]
