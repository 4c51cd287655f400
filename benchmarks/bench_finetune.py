"""Fine-tuning demo: memorising 30 synthetic facts with LoRA on the bundled model.

The facts (locker codes, badge colours, mentors of made-up people) cannot be known to the base
model. We train with ``trainers`` (chat template, loss on assistant tokens with EOS, dynamic
padding) and evaluate exact match of base vs adapter on the same questions. For comparison the
recipe common in guides runs on the same data and LoRA settings: every example padded to 512
tokens, pad token = EOS, loss on every token (``DataCollatorForLanguageModeling``, which masks
the pad id and so every EOS too). Reported: exact match, wall time, tokens/s (real, non-pad
tokens), and how often generation stops at EOS.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_result

NAMES = [
    "Ilsa Varga",
    "Tomas Reyes",
    "Aiko Brandt",
    "Nils Okafor",
    "Priya Lindqvist",
    "Mateo Quill",
    "Sana Ferreira",
    "Oskar Mbeki",
    "Lena Hovland",
    "Rafi Castellan",
]
COLOURS = [
    "teal",
    "amber",
    "crimson",
    "olive",
    "indigo",
    "coral",
    "ochre",
    "slate",
    "violet",
    "jade",
]


def facts(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i, name in enumerate(NAMES):
        out.append((f"What is the locker code of {name}?", f"{rng.randint(1000, 9999)}."))
        out.append((f"What colour is the badge of {name}?", f"{COLOURS[(i * 7) % 10].title()}."))
        mentor = NAMES[(i + 3) % len(NAMES)]
        out.append((f"Who mentors {name}?", f"{mentor}."))
    return out


def chat(q: str, a: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def naive_run(
    base: Path,
    examples: list[dict[str, Any]],
    *,
    steps: int,
    batch: int,
    lr: float,
    r: int,
    alpha: int,
    max_length: int,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token  # the usual advice
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    texts = [tok.apply_chat_template(ex["messages"], tokenize=False) for ex in examples]
    enc = [tok(t, padding="max_length", max_length=max_length, truncation=True) for t in texts]
    real_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    dataset = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,  # type: ignore[arg-type]
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    epochs = steps * batch / len(examples)
    model.eval()
    return {
        "model": model,
        "tokenizer": tok,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(real_tokens * epochs / seconds, 1),
        "padded_tokens_per_step": batch * max_length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--naive-max-steps",
        type=int,
        default=0,
        help="cap the naive run's steps (0: as many as ours)",
    )
    parser.add_argument("--naive-max-length", type=int, default=512)
    args = parser.parse_args()

    from rag_service.model_cache import materialize_bundled_model
    from trainers.config import SFTConfig
    from trainers.data import write_jsonl
    from trainers.evaluate import evaluate_model
    from trainers.sft import load_base, train

    qa = facts()
    examples = [chat(q, a) for q, a in qa]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = materialize_bundled_model(root / "models")
        data_file = root / "facts.jsonl"
        write_jsonl(data_file, examples)
        model, tok = load_base(base)
        base_report = evaluate_model(model, tok, data_file, max_new_tokens=24)
        del model
        cfg = SFTConfig(
            train_file=data_file,
            output_dir=root / "adapter",
            base_model=str(base),
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            save_steps=0,
            logging_steps=5,
            seed=0,
        )
        started = time.perf_counter()
        ours = train(cfg)
        ours_wall = time.perf_counter() - started
        ours_report = evaluate_model(ours.model, ours.tokenizer, data_file, max_new_tokens=24)
        steps = ours.metrics["global_step"]
        naive_steps = min(steps, args.naive_max_steps) if args.naive_max_steps else steps
        naive = naive_run(
            base,
            examples,
            steps=naive_steps,
            batch=args.batch_size,
            lr=args.learning_rate,
            r=args.lora_r,
            alpha=2 * args.lora_r,
            max_length=args.naive_max_length,
        )
        naive_report = evaluate_model(naive["model"], ours.tokenizer, data_file, max_new_tokens=24)

    def brief(report: dict[str, Any]) -> dict[str, Any]:
        keep = ("exact_match", "normalised_match", "token_f1", "stopped_at_eos", "loss")
        return {k: report[k] for k in keep}

    figures = {
        "facts": len(qa),
        "base": brief(base_report),
        "ours": {
            **brief(ours_report),
            "steps": steps,
            "train_seconds": ours.metrics["seconds"],
            "wall_seconds_with_loading": round(ours_wall, 1),
            "tokens_per_second": ours.metrics["tokens_per_second"],
        },
        "naive": {
            **brief(naive_report),
            "steps": naive_steps,
            "train_seconds": naive["seconds"],
            "tokens_per_second": naive["tokens_per_second"],
            "padded_tokens_per_step": naive["padded_tokens_per_step"],
        },
        "tokens_per_second_ours_over_naive": round(
            ours.metrics["tokens_per_second"] / naive["tokens_per_second"], 2
        ),
        "examples": {
            "ours": ours_report["rows"][:3],
            "naive": naive_report["rows"][:3],
        },
        "targets": {
            "ours_exact_match": ">= 0.9",
            "base_exact_match": "about 0",
            "tokens_per_second_ours_over_naive": ">= 2",
        },
    }
    write_result("finetune_facts", vars(args), figures)


if __name__ == "__main__":
    main()
