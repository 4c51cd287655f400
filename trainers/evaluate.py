"""Evaluation on held-out chat data: greedy answers scored against the reference answers.

Scores: exact match, normalised match (case, punctuation, articles and whitespace ignored) and
token F1 (SQuAD style), plus loss and perplexity over the reference assistant tokens. With an
adapter, base and adapter are evaluated on the same data and shown side by side.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from trainers.data import load_examples
from trainers.encoding import IGNORE, PadCollator, encode_example

__all__ = ["evaluate_model", "exact_match", "normalise", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def normalise(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    data: Path,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    import torch

    examples = load_examples(data)[:limit]
    model.eval()
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id)
    )
    # Loss and perplexity over the reference assistant tokens.
    encoded = [encode_example(tokenizer, ex["messages"]) for ex in examples]
    collate = PadCollator(pad_id)
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size]).items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total_loss += float(loss)
            total_tokens += int((labels != IGNORE).sum())
    # Greedy answers, one at a time (no padding effects on small models).
    rows = []
    with torch.inference_mode():
        for ex in examples:
            prompt, reference = ex["messages"][:-1], ex["messages"][-1]["content"]
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            input_ids = torch.tensor([ids], device=device)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
            )
            new = out[0][len(ids) :]
            stopped = bool(len(new) and int(new[-1]) == tokenizer.eos_token_id)
            prediction = tokenizer.decode(new, skip_special_tokens=True).strip()
            rows.append(
                {
                    "prompt": prompt[-1]["content"],
                    "reference": reference,
                    "prediction": prediction,
                    "stopped_at_eos": stopped,
                    "exact": exact_match(prediction, reference),
                    "normalised": float(normalise(prediction) == normalise(reference)),
                    "f1": token_f1(prediction, reference),
                }
            )
    n = max(len(rows), 1)
    mean_loss = total_loss / max(total_tokens, 1)
    return {
        "examples": len(rows),
        "exact_match": round(sum(r["exact"] for r in rows) / n, 4),
        "normalised_match": round(sum(r["normalised"] for r in rows) / n, 4),
        "token_f1": round(sum(r["f1"] for r in rows) / n, 4),
        "stopped_at_eos": round(sum(r["stopped_at_eos"] for r in rows) / n, 4),
        "loss": round(mean_loss, 4),
        "perplexity": round(math.exp(min(mean_loss, 50)), 3),
        "rows": rows,
    }
