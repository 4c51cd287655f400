"""``rag-train``: prepare chat data, fine-tune (LoRA or full), evaluate, merge.

    rag-train data validate FILE [--max-length N]
    rag-train data dedup IN OUT [--exact]
    rag-train data split IN --out-dir DIR --train 0.8 --val 0.1 --test 0.1 --seed N
    rag-train data stats FILE
    rag-train data convert IN OUT [--system TEXT]
    rag-train lora --train-file F [--val-file F] --output-dir D [hyperparameters]
    rag-train full --train-file F [--val-file F] --output-dir D [hyperparameters]
    rag-train eval [--model BASE] [--adapter DIR] --data test.jsonl [--json OUT]
    rag-train merge [--base BASE] --adapter DIR --out DIR
    rag-train embed --output-dir D (--qa-file F | --chat-file F | --pseudo-queries |
                    --question-writer MODEL) [--corpus F | --collection NAME] [options]
    rag-train rerank (same data flags) [--embedding-model DIR] [--candidates N] [options]
    rag-train raft --collection NAME --output-dir DIR [--question-writer template|model]
                   [--max-chunks N] [--p-no-oracle P] [--load NAME] [options]

embed and rerank hold out a validation split, report base vs trained on it, and exit 3 when
the trained model is worse than base (it is still written, with a WORSE_THAN_BASE file)
unless --allow-worse.

Several GPUs: ``accelerate launch -m trainers.cli lora ...`` or
``torchrun --nproc-per-node N -m trainers.cli lora ...`` (DDP through the HF Trainer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    from trainers.sft import resolve_base_model

    return AutoTokenizer.from_pretrained(resolve_base_model(base))


def _count_fn(tokenizer: Any) -> Any:
    def count(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    return count


def _config_flags(parser: argparse.ArgumentParser, config: Any = None) -> None:
    from trainers.config import SFTConfig

    for f in dataclasses.fields(config or SFTConfig):
        if f.name == "method":
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = str(f.type)
        required = f.default is dataclasses.MISSING
        if hint == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        typ: Any = str
        for name, t in (("Path", Path), ("int", int), ("float", float)):
            if hint.startswith(name):
                typ = t
        default = None if required else f.default
        parser.add_argument(
            flag,
            type=typ,
            required=required,
            default=default,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} (default: {default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="validate, dedup, split, stats, convert chat JSONL")
    dsub = data.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="report every bad line by number")
    v.add_argument("file", type=Path)
    v.add_argument("--max-length", type=int, default=None, help="longest example in tokens")
    v.add_argument("--base-model", default="", help="tokenizer for --max-length")
    d = dsub.add_parser("dedup", help="drop duplicates (normalised whitespace/case)")
    d.add_argument("input", type=Path)
    d.add_argument("output", type=Path)
    d.add_argument("--exact", action="store_true", help="only byte-identical duplicates")
    s = dsub.add_parser("split", help="deterministic train/val/test split (after dedup)")
    s.add_argument("input", type=Path)
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--train", type=float, default=0.8)
    s.add_argument("--val", type=float, default=0.1)
    s.add_argument("--test", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=42)
    st = dsub.add_parser("stats", help="counts and token-length percentiles")
    st.add_argument("file", type=Path)
    st.add_argument("--base-model", default="")
    c = dsub.add_parser("convert", help="from prompt/completion or user/assistant records")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--system", default=None, help="system message to put first")
    for method in ("lora", "full"):
        p = sub.add_parser(method, help=f"{method} supervised fine-tuning")
        _config_flags(p)
    e = sub.add_parser("eval", help="score base (and adapter) on held-out chat data")
    e.add_argument("--model", default="", help="base model directory (default bundled)")
    e.add_argument("--adapter", type=Path, default=None)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--json", type=Path, default=None, help="write the full report here")
    m = sub.add_parser("merge", help="merge an adapter into a standalone model")
    m.add_argument("--base", default="")
    m.add_argument("--adapter", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    from trainers.retrieval_config import EmbedConfig, RerankConfig

    em = sub.add_parser("embed", help="fine-tune the embedding model on your data")
    _config_flags(em, EmbedConfig)
    rr = sub.add_parser("rerank", help="train a cross-encoder reranker on your data")
    _config_flags(rr, RerankConfig)
    from trainers.raft import RaftConfig

    ra = sub.add_parser(
        "raft",
        help="a collection -> cite-and-quote training data -> LoRA adapter, evaluated "
        "through the running service's chat path (over HTTP) and hot-loaded",
        description=(
            "Talks to the running service over HTTP like `rag-service ingest` (--url, else "
            "RAG_URL, else http://RAG_HOST:RAG_PORT; --api-key or RAG_API_KEY). Put "
            "--output-dir under the service's adapters directory (RAG_ADAPTERS_DIR) so the "
            "adapter can be loaded from there; otherwise it is copied there."
        ),
    )
    _config_flags(ra, RaftConfig)
    return parser


def _data(args: argparse.Namespace) -> int:
    import json as _json

    from trainers import data

    if args.data_command == "validate":
        count = _count_fn(_tokenizer(args.base_model)) if args.max_length else None
        good, problems = data.validate_file(
            args.file, count_tokens=count, max_tokens=args.max_length
        )
        for p in problems:
            print(f"{args.file}:{p.line}: {p.reason}")
        print(f"{len(good)} valid, {len(problems)} invalid")
        return 1 if problems else 0
    if args.data_command == "dedup":
        examples = data.load_examples(args.input)
        unique, dropped = data.dedup(examples, normalised=not args.exact)
        data.write_jsonl(args.output, unique)
        print(f"{len(unique)} kept, {dropped} duplicates dropped")
        return 0
    if args.data_command == "split":
        parts = data.split(
            data.load_examples(args.input),
            train=args.train,
            val=args.val,
            test=args.test,
            seed=args.seed,
        )
        for name, rows in parts.items():
            data.write_jsonl(args.out_dir / f"{name}.jsonl", rows)
        print(", ".join(f"{name}: {len(rows)}" for name, rows in parts.items()))
        return 0
    if args.data_command == "stats":
        import numpy as np

        examples = data.load_examples(args.file)
        lengths = np.array(
            [_count_fn(_tokenizer(args.base_model))(ex["messages"]) for ex in examples]
        )
        turns = [len(ex["messages"]) for ex in examples]
        stats = {
            "examples": len(examples),
            "turns_mean": round(float(np.mean(turns)), 2),
            "tokens_total": int(lengths.sum()),
            **{f"tokens_p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)},
            "tokens_max": int(lengths.max()),
        }
        print(_json.dumps(stats, indent=2))
        return 0
    records = []
    for lineno, line in data.iter_jsonl(args.input):
        try:
            records.append((lineno, _json.loads(line)))
        except ValueError:
            print(f"{args.input}:{lineno}: not JSON")
            return 1
    converted, problems = data.convert_records(records, system=args.system)
    for p in problems:
        print(f"{args.input}:{p.line}: {p.reason}")
    data.write_jsonl(args.output, converted)
    print(f"{len(converted)} converted, {len(problems)} skipped")
    return 1 if problems else 0


def _train(args: argparse.Namespace) -> int:
    from trainers.config import SFTConfig
    from trainers.sft import train

    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if f.name != "method"
    }
    cfg = SFTConfig(method=args.command, **values)
    result = train(cfg)
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "log_history"}, indent=2))
    print(f"written to {result.output_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainers.evaluate import evaluate_model
    from trainers.merge import load_with_adapter
    from trainers.sft import load_base, resolve_base_model

    base = resolve_base_model(args.model)
    reports = {}
    model, tokenizer = load_base(base)
    reports["base"] = evaluate_model(
        model, tokenizer, args.data, max_new_tokens=args.max_new_tokens, limit=args.limit
    )
    if args.adapter is not None:
        model, tokenizer = load_with_adapter(base, args.adapter)
        reports["adapter"] = evaluate_model(
            model, tokenizer, args.data, max_new_tokens=args.max_new_tokens, limit=args.limit
        )
    keys = ("exact_match", "normalised_match", "token_f1", "loss", "perplexity", "stopped_at_eos")
    print(f"{'metric':<18}" + "".join(f"{name:>12}" for name in reports))
    for key in keys:
        print(f"{key:<18}" + "".join(f"{r[key]:>12}" for r in reports.values()))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from trainers.merge import merge
    from trainers.sft import resolve_base_model

    out = merge(resolve_base_model(args.base), args.adapter, args.out)
    print(f"merged model written to {out}")
    return 0


def _retriever(args: argparse.Namespace) -> int:
    from trainers.retrieval_config import WORSE_THAN_BASE_EXIT, EmbedConfig, RerankConfig
    from trainers.retrievers import format_comparison, train_embedder, train_reranker

    config = EmbedConfig if args.command == "embed" else RerankConfig
    cfg = config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})
    trainer = train_embedder if args.command == "embed" else train_reranker
    result = trainer(cfg, progress=True)  # type: ignore[arg-type]
    m = result.metrics
    print(f"validation: {m['val_pairs']} questions (by {cfg.split}), {m['train_pairs']} to train")
    print(format_comparison(m["base"], m["trained"]))
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']}, {m['train_seconds']} s")
    print(f"written to {result.output_dir}")
    if not result.worse_than_base:
        if not m["better_than_base"]:
            print("note: the trained model is no better than base on the validation split")
        return 0
    bar = "!" * 78
    print(
        f"{bar}\nWARNING: the trained {args.command} model is WORSE than base on the held-out"
        f" validation split\n(MRR@10 {m['base']['mrr@10']:.3f} -> {m['trained']['mrr@10']:.3f}). "
        f"It is written, flagged by {result.output_dir / 'WORSE_THAN_BASE'};\ndo not serve it."
        f"\n{bar}",
        file=sys.stderr,
    )
    return 0 if cfg.allow_worse else WORSE_THAN_BASE_EXIT


def _raft(args: argparse.Namespace) -> int:
    from trainers.raft import RaftConfig, RaftError, run

    cfg = RaftConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RaftConfig)})
    try:
        run(cfg)
    except RaftError as exc:
        print(f"rag-train raft: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from trainers.sft import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = {
        "data": _data,
        "lora": _train,
        "full": _train,
        "eval": _eval,
        "merge": _merge,
        "embed": _retriever,
        "rerank": _retriever,
        "raft": _raft,
    }[args.command]
    try:
        return handler(args)
    except (TrainingError, ValueError, FileNotFoundError) as exc:
        print(f"rag-train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
