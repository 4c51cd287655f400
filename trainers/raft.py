"""``rag-train raft``: a collection -> RAFT training data -> a LoRA adapter that cites its
sources -> its evaluation on held-out questions through the real chat path -> hot-loaded.

RAFT (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG") trains the
generator on questions shown with the chunk that answers them among distractors, answers that
quote and cite that chunk, and some examples without it that should be refused.

The command talks to the running service over HTTP, as ``rag-service ingest`` does
(:mod:`trainers.raft_client`: ``--url`` / ``RAG_URL`` / ``RAG_HOST``:``RAG_PORT``,
``--api-key`` / ``RAG_API_KEY``): the documents, the search that picks distractors, the chat
path that is evaluated and the adapter endpoints are the service's own, whichever storage
engine or replicas sit behind it. Steps, each resumable:

1. data (``DIR/data``): the collection's documents are read and chunked again exactly as the
   service chunked them, chunks are sampled over documents, a question writer
   (:mod:`trainers.raft_questions`) writes a question per chunk, examples are built in the
   chat path's prompt (:mod:`trainers.raft_examples`) and split by chunk into
   ``train/val/test.jsonl`` (chat JSONL that ``rag-train data validate`` accepts; each line's
   ``raft`` field says what the evaluation needs). ``manifest.json`` is written last; a rerun
   with the same data options reuses the data, ``--regenerate`` makes it again.
2. training (``DIR/adapter``): LoRA with the SFT core (:func:`trainers.sft.train`), in
   ``DIR/adapter.partial`` until finished, checkpoints there; a rerun resumes from the last
   checkpoint, and a finished adapter is reused.
3. evaluation (``DIR/adapter/eval.json``, :mod:`trainers.raft_eval`): the test split through
   ``POST /v1/chat/completions``, base + RAG vs adapter + RAG. The adapter is loaded into the
   service for it (``POST /v1/adapters``), which only loads from its adapters directory
   (``RAG_ADAPTERS_DIR``, default ``<RAG_DATA_DIR>/adapters``): put ``--output-dir`` under it,
   or the adapter is copied there (``--adapters-dir`` names it when the environment does not).
4. ``--load NAME``: the adapter is served as NAME when it beats base on ``--metric``; the
   temporary evaluation adapter is unloaded either way, and the outcome is printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainers.raft_client import ServiceClient, ServiceError

__all__ = ["DATA_OPTIONS", "RaftConfig", "RaftError", "run"]


def _h(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


class RaftError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class RaftConfig:
    """Every option of ``rag-train raft`` (the CLI is made from these fields)."""

    collection: str = field(metadata=_h("collection to learn from"))
    output_dir: Path = field(
        metadata=_h("run directory: data/, adapter/ (put it under the adapters directory)")
    )
    url: str = field(
        default="", metadata=_h("service URL; empty = env RAG_URL, else http://RAG_HOST:RAG_PORT")
    )
    api_key: str = field(default="", metadata=_h("bearer key; empty = env RAG_API_KEY"))
    question_writer: str = field(
        default="template",
        metadata=_h(
            "template (no model) or model (a chat model writes JSON)", choices=["template", "model"]
        ),
    )
    writer_url: str = field(
        default="",
        metadata=_h("model writer: OpenAI-compatible base URL (.../v1); empty = the service"),
    )
    writer_model: str = field(default="", metadata=_h("model writer: model name to ask"))
    writer_api_key: str = field(default="", metadata=_h("model writer: key for --writer-url"))
    max_chunks: int = field(default=200, metadata=_h("chunks to write questions for"))
    p_no_oracle: float = field(
        default=0.2, metadata=_h("share of examples without the answering chunk (refusals)")
    )
    top_k: int = field(
        default=0, metadata=_h("sources per prompt; 0 = chat's default (env RAG_RAG_TOP_K)")
    )
    val: float = field(default=0.1, metadata=_h("share of chunks held out for validation"))
    test: float = field(default=0.2, metadata=_h("share of chunks held out for the evaluation"))
    seed: int = field(default=42, metadata=_h("seed of sampling, questions, placement, split"))
    prompt_template: Path | None = field(
        default=None,
        metadata=_h("the service's RAG_PROMPT_TEMPLATE file when it sets one (default: env)"),
    )
    embedding_model: Path | None = field(
        default=None,
        metadata=_h("directory of the collection's embedding model when not found here"),
    )
    regenerate: bool = field(default=False, metadata=_h("make the data again, train anew"))
    base_model: str = field(default="", metadata=_h("base model directory; empty = bundled"))
    epochs: float = field(default=3.0, metadata=_h("passes over the training data"))
    max_steps: int = field(default=-1, metadata=_h("stop after this many steps (-1: epochs)"))
    learning_rate: float | None = field(default=None, metadata=_h("peak learning rate"))
    batch_size: int = field(default=4, metadata=_h("examples per step"))
    grad_accum: int = field(default=1, metadata=_h("gradient accumulation steps"))
    max_length: int = field(default=2048, metadata=_h("longest example in tokens"))
    lora_r: int = field(default=16, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_h("LoRA alpha"))
    save_steps: int = field(default=50, metadata=_h("checkpoint every N steps (0: never)"))
    eval_steps: int = field(default=50, metadata=_h("validation loss every N steps"))
    adapters_dir: Path | None = field(
        default=None,
        metadata=_h(
            "the service's adapters directory; empty = env RAG_ADAPTERS_DIR or "
            "<RAG_DATA_DIR>/adapters"
        ),
    )
    max_tokens: int = field(default=96, metadata=_h("evaluation: longest answer in tokens"))
    eval_limit: int = field(default=0, metadata=_h("evaluation: at most N test questions (0 all)"))
    skip_eval: bool = field(default=False, metadata=_h("train only, no evaluation"))
    metric: str = field(
        default="key_span",
        metadata=_h(
            "metric --load compares", choices=["key_span", "token_f1", "cites_oracle", "refusal"]
        ),
    )
    load: str = field(
        default="", metadata=_h("serve the adapter under this name when it beats base")
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.max_chunks < 3:
            raise bad("max_chunks", "must be at least 3")
        if not 0 <= self.p_no_oracle < 1:
            raise bad("p_no_oracle", "must be in [0, 1)")
        if self.top_k < 0:
            raise bad("top_k", "must be 0 (chat's default) or positive")
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise bad("test", "--val and --test must be shares in [0, 1) summing below 1")
        if self.question_writer == "template" and (self.writer_url or self.writer_model):
            raise bad("writer_url", "applies to --question-writer model only")


# The options that make the data: a rerun with other values needs --regenerate.
DATA_OPTIONS = (
    "collection",
    "question_writer",
    "writer_url",
    "writer_model",
    "max_chunks",
    "p_no_oracle",
    "top_k",
    "val",
    "test",
    "seed",
    "prompt_template",
)
SPLITS = ("train", "val", "test")


def _say(message: str) -> None:
    print(f"raft: {message}", file=sys.stderr, flush=True)


def _progress(what: str) -> Callable[[int, int], None]:
    step = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done == total or done / total >= step["next"]:
            _say(f"{what}: {done}/{total}")
            step["next"] = done / total + 0.25

    return report


def _settings() -> Any:
    from rag_service.settings import Settings

    return Settings()


def _embedder(cfg: RaftConfig, model_id: str) -> Any:
    from rag_service.embedding import BUNDLED_NAME, Embedder, model_name_for
    from rag_service.settings import bundled_embedding_model

    settings = _settings()
    if cfg.embedding_model is not None:
        path = str(cfg.embedding_model)
    elif model_id == BUNDLED_NAME:
        path = bundled_embedding_model()
    elif model_id == model_name_for(settings.embedding_model_path):
        path = settings.embedding_model_path
    elif (settings.models_path / model_id).is_dir():
        path = str(settings.models_path / model_id)
    else:
        raise RaftError(
            f"the collection's embedding model {model_id!r} is not found here "
            "(RAG_EMBEDDING_MODEL, RAG_MODELS_DIR); pass --embedding-model DIR"
        )
    return Embedder(path, device="cpu")


def _template(cfg: RaftConfig) -> str:
    from rag_service.prompting import DEFAULT_TEMPLATE

    path = cfg.prompt_template or _settings().prompt_template
    return Path(path).read_text(encoding="utf-8") if path else DEFAULT_TEMPLATE


def _writer(cfg: RaftConfig, client: ServiceClient) -> Any:
    from trainers.raft_questions import ModelWriter, TemplateWriter

    if cfg.question_writer == "template":
        return TemplateWriter()
    if cfg.writer_url:
        other = ServiceClient.connect(cfg.writer_url.rstrip("/"), cfg.writer_api_key or None)

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            return dict(other._call("POST", "chat/completions", "question writer", json=body))

        return ModelWriter(ask, model=cfg.writer_model, rag=False)
    return ModelWriter(client.chat, model=cfg.writer_model, rag=True)


# ---- 1. data --------------------------------------------------------------------------------
def _data_options(cfg: RaftConfig, top_k: int) -> dict[str, Any]:
    values = {k: getattr(cfg, k) for k in DATA_OPTIONS}
    values["top_k"] = top_k
    values["prompt_template"] = _template(cfg)
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def make_data(cfg: RaftConfig, client: ServiceClient, data_dir: Path, top_k: int) -> dict[str, Any]:
    """Write ``data_dir/{train,val,test}.jsonl`` and ``manifest.json`` (last); the manifest."""
    from rag_service.chunking import ChunkingConfig
    from trainers.raft_examples import (
        build_example,
        no_oracle_flags,
        reproduce_chunks,
        sample_chunks,
        split_by_chunk,
    )

    options = _data_options(cfg, top_k)
    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        changed = [k for k, v in options.items() if manifest["options"].get(k) != v]
        if changed:
            raise RaftError(
                f"{data_dir} was made with other {', '.join(changed)}; pass --regenerate to "
                "make the data again (the adapter is trained anew), or another --output-dir"
            )
        _say(f"reusing the data in {data_dir} ({manifest['counts']})")
        return dict(manifest)
    info = client.collection(cfg.collection)
    if not info["documents"] or not info["chunks"]:
        raise RaftError(f"collection {cfg.collection!r} is empty: ingest documents first")
    ids = list(client.document_ids(cfg.collection))
    docs = [client.document(cfg.collection, i) for i in ids]
    _say(f"{len(docs)} documents read from {cfg.collection!r}")
    embedder = _embedder(cfg, info["embedding_model"])
    chunking = ChunkingConfig(info["chunk_tokens"], info["chunk_overlap"])
    chunks = reproduce_chunks(docs, chunking, embedder)
    made = {d["id"]: 0 for d in docs}
    for c in chunks:
        made[c.document_id] += 1
    wrong = [d["id"] for d in docs if made[d["id"]] != d["chunks"]]
    if wrong:
        raise RaftError(
            f"the service's chunks of {len(wrong)} documents (e.g. {wrong[0]!r}) differ from "
            "the ones made here: is --embedding-model the collection's model?"
        )
    sample = sample_chunks(chunks, cfg.max_chunks, cfg.seed)
    writer = _writer(cfg, client)
    items = []
    report = _progress("questions")
    for done, chunk in enumerate(sample, start=1):
        item = writer.write(chunk, cfg.seed)
        if item is not None:
            items.append(item)
        report(done, len(sample))
    stats = writer.stats.to_dict()
    if not items:
        raise RaftError(
            f"no question could be written for the {len(sample)} chunks sampled "
            f"({json.dumps(stats)})"
        )
    if stats["skipped"]:
        _say(f"question writer skipped: {stats['skipped']}")
    try:
        parts = split_by_chunk(items, val=cfg.val, test=cfg.test, seed=cfg.seed)
    except ValueError as exc:
        raise RaftError(str(exc)) from exc
    template = options["prompt_template"]
    rng = random.Random(cfg.seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    retrieved = 0
    report = _progress("examples")
    total, done = len(items), 0
    for name in SPLITS:
        flags = no_oracle_flags(len(parts[name]), cfg.p_no_oracle, rng)
        lines = []
        for item, no_oracle in zip(parts[name], flags, strict=True):
            hits = client.search(cfg.collection, item.question, top_k + 3)
            ex = build_example(
                item,
                hits[: top_k + 3],
                top_k=top_k,
                with_oracle=not no_oracle,
                rng=rng,
                template=template,
            )
            retrieved += (
                ex.meta["retrieval_rank"] is not None and ex.meta["retrieval_rank"] <= top_k
            )
            lines.append(json.dumps(ex.to_json(), ensure_ascii=False))
            done += 1
            report(done, total)
        tmp = data_dir / f"{name}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, data_dir / f"{name}.jsonl")
        counts[name] = {
            "examples": len(lines),
            "no_oracle": sum(flags),
            "chunks": len({i.chunk.key for i in parts[name]}),
        }
    manifest = {
        "options": options,
        "collection": {
            k: info[k]
            for k in ("documents", "chunks", "embedding_model", "chunk_tokens", "chunk_overlap")
        },
        "chunks_sampled": len(sample),
        "writer": stats,
        "kinds": {k: sum(i.kind == k for i in items) for k in sorted({i.kind for i in items})},
        "counts": counts,
        "retrieval_top_k_hit_rate": round(retrieved / len(items), 4),
    }
    tmp = data_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    _say(f"data written to {data_dir}: {counts}")
    return manifest


# ---- 2. training ----------------------------------------------------------------------------
def train_adapter(cfg: RaftConfig, data_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    from trainers.config import SFTConfig
    from trainers.sft import train

    if (adapter_dir / "adapter_config.json").exists():
        _say(f"reusing the trained adapter in {adapter_dir}")
        metrics_file = adapter_dir / "metrics.json"
        return json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    checkpoints = adapter_dir.with_name(adapter_dir.name + ".partial") / "checkpoints"
    resume = any(checkpoints.glob("checkpoint-*"))
    if resume:
        _say(f"resuming training from {checkpoints}")
    val_file = data_dir / "val.jsonl"
    has_val = val_file.exists() and val_file.stat().st_size > 0
    sft = SFTConfig(
        method="lora",
        train_file=data_dir / "train.jsonl",
        val_file=val_file if has_val else None,
        output_dir=adapter_dir,
        base_model=cfg.base_model,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        max_length=cfg.max_length,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        save_steps=cfg.save_steps,
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        resume=resume,
    )
    result = train(sft)
    return {k: v for k, v in result.metrics.items() if k != "log_history"}


# ---- 3. evaluation and 4. loading -----------------------------------------------------------
def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _served_path(cfg: RaftConfig, adapter_dir: Path) -> tuple[str, Path | None]:
    """The path to give POST /v1/adapters, and the copy made for it (None: none needed)."""
    root = (cfg.adapters_dir or _settings().adapters_path).resolve()
    here = adapter_dir.resolve()
    if _inside(here, root):
        return str(here.relative_to(root)), None
    if not root.is_dir():
        raise RaftError(
            f"the adapter must be inside the service's adapters directory, and {root} is not a "
            "directory here: put --output-dir under the service's RAG_ADAPTERS_DIR, or name it "
            "with --adapters-dir"
        )
    digest = hashlib.sha256(str(here).encode()).hexdigest()[:8]
    copy = root / f"raft-{cfg.collection}-{digest}"
    shutil.copytree(adapter_dir, copy, dirs_exist_ok=True)
    _say(f"adapter copied into the adapters directory: {copy}")
    return str(copy.relative_to(root)), copy


def evaluate(
    cfg: RaftConfig, client: ServiceClient, data_dir: Path, adapter_dir: Path, top_k: int
) -> dict[str, Any]:
    """Base vs adapter on the test split; loads (``--load``) when better; writes eval.json."""
    from trainers.raft_eval import METRICS, beats, evaluate_split, format_table

    lines = (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
    examples = [json.loads(line) for line in lines if line.strip()]
    if cfg.eval_limit:
        examples = examples[: cfg.eval_limit]
    if not examples:
        raise RaftError("the test split is empty: raise --test or --max-chunks")
    path, copy = _served_path(cfg, adapter_dir)
    digest = hashlib.sha256(str(adapter_dir.resolve()).encode()).hexdigest()[:8]
    temp = f"raft-eval-{digest}"
    if temp in client.adapters():  # left by an interrupted evaluation
        client.unload_adapter(temp)
    client.load_adapter(temp, path)
    loaded_as = None
    try:
        reports, rows = {}, {}
        for name, model in (("base", None), ("adapter", temp)):
            reports[name], rows[name] = evaluate_split(
                client.chat,
                examples,
                collection=cfg.collection,
                top_k=top_k,
                model=model,
                max_tokens=cfg.max_tokens,
                progress=_progress(f"evaluating {name}"),
            )
        better = beats(reports["adapter"], reports["base"], cfg.metric)
        if cfg.load and better:
            if cfg.load in client.adapters():
                client.unload_adapter(cfg.load)
            client.load_adapter(cfg.load, path)
            loaded_as = cfg.load
    finally:
        client.unload_adapter(temp)
        if copy is not None and loaded_as is None:
            shutil.rmtree(copy, ignore_errors=True)
    label = METRICS[cfg.metric][0]
    a, b = reports["adapter"][cfg.metric], reports["base"][cfg.metric]
    verdict = f"adapter {'beats' if better else 'does not beat'} base on {label} ({b} -> {a})"
    print(format_table(reports))
    print(verdict)
    if cfg.load:
        print(
            f'loaded into the service as {cfg.load!r}: ask with "model": "{cfg.load}"'
            if loaded_as
            else f"not loaded as {cfg.load!r}: it does not beat base on {label}"
        )
    result = {
        "collection": cfg.collection,
        "top_k": top_k,
        "metric": cfg.metric,
        "better_than_base": better,
        "loaded_as": loaded_as,
        "refusal_evaluation": "prebuilt no-oracle prompt, rag disabled",
        "base": reports["base"],
        "adapter": reports["adapter"],
        "answers": rows,
    }
    (adapter_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def run(cfg: RaftConfig, client: ServiceClient | None = None) -> dict[str, Any]:
    """The whole command; returns what it did (data manifest, training metrics, evaluation)."""
    from rag_service.cli.client import default_url

    own = client is None
    if client is None:
        client = ServiceClient.connect(
            cfg.url or default_url(), cfg.api_key or os.environ.get("RAG_API_KEY")
        )
    out = Path(cfg.output_dir)
    data_dir, adapter_dir = out / "data", out / "adapter"
    top_k = cfg.top_k or _settings().rag_top_k
    try:
        if cfg.regenerate:
            for stale in (data_dir, adapter_dir, adapter_dir.with_name("adapter.partial")):
                shutil.rmtree(stale, ignore_errors=True)
        manifest = make_data(cfg, client, data_dir, top_k)
        training = train_adapter(cfg, data_dir, adapter_dir)
        evaluation = None if cfg.skip_eval else evaluate(cfg, client, data_dir, adapter_dir, top_k)
    except ServiceError as exc:
        raise RaftError(str(exc)) from exc
    finally:
        if own:
            client.close()
    return {"config": asdict(cfg), "data": manifest, "training": training, "evaluation": evaluation}
