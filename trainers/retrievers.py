"""``rag-train embed`` and ``rag-train rerank``: train retrievers on the user's own data.

One pipeline, two models. Pairs, passages, the held-out split and mined hard negatives come
from :mod:`trainers.retrieval_prep`; then:

1. Base is evaluated on the validation split, then the model trains with AdamW, linear warmup
   and decay, and is evaluated after every epoch (recall@1, recall@5, MRR@10 and nDCG@10 with
   :mod:`rag_service.evaluation`'s definitions, documents ranked by their best passage). The
   best epoch by MRR@10 (ties: recall@1) is kept; training stops after ``--patience`` epochs
   without beating the best epoch so far. (Not base: a reranker starts from a new, untrained
   head, well below the dense ranking it is compared with, and climbs from there.)
2. The output follows ``rag-train lora``: work happens in ``<output_dir>.partial``, renamed
   when finished; the model (safetensors), ``training_config.json``, ``metrics.json`` and
   ``loss.png``. A model worse than base on the validation split is still written, but
   ``metrics.json`` says so, a ``WORSE_THAN_BASE`` file with the figures sits beside it, and
   the CLI warns and exits 3 (unless ``--allow-worse``).

Embedder (``embed``): MultipleNegativesRankingLoss written out: for a batch of queries, the
candidates are every query's positive (in-batch negatives) and mined negatives; scaled
cosine similarities, cross-entropy towards each query's own positive. A candidate that is
relevant to the query for another reason (two questions about one document in a batch) is
masked out rather than pushed away. Saved as a sentence-transformers directory.

Reranker (``rerank``): a cross-encoder (one logit) initialised from the bundled MiniLM (a new
scoring head on its encoder), trained listwise: each query with its positive and
``--hard-negatives`` negatives, softmax cross-entropy towards the positive (the localised
contrastive loss of Gao et al., 2021). It is evaluated the way it would serve: the base dense
model's top ``--candidates`` passages, reordered. Its base is that dense ranking unreordered,
so "better than base" means "turning the reranker on helps". Saved as a sentence-transformers
CrossEncoder directory (``num_labels=1``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.evaluation import documents_in_order
from trainers.retrieval_config import (
    WORSE_THAN_BASE_EXIT,
    EmbedConfig,
    RerankConfig,
    RetrieverConfig,
)
from trainers.retrieval_prep import (
    METRICS,
    RANK_DEPTH,
    Prepared,
    by_source,
    dense_rankings,
    device,
    encode,
    load_embedder,
    prepare,
    read_sources,
    resolve_model,
    scores_of,
    selection_key,
    top_indices,
)
from trainers.sft import TrainingError, _git_sha, _sha256, _versions

__all__ = [
    "WORSE_THAN_BASE",
    "WORSE_THAN_BASE_EXIT",
    "RetrieverResult",
    "format_comparison",
    "train_embedder",
    "train_reranker",
]

log = logging.getLogger(__name__)

WORSE_THAN_BASE = "WORSE_THAN_BASE"


@dataclass
class RetrieverResult:
    metrics: dict[str, Any]
    output_dir: Path
    worse_than_base: bool
    model: Any = field(repr=False)  # the trained model, in memory (best epoch)


def _client(cfg: RetrieverConfig) -> Any:
    import httpx

    key = cfg.api_key or os.environ.get("RAG_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=cfg.service, headers=headers, timeout=600.0)


def _features(model: Any, inputs: list[Any]) -> dict[str, Any]:
    import torch

    prepare = getattr(model, "preprocess", None) or model.tokenize
    feats = prepare(inputs)
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}


# --- training loop -----------------------------------------------------------------------


def _optimiser(model: Any, cfg: RetrieverConfig, steps: int) -> tuple[Any, Any]:
    import torch
    from transformers import get_linear_schedule_with_warmup

    if not cfg.train_word_embeddings:
        for name, param in model.named_parameters():
            if "word_embeddings" in name:
                param.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    new_head = getattr(model, "new_head", False)
    head = [p for n, p in named if new_head and ".classifier." in f".{n}"]
    body = [p for n, p in named if not (new_head and ".classifier." in f".{n}")]
    groups = [{"params": body, "lr": cfg.learning_rate}]
    if head:
        groups.append({"params": head, "lr": getattr(cfg, "head_learning_rate", cfg.learning_rate)})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(steps * cfg.warmup_ratio), steps)
    return opt, sched


def _fit(
    cfg: RetrieverConfig,
    model: Any,
    n_train: int,
    step_loss: Callable[[list[int]], Any],
    evaluate: Callable[[], tuple[dict[str, Any], list[list[str]]]],
    base: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Epochs with per-epoch validation, early stopping and the best epoch's weights restored."""
    import torch
    from tqdm import tqdm

    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    opt, sched = _optimiser(model, cfg, steps_per_epoch * cfg.epochs)
    rng = random.Random(cfg.seed)
    history: list[dict[str, Any]] = [{"step": 0, "epoch": 0, "val": base}]
    best_key, best_state, best_epoch, best_scores = None, None, 0, base
    stale, step, epoch = 0, 0, 0
    best_rankings: list[list[str]] = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = list(range(n_train))
        rng.shuffle(order)
        batches = [order[i : i + cfg.batch_size] for i in range(0, n_train, cfg.batch_size)]
        losses = []
        for batch in tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False):
            loss = step_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            history.append({"step": step, "epoch": epoch, "loss": round(losses[-1], 5)})
        scores, rankings = evaluate()
        history.append({"step": step, "epoch": epoch, "val": scores})
        log.info(
            "epoch %d/%d (%.0f s): loss %.4f, validation mrr@10 %.3f recall@1 %.3f "
            "(base %.3f / %.3f)",
            epoch,
            cfg.epochs,
            time.perf_counter() - started,
            sum(losses) / len(losses),
            scores["mrr@10"],
            scores["recall@1"],
            base["mrr@10"],
            base["recall@1"],
        )
        if best_key is None or selection_key(scores) > best_key:
            best_key, best_epoch, best_scores = selection_key(scores), epoch, scores
            best_rankings, stale = rankings, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                log.info("no better validation MRR for %d epochs: stopping", stale)
                break
    seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "trained": best_scores,
        "trained_rankings": best_rankings,
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "stopped_early": epoch < cfg.epochs,
        "steps": step,
        "train_seconds": round(seconds, 2),
        "history": history,
    }


# --- outputs -----------------------------------------------------------------------------


def format_comparison(base: dict[str, Any], trained: dict[str, Any]) -> str:
    """A base | trained | change table of the validation figures."""
    rows = [f"{'metric':<10}{'base':>9}{'trained':>9}{'change':>9}"]
    for m in METRICS:
        rows.append(f"{m:<10}{base[m]:>9.3f}{trained[m]:>9.3f}{trained[m] - base[m]:>+9.3f}")
    return "\n".join(rows)


def _plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["val"]["mrr@10"]) for h in history if "val" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", alpha=0.8, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    if evals:
        right.plot(*zip(*evals, strict=True), color="tab:orange", marker="o", label="val MRR@10")
        right.axhline(evals[0][1], color="tab:gray", linestyle="--", label="base val MRR@10")
    right.set_ylabel("validation MRR@10")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingError(f"{out} exists and is not empty; choose another --output-dir")


def _work_dir(out: Path) -> Path:
    _check_output(out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _finish(
    cfg: RetrieverConfig,
    kind: str,
    work: Path,
    save: Callable[[Path], None],
    base_path: str,
    data: Prepared,
    base: dict[str, Any],
    fit: dict[str, Any],
    extra_record: dict[str, Any],
    base_rankings: list[list[str]],
) -> tuple[dict[str, Any], bool]:
    final = work / "final"
    save(final)
    for stray in final.glob("*.bin"):  # safetensors only
        stray.unlink()
    trained = fit["trained"]
    worse = selection_key(trained) < selection_key(base)
    better = selection_key(trained) > selection_key(base)
    metrics: dict[str, Any] = {
        "kind": kind,
        "selection_metric": "mrr@10",
        "split": cfg.split,
        "base": base,
        "trained": trained,
        "change": {m: round(trained[m] - base[m], 4) for m in METRICS},
        "better_than_base": better,
        "worse_than_base": worse,
        **{k: fit[k] for k in ("epochs_run", "best_epoch", "stopped_early", "steps")},
        "train_seconds": fit["train_seconds"],
        **data.counts,
    }
    per_source = by_source(base_rankings, data.val)
    if per_source:
        metrics["by_source"] = {
            "base": per_source,
            "trained": by_source(fit["trained_rankings"], data.val),
        }
    metrics["history"] = fit["history"]
    weights = sorted(Path(base_path).glob("*.safetensors"))
    record = {
        "kind": kind,
        "base_model": str(Path(base_path).resolve()),
        "base_model_sha256": _sha256(weights) if weights else None,
        **extra_record,
        "config": cfg.to_dict(),
        "corpus": data.corpus_record,
        "data_sha256": {
            str(p): _sha256([p]) for p in (cfg.qa_file, cfg.chat_file) if p is not None
        },
        "versions": _versions() | _st_version(),
        "git_sha": _git_sha(),
        "device": device(),
        "precision": "fp32",
    }
    (final / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(fit["history"], final / "loss.png", f"rag-train {kind}")
    if worse:
        (final / WORSE_THAN_BASE).write_text(
            f"This {kind} model is WORSE than its base on the held-out validation split "
            f"({base['questions']} questions). Do not serve it.\n\n"
            + format_comparison(base, trained)
            + "\n\nTry more or cleaner pairs, a lower --learning-rate or fewer --epochs.\n"
        )
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s", out)
    return metrics, worse


def _st_version() -> dict[str, str]:
    from importlib import metadata

    try:
        return {"sentence-transformers": metadata.version("sentence-transformers")}
    except metadata.PackageNotFoundError:
        return {}


def _run(cfg: RetrieverConfig, client: Any, progress: bool, body: Callable[[Any], Any]) -> Any:
    from transformers import set_seed

    set_seed(cfg.seed)
    own = client is None and (cfg.collection is not None or cfg.question_writer is not None)
    if own:
        client = _client(cfg)
    try:
        return body(client)
    finally:
        if own:
            client.close()


# --- the two trainers --------------------------------------------------------------------


def train_embedder(
    cfg: EmbedConfig, *, client: Any = None, progress: bool = False
) -> RetrieverResult:
    """Fine-tune the embedding model; ``client``: an ``httpx.Client`` for the service
    (default: one built from ``cfg.url`` / ``cfg.api_key`` when a collection or the question
    writer needs it)."""
    import torch

    def body(client: Any) -> RetrieverResult:
        _check_output(Path(cfg.output_dir))
        sources = read_sources(cfg, client)
        base_path = resolve_model(cfg.base_model)
        model = load_embedder(base_path, cfg.max_length)
        data = prepare(cfg, sources, model, client, progress, fill=False)
        val_queries = [p.query for p in data.val]

        def evaluate() -> tuple[dict[str, Any], list[list[str]]]:
            pool_emb = encode(model, [p.text for p in data.pool])
            rankings = dense_rankings(encode(model, val_queries), pool_emb, data.pool)
            return scores_of(rankings, data.val), rankings

        base_rankings = dense_rankings(encode(model, val_queries), data.pool_emb, data.pool)
        base = scores_of(base_rankings, data.val)
        log.info("base: validation mrr@10 %.3f recall@1 %.3f", base["mrr@10"], base["recall@1"])

        def step_loss(batch: list[int]) -> Any:
            pairs = [data.train[i] for i in batch]
            texts = [p.positive or "" for p in pairs]
            owners = [p.relevant for p in pairs]
            for i in batch:
                texts += [data.pool[j].text for j in data.negatives[i]]
                owners += [frozenset({data.pool[j].document_id}) for j in data.negatives[i]]
            q = model(_features(model, [p.query for p in pairs]))["sentence_embedding"]
            d = model(_features(model, texts))["sentence_embedding"]
            q = torch.nn.functional.normalize(q, dim=-1)
            d = torch.nn.functional.normalize(d, dim=-1)
            scores = cfg.scale * q @ d.T
            mask = torch.tensor(
                [
                    [j != i and bool(p.relevant & owner) for j, owner in enumerate(owners)]
                    for i, p in enumerate(pairs)
                ],
                device=scores.device,
            )
            scores = scores.masked_fill(mask, float("-inf"))
            labels = torch.arange(len(pairs), device=scores.device)
            return torch.nn.functional.cross_entropy(scores, labels)

        work = _work_dir(Path(cfg.output_dir))
        fit = _fit(cfg, model, len(data.train), step_loss, evaluate, base, progress)
        metrics, worse = _finish(
            cfg,
            "embed",
            work,
            lambda path: model.save(str(path)),
            base_path,
            data,
            base,
            fit,
            {"loss": "MultipleNegativesRankingLoss (in-batch + mined negatives)"},
            base_rankings,
        )
        return RetrieverResult(metrics, Path(cfg.output_dir), worse, model)

    result: RetrieverResult = _run(cfg, client, progress, body)
    return result


def train_reranker(
    cfg: RerankConfig, *, client: Any = None, progress: bool = False
) -> RetrieverResult:
    """Train a cross-encoder reranker over the dense model's candidates."""
    import torch

    def body(client: Any) -> RetrieverResult:
        _check_output(Path(cfg.output_dir))
        sources = read_sources(cfg, client)
        dense_path = resolve_model(cfg.embedding_model)
        dense = load_embedder(dense_path, cfg.max_length)
        data = prepare(cfg, sources, dense, client, progress, fill=True)
        val_emb = encode(dense, [p.query for p in data.val])
        candidates = top_indices(val_emb, data.pool_emb, max(cfg.candidates, RANK_DEPTH))
        base_rankings = [
            documents_in_order(data.pool[j].document_id for j in row) for row in candidates
        ]
        base = scores_of(base_rankings, data.val)
        log.info(
            "base (dense, not reranked): validation mrr@10 %.3f recall@1 %.3f",
            base["mrr@10"],
            base["recall@1"],
        )
        base_path = resolve_model(cfg.base_model)
        model = _load_cross_encoder(base_path, cfg.max_length)

        def evaluate() -> tuple[dict[str, Any], list[list[str]]]:
            n = cfg.candidates
            inputs = [
                (pair.query, data.pool[j].text)
                for pair, row in zip(data.val, candidates, strict=True)
                for j in row[:n]
            ]
            model.eval()
            with torch.inference_mode():
                flat = np.asarray(
                    model.predict(inputs, batch_size=64, show_progress_bar=False),
                    dtype=np.float32,
                )
            rankings, at = [], 0
            for row in candidates:
                head = row[:n]
                order = head[np.argsort(-flat[at : at + len(head)], kind="stable")]
                at += len(head)
                rankings.append(
                    documents_in_order(data.pool[j].document_id for j in [*order, *row[n:]])
                )
            return scores_of(rankings, data.val), rankings

        def step_loss(batch: list[int]) -> Any:
            groups = [
                [data.train[i].positive or ""] + [data.pool[j].text for j in data.negatives[i]]
                for i in batch
            ]
            width = max(map(len, groups))
            inputs = [
                (data.train[i].query, t) for i, g in zip(batch, groups, strict=True) for t in g
            ]
            logits = model(_features(model, inputs))["scores"].view(-1)
            table = torch.full((len(batch), width), float("-inf"), device=logits.device)
            at = 0
            for row, g in enumerate(groups):
                table[row, : len(g)] = logits[at : at + len(g)]
                at += len(g)
            labels = torch.zeros(len(batch), dtype=torch.long, device=logits.device)
            return torch.nn.functional.cross_entropy(table, labels)

        work = _work_dir(Path(cfg.output_dir))
        fit = _fit(cfg, model, len(data.train), step_loss, evaluate, base, progress)
        metrics, worse = _finish(
            cfg,
            "rerank",
            work,
            lambda path: model.save(str(path)),
            base_path,
            data,
            base,
            fit,
            {
                "embedding_model": str(Path(dense_path).resolve()),
                "candidates": cfg.candidates,
                "loss": "listwise softmax cross-entropy (positive vs mined negatives)",
            },
            base_rankings,
        )
        return RetrieverResult(metrics, Path(cfg.output_dir), worse, model)

    result: RetrieverResult = _run(cfg, client, progress, body)
    return result


def _load_cross_encoder(path: str, max_length: int) -> Any:
    from sentence_transformers import CrossEncoder

    try:
        architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures")
        model = CrossEncoder(path, num_labels=1, max_length=max_length, device=device())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load {path} as a cross-encoder: {exc}") from exc
    # A scoring head made just now (from an embedding model) learns at its own, higher rate.
    model.new_head = not any("ForSequenceClassification" in a for a in architectures or [])
    return model
