"""Supervised fine-tuning, LoRA or full, on chat JSONL (one core, two configs).

The model's own chat template; loss on assistant tokens only (EOS included); dynamic padding;
eval loss on the val split every N steps; optional early stopping; checkpoints and resume;
gradient accumulation; bf16/fp16 on GPU, fp32 on CPU; QLoRA with CUDA. Runs unchanged under
``accelerate launch`` or ``torchrun`` for several GPUs (the Hugging Face Trainer handles DDP).

Nothing is written to ``output_dir`` until the run succeeded: work happens in
``<output_dir>.partial`` (checkpoints live there, which is what ``--resume`` picks up) and the
finished result is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rag_service import peft_compat
from rag_service.model_cache import materialize_bundled_model
from trainers.config import SFTConfig
from trainers.data import load_examples
from trainers.encoding import PadCollator, encode_example

__all__ = ["TrainResult", "TrainingError", "load_base", "resolve_base_model", "train"]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run cannot start or finish; the message says why and what to do."""


def resolve_base_model(base: str) -> Path:
    """The base model directory; empty = the bundled SmolLM2 (converted once, cached)."""
    if not base:
        return materialize_bundled_model()  # the per-user cache the service uses too
    path = Path(base)
    if not (path / "config.json").exists():
        raise TrainingError(
            f"base model {base!r} is not a Hugging Face model directory (no config.json)"
        )
    return path


def load_base(path: Path, *, dtype: Any = None, quantization: Any = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load base model {path}: {exc}") from exc
    if tokenizer.chat_template is None:
        raise TrainingError(f"{path} has no chat template; use an instruct/chat model")
    return model, tokenizer


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "rag-service"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or evals:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _encode_file(tokenizer: Any, path: Path, max_length: int) -> list[dict[str, list[int]]]:
    try:
        examples = load_examples(path)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    encoded = [encode_example(tokenizer, ex["messages"], max_length=max_length) for ex in examples]
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: Any  # the trained model (a PeftModel for LoRA), in memory
    tokenizer: Any
    output_dir: Path


def train(cfg: SFTConfig, *, callbacks: list[Any] | None = None) -> TrainResult:
    """Run a training job; its metrics are also written to metrics.json.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (progress hooks, tests).
    """
    import torch
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} exists and is not empty; choose another --output-dir")
    work = out.with_name(out.name + ".partial")
    if work.exists() and not cfg.resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    base_path = resolve_base_model(cfg.base_model)
    quant = None
    if cfg.qlora:
        if not cuda:
            raise TrainingError(
                "QLoRA needs a CUDA GPU (4-bit weights through bitsandbytes); "
                "drop --qlora to train LoRA in full precision"
            )
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
    model, tokenizer = load_base(
        base_path, dtype=dtype if cfg.method == "lora" else None, quantization=quant
    )
    train_set = _encode_file(tokenizer, cfg.train_file, cfg.max_length)
    val_set = _encode_file(tokenizer, cfg.val_file, cfg.max_length) if cfg.val_file else None
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quant is not None:
            model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.modules,
            use_dora=cfg.use_dora,
            task_type="CAUSAL_LM",
        )
        try:
            with peft_compat.wrapping():
                model = get_peft_model(model, lora)
        except ValueError as exc:
            raise TrainingError(f"LoRA target modules do not fit this model: {exc}") from exc
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id)
    )
    evaluating = val_set is not None and len(val_set) > 0
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.eval_steps if evaluating else None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        load_best_model_at_end=bool(evaluating and cfg.early_stopping_patience and cfg.save_steps),
        metric_for_best_model="eval_loss" if evaluating else None,
        greater_is_better=False,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        seed=cfg.seed,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        report_to=["tensorboard"] if cfg.tensorboard else "none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    callbacks = list(callbacks or [])
    if cfg.early_stopping_patience and evaluating:
        if not cfg.save_steps:
            raise TrainingError("--early-stopping-patience needs checkpoints (--save-steps > 0)")
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,  # type: ignore[arg-type]
        eval_dataset=val_set,
        data_collator=PadCollator(pad_id),  # type: ignore
        callbacks=callbacks,
    )
    resume = None
    if cfg.resume:
        checkpoints = sorted(
            (work / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
        )
        if not checkpoints:
            raise TrainingError(f"--resume: no checkpoint under {work / 'checkpoints'}")
        resume = str(checkpoints[-1])
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrainingError(
            "out of GPU memory: lower --batch-size or --max-length, raise "
            "--grad-accum, or use --qlora"
        ) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise TrainingError("out of memory: lower --batch-size or --max-length") from exc
        raise
    seconds = time.perf_counter() - started
    steps_done = trainer.state.global_step
    tokens_per_epoch = sum(len(ex["input_ids"]) for ex in train_set)
    epochs_done = float(trainer.state.epoch or 0)
    history = trainer.state.log_history
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    model_to_save = trainer.model
    model_to_save.save_pretrained(final, safe_serialization=True)  # type: ignore[union-attr,operator]
    tokenizer.save_pretrained(final)
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "method": cfg.method,
        "global_step": steps_done,
        "epochs": round(epochs_done, 3),
        "train_examples": len(train_set),
        "val_examples": len(val_set or []),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": result.training_loss,
        "eval_loss_best": min(eval_losses) if eval_losses else None,
        "eval_loss_last": eval_losses[-1] if eval_losses else None,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_per_epoch * epochs_done / seconds, 1) if seconds else 0,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "log_history": history,
    }
    weights = sorted(base_path.glob("*.safetensors")) or sorted(base_path.glob("*.bin"))
    record = {
        "base_model": str(base_path.resolve()),
        "base_model_sha256": _sha256(weights) if weights else None,
        "config": cfg.to_dict(),
        "learning_rate": cfg.lr,
        "data_sha256": {
            str(p): _sha256([Path(p)]) for p in (cfg.train_file, cfg.val_file) if p is not None
        },
        "versions": _versions(),
        "git_sha": _git_sha(),
        "device": "cuda" if cuda else "cpu",
        "precision": "bf16" if bf16 else ("fp16" if cuda else "fp32"),
    }
    (final / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot(history, final / "loss.png")
    for stray in final.glob("*.bin"):  # safetensors only
        stray.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s (%d steps, %.1fs)", out, steps_done, seconds)
    trained = trainer.model
    trained.eval()  # type: ignore[union-attr]
    return TrainResult(metrics, trained, tokenizer, out)
