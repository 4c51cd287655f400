"""Fine-tuning for rag-service: chat data preparation, LoRA / full SFT, evaluation, merge.

Console script: ``rag-train`` (see :mod:`trainers.cli`).
"""
