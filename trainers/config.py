"""Training configuration: one frozen dataclass for LoRA and full SFT, which drives the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["SFTConfig"]

Method = Literal["lora", "full"]


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Every hyperparameter of a run; saved to training_config.json in the output."""

    method: Method = field(default="lora", metadata=_h("lora or full fine-tuning"))
    train_file: Path = field(metadata=_h("chat JSONL for training"))
    val_file: Path | None = field(default=None, metadata=_h("chat JSONL for eval loss"))
    output_dir: Path = field(metadata=_h("where the adapter or model is written"))
    base_model: str = field(
        default="", metadata=_h("Hugging Face causal LM directory; empty = bundled SmolLM2")
    )
    epochs: float = field(default=3.0, metadata=_h("passes over the training data"))
    max_steps: int = field(default=-1, metadata=_h("stop after this many steps (-1: epochs)"))
    learning_rate: float | None = field(
        default=None, metadata=_h("peak learning rate (default 2e-4 LoRA, 2e-5 full)")
    )
    batch_size: int = field(default=8, metadata=_h("examples per device step"))
    grad_accum: int = field(default=1, metadata=_h("gradient accumulation steps"))
    max_length: int = field(default=1024, metadata=_h("longest example in tokens (truncated)"))
    warmup_ratio: float = field(default=0.03, metadata=_h("share of steps warming up"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    eval_steps: int = field(default=50, metadata=_h("evaluate on the val split every N steps"))
    save_steps: int = field(default=50, metadata=_h("checkpoint every N steps (0: never)"))
    early_stopping_patience: int | None = field(
        default=None, metadata=_h("stop after N evals without a better eval loss")
    )
    logging_steps: int = field(default=5, metadata=_h("log the loss every N steps"))
    seed: int = field(default=42, metadata=_h("random seed"))
    lora_r: int = field(default=16, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_h("LoRA alpha"))
    lora_dropout: float = field(default=0.05, metadata=_h("LoRA dropout"))
    target_modules: str = field(
        default="all-linear", metadata=_h("comma-separated module names, or all-linear")
    )
    use_dora: bool = field(default=False, metadata=_h("DoRA (weight-decomposed LoRA)"))
    qlora: bool = field(default=False, metadata=_h("4-bit base weights (QLoRA); needs CUDA"))
    tensorboard: bool = field(default=False, metadata=_h("log to TensorBoard"))
    resume: bool = field(default=False, metadata=_h("resume from the last checkpoint"))

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')}: {why}")

        for name in (
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_steps",
            "logging_steps",
            "lora_r",
            "lora_alpha",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise bad("epochs", "must be positive (or set --max-steps)")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.qlora and self.method != "lora":
            raise bad("qlora", "applies to LoRA only")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise bad("learning_rate", "must be positive")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.method == "lora" else 2e-5

    @property
    def modules(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }
