"""Batched generation for the local backend: one thread, requests generated together.

Requests wait in a queue. The generation thread takes the oldest one and every waiting
request that can share its batch, up to ``max_batch`` rows, and runs one ``generate`` call over
them: prompts left-padded, per-row token limits, per-row cancellation, and each row's text
streamed as it is produced. A batch is formed from requests with the same sampling settings
and stop strings; a request with a seed runs alone (its sampling must not depend on others).

Adapters: with ``mixing="switch"`` (the default) a batch holds one adapter, made active with
``set_adapter`` for that batch; with ``mixing="rows"`` a batch mixes adapters, one per row,
through PEFT's ``adapter_names`` (``"__base__"`` for the base model). Both never cross-talk.
``switch`` is the default because it measured faster with mixed traffic (benchmarks/
bench_adapters.py, D1, CPU: PEFT's mixed-batch LoRA forward splits every LoRA layer's input by
adapter at each decoding step, which costs more than running one batch per adapter).

Static batching: a request that arrives while a batch runs waits for the next batch. When the
thread is idle, the first request waits ``wait_s`` for others to join it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["BASE_ADAPTER", "BatchGenerator", "GenerationRequest", "GenerationResult", "Mixing"]

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
Mixing = Literal["rows", "switch"]


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class GenerationRequest:
    """One chat's generation. ``on_text`` and ``on_done`` are called from the generation
    thread; ``cancel`` stops the row at its next token."""

    messages: list[dict[str, Any]]
    max_new_tokens: int
    adapter: str | None  # None = the base model
    on_text: Callable[[str], None]
    on_done: Callable[[GenerationResult | BaseException], None]
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def sampled(self) -> bool:
        return self.temperature is not None and self.temperature > 0

    def batch_key(self, mixing: Mixing) -> Hashable:
        """Requests with equal keys can share a batch."""
        if self.seed is not None:
            return ("alone", id(self))
        sampling = ("sample", self.temperature, self.top_p) if self.sampled else ("greedy",)
        adapter = (self.adapter,) if mixing == "switch" else ()
        return (*sampling, self.stop, *adapter)


class _Row:
    """A request inside a running batch: its tokens, text and whether it is finished."""

    def __init__(self, request: GenerationRequest, prompt_len: int, streamer: Any) -> None:
        self.request = request
        self.prompt_len = prompt_len
        self.streamer = streamer
        self.generated = 0
        self.finish: str | None = None  # "stop" | "length" | "cancelled"
        self.reported = False
        self._scanned = 0  # characters of the text already searched for stop strings

    def report(self, error: BaseException | None = None) -> None:
        """Hand the row's outcome to its request, once: as soon as the row is finished, not
        when the whole batch is."""
        if self.reported:
            return
        self.reported = True
        if error is not None:
            self.request.on_done(error)
            return
        self.streamer.flush()
        finish = self.finish if self.finish in ("stop", "length") else "stop"
        self.request.on_done(
            GenerationResult(self.streamer.text, finish, self.prompt_len, self.generated)
        )

    def _at_stop(self) -> bool:
        """Whether the row's text now holds a stop string: only the text new since the last
        look is searched (plus a stop's length of overlap), so the cost is the stop strings'
        length, not the vocabulary times it (transformers' ``stop_strings`` builds and caches
        a vocabulary x length table per stop set: gigabytes for long stops)."""
        text = self.streamer.sent
        longest = max(map(len, self.request.stop))
        start = max(0, self._scanned - longest + 1)
        self._scanned = len(text)
        return any(stop in text[start:] for stop in self.request.stop if stop)

    def take(self, token: int, eos: frozenset[int]) -> None:
        if self.finish is not None:
            return
        self.generated += 1
        if token in eos:
            self.finish = "stop"
            return
        self.streamer.put_token(token)
        if self.request.stop and self._at_stop():
            self.finish = "stop"
        elif self.generated >= self.request.max_new_tokens:
            self.finish = "length"
        elif self.request.cancel.is_set():
            self.finish = "cancelled"


class BatchGenerator:
    """The generation thread and its queue.

    ``model`` and ``tokenizer`` are read through callables at each batch, so the backend can
    swap the model (a PEFT wrapper appears with the first adapter) between batches. ``turn``
    is the backend's hold on the model for one batch (adapter loads go between batches).
    """

    def __init__(
        self,
        *,
        model: Callable[[], Any],
        tokenizer: Callable[[], Any],
        prompt_ids: Callable[[list[dict[str, Any]]], list[int]],
        turn: Callable[[], contextlib.AbstractContextManager[Any]],
        adapter_scope: Callable[[str | None], contextlib.AbstractContextManager[Any]],
        has_adapters: Callable[[], bool],
        max_batch: int = 8,
        wait_s: float = 0.01,
        mixing: Mixing = "switch",
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._turn = turn
        self._adapter_scope = adapter_scope
        self._has_adapters = has_adapters
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.mixing: Mixing = mixing
        self._queue: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # batches started, and rows in them
        self.rows = 0
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (metrics)
        # Told each finished batch's longest prompt, in tokens, once its memory is freed.
        self.after_batch: Callable[[int], None] | None = None

    # ---- queue ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the generator is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
                self._thread.start()
            self._queue.append(request)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for request in pending:
            request.on_done(RuntimeError("the local model is shutting down"))

    def _next_batch(self) -> list[GenerationRequest] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            if self.wait_s > 0 and len(self._queue) < self.max_batch:
                # An idle generator gives a burst a moment to arrive together.
                deadline = time.monotonic() + self.wait_s
                while len(self._queue) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            first = self._queue[0]
            key = first.batch_key(self.mixing)
            batch = [r for r in self._queue if r.batch_key(self.mixing) == key][: self.max_batch]
            taken = set(map(id, batch))
            self._queue = [r for r in self._queue if id(r) not in taken]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.cancel.is_set()]
            for r in batch:
                if r.cancel.is_set():
                    r.on_done(RuntimeError("cancelled before it started"))
            if not live:
                continue
            rows: list[_Row] = []
            self.batches += 1
            self.rows += len(live)
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                with self._turn():
                    self._generate(live, rows)
            except Exception as exc:  # a failed batch fails its requests, not the thread
                log.exception("generation of a batch of %d failed", len(live))
                answered = {id(row.request) for row in rows if row.reported}
                for r in live:
                    if id(r) not in answered:
                        r.on_done(exc)
                continue
            for row in rows:
                row.report()  # rows stopped by a stop string or the batch's last step
            if self.after_batch is not None and rows:
                self.after_batch(max(row.prompt_len for row in rows))

    # ---- one batch -----------------------------------------------------------------------
    def _generate(self, batch: list[GenerationRequest], rows: list[_Row]) -> None:
        """Generate ``batch``, filling ``rows``; each row is reported when it finishes."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        model, tokenizer = self._model(), self._tokenizer()
        prompts = [self._prompt_ids(r.messages) for r in batch]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(prompts):  # left padding: every row ends at the same column
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        rows += [
            _Row(r, len(ids), _RowText(tokenizer, r.on_text))
            for r, ids in zip(batch, prompts, strict=True)
        ]
        eos = _eos_ids(model, tokenizer) | {pad}  # a row stopped by HF gets pad tokens after

        class Rows(BaseStreamer):
            """Receives each step's token for every row (the first call is the prompt)."""

            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for row, token in zip(rows, value.reshape(-1).tolist(), strict=True):
                    row.take(int(token), eos)
                    if row.finish is not None:
                        row.report()

            def end(self) -> None:
                pass  # rows still open are reported by the caller

        class RowsDone(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **_: Any) -> Any:
                done = [row.finish is not None or row.request.cancel.is_set() for row in rows]
                return torch.tensor(done, dtype=torch.bool, device=ids.device)

        first = batch[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.max_new_tokens for r in batch),
            "do_sample": first.sampled,
            "pad_token_id": pad,
        }
        if first.sampled:
            kwargs["temperature"] = float(first.temperature)  # type: ignore[arg-type]
            if first.top_p is not None:
                kwargs["top_p"] = float(first.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self._has_adapters():
            if self.mixing == "rows" and any(r.adapter is not None for r in batch):
                kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in batch]
            else:
                scope = self._adapter_scope(first.adapter)
        device = model.device
        with torch.inference_mode(), scope:
            model.generate(
                input_ids.to(device),
                attention_mask=mask.to(device),
                streamer=Rows(),
                stopping_criteria=StoppingCriteriaList([RowsDone()]),
                **kwargs,
            )


class _RowText:
    """Incremental detokenisation of one row: the whole row is decoded at each token and the
    new end of it emitted, unless it ends inside a multi-byte character (then it waits)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._on_text = on_text
        self._tokens: list[int] = []
        self._sent = ""

    def put_token(self, token: int) -> None:
        self._tokens.append(token)
        self._send(self.text)

    def flush(self) -> None:
        self._send(self.text, final=True)

    @property
    def sent(self) -> str:
        """The text emitted so far."""
        return self._sent

    @property
    def text(self) -> str:
        return str(self._tokenizer.decode(self._tokens, skip_special_tokens=True))

    def _send(self, text: str, final: bool = False) -> None:
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self._sent) and len(text) > len(self._sent):
            self._on_text(text[len(self._sent) :])
            self._sent = text


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)
