"""Where PEFT and transformers disagree, in one place.

PEFT reads ``model.is_gradient_checkpointing`` whenever it wraps a model; transformers 5
deprecates that name with a FutureWarning, so every adapter load and every LoRA run printed a
warning that no user of this service can act on. :func:`wrapping` silences exactly that
warning around the calls that wrap a model; anything else PEFT or transformers say still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["wrapping"]


@contextlib.contextmanager
def wrapping() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
        )
        yield
