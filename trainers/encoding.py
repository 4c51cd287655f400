"""SFT encoding with the model's own chat template; loss on assistant tokens only.

Each assistant turn is located by rendering the conversation up to it twice: the prefix with
the generation prompt, and the prefix plus the turn. The tokens in between (the reply and the
template's end-of-turn token, which is the model's EOS for ChatML models such as SmolLM2) are
trained; everything else is labelled -100. Batches are padded dynamically to their longest
example and padding is masked by position, never by token id, so an EOS that doubles as the pad
token is still learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["IGNORE", "EncodedExample", "PadCollator", "encode_example"]

IGNORE = -100


@dataclass(frozen=True, slots=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    if not isinstance(out, list):
        out = out["input_ids"]
    return [int(i) for i in out]


def encode_example(
    tokenizer: Any, messages: list[dict[str, str]], *, max_length: int | None = None
) -> EncodedExample:
    full = _ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _ids(tokenizer, messages[:i], generation_prompt=True)
        upto = _ids(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise ValueError(
                "the chat template does not render conversations as prefixes of "
                "each other; assistant tokens cannot be located"
            )
        labels[len(prefix) : len(upto)] = full[len(prefix) : len(upto)]
    if max_length is not None and len(full) > max_length:
        full, labels = full[:max_length], labels[:max_length]
    return EncodedExample(full, labels)


class PadCollator:
    """Pads a batch to its longest example (right padding); padding masked by position."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(
        self, batch: Sequence[EncodedExample | dict[str, list[int]]]
    ) -> dict[str, torch.Tensor]:
        rows = [
            (b.input_ids, b.labels)
            if isinstance(b, EncodedExample)
            else (b["input_ids"], b["labels"])
            for b in batch
        ]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            attention[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
