"""Adapters hot-loaded into the running service: local backend and a fake vLLM upstream."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import torch

from rag_service.backends.local import LocalBackend
from rag_service.settings import Settings
from tests.fake_upstream import MODEL
from tests.support import error_of, free_port, running_server

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def make_adapter(
    base_dir: Path,
    out: Path,
    *,
    seed: int,
    targets=("q_proj", "v_proj"),
    r: int = 4,
    bin_weights: bool = False,
) -> Path:
    """A deterministic LoRA adapter with non-zero weights (so it changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(targets),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(out, safe_serialization=not bin_weights)
    return out


def offline_answer(base_dir: Path, adapter: Path | None, max_new_tokens: int = 24) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return tok.decode(out[0][len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, bundled_model_dir) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(bundled_model_dir, root / "alpha", seed=1)
    make_adapter(bundled_model_dir, root / "beta", seed=2)
    make_adapter(bundled_model_dir, root / "pickled", seed=3, bin_weights=True)
    make_adapter(bundled_model_dir, root / "wide", seed=4, r=128)
    cfg = json.loads((root / "alpha" / "adapter_config.json").read_text())
    (root / "foreign").mkdir()
    (root / "foreign" / "adapter_config.json").write_text(
        json.dumps({**cfg, "target_modules": ["c_attn", "c_proj"]})
    )
    (root / "foreign" / "adapter_model.safetensors").write_bytes(
        (root / "alpha" / "adapter_model.safetensors").read_bytes()
    )
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(bundled_model_dir, outside / "evil", seed=5)
    os.symlink(outside / "evil", root / "link-out")
    make_bad_adapters(root / "alpha", root / "bad", outside / "evil")
    return root


def make_bad_adapters(good: Path, bad: Path, outside: Path) -> None:
    """Broken variants of ``good`` under ``bad``, one directory per defect."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((good / "adapter_config.json").read_text())
    weights = load_file(good / "adapter_model.safetensors")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"

    def put(name: str, config=cfg, tensors=None, raw: bytes | None = None) -> Path:
        d = bad / name
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(config))
        if raw is not None:
            (d / "adapter_model.safetensors").write_bytes(raw)
        else:
            save_file(tensors if tensors is not None else weights, d / "adapter_model.safetensors")
        return d

    put("list-config", [1, 2])
    put("r-abc", {**cfg, "r": "abc"})
    put("r-null", {**cfg, "r": None})
    put("r-zero", {**cfg, "r": 0})
    put("targets-5", {**cfg, "target_modules": 5})
    put("alpha-str", {**cfg, "lora_alpha": "eight"})
    put("not-lora", {**cfg, "peft_type": "IA3"})
    put("random-bytes", raw=os.urandom(4096))
    put("rank-mismatch", {**cfg, "r": 8})
    put("huge-rank", {**cfg, "r": 4096})
    put("no-lora-b", tensors={k: v for k, v in weights.items() if k != f"{q0}.lora_B.weight"})
    put("wrong-dims", tensors={**weights, f"{q0}.lora_A.weight": torch.zeros(4, 100)})
    renamed = {k.replace("layers.0.", "layers.99."): v for k, v in weights.items()}
    put("unknown-module", tensors=renamed)
    # Valid as far as any check before PEFT can tell; PEFT fails half way through the load
    # (after wrapping the target modules), so only the rollback keeps the model clean.
    put("fails-in-peft", {**cfg, "trainable_token_indices": {"embed_tokens": [10**8]}})
    link = put("file-link")
    (link / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", link / "adapter_model.safetensors")
    link = put("config-link")
    (link / "adapter_config.json").unlink()
    os.symlink(outside / "adapter_config.json", link / "adapter_config.json")


@pytest.fixture(scope="module")
def expected(bundled_model_dir, adapters_dir) -> dict[str, str]:
    return {
        name: offline_answer(bundled_model_dir, adapters_dir / name if name != "base" else None)
        for name in ("base", "alpha", "beta")
    }


def chat(client, model: str | None, **extra):
    body = {
        "messages": QUESTION,
        "max_tokens": 24,
        "temperature": 0,
        "rag": {"enabled": False},
        **extra,
    }
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture
def local(make_client, bundled_model_dir, adapters_dir, tmp_path):
    def factory(data_dir: Path | None = None, **settings):
        backend = LocalBackend(Settings(local_model=str(bundled_model_dir)))
        asyncio.run(backend.start())
        return make_client(
            data_dir=data_dir or tmp_path / "data",
            backend=backend,
            adapters_dir=adapters_dir,
            **settings,
        )

    return factory


def test_load_chat_unload_local(local, expected):
    client = local()
    base = "SmolLM2-135M-Instruct"
    resp = client.post("/v1/adapters", json={"name": "alpha", "path": "alpha"})
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert (info["name"], info["rank"], info["version"]) == ("alpha", 4, 1)
    assert info["target_modules"] == ["q_proj", "v_proj"] and info["loaded_at"] > 0
    assert info["path"] == "alpha"  # as a load names it, not where it lies on this machine
    listed = client.get("/v1/adapters").json()["data"]
    assert [(a["name"], a["path"]) for a in listed] == [("alpha", "alpha")]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["alpha"]["parent"] == base and models[base]["parent"] is None

    tuned = chat(client, "alpha").json()
    assert tuned["model"] == "alpha"
    assert tuned["choices"][0]["message"]["content"] == expected["alpha"]
    assert expected["alpha"] != expected["base"]
    assert chat(client, base).json()["choices"][0]["message"]["content"] == expected["base"]
    assert chat(client, None).json()["choices"][0]["message"]["content"] == expected["base"]

    streamed = chat(client, "alpha", stream=True)
    pieces = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in pieces if c["choices"])
        == expected["alpha"]
    )
    assert {c["model"] for c in pieces} == {"alpha"}

    assert client.delete("/v1/adapters/alpha").status_code == 204
    assert error_of(chat(client, "alpha"))["code"] == "model_not_found"
    assert chat(client, base).json()["choices"][0]["message"]["content"] == expected["base"]
    assert client.delete("/v1/adapters/alpha").status_code == 404
    again = client.post("/v1/adapters", json={"name": "alpha", "path": "alpha"}).json()
    assert again["version"] == 2


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../outside", 400, ".."),
        ("/etc", 400, "outside the adapters directory"),
        ("link-out", 400, "outside the adapters directory"),
        ("pickled", 400, "adapter_model.bin is refused"),
        ("missing", 400, "no adapter directory"),
        ("foreign", 400, "does not have"),
    ],
)
def test_refused_adapters(local, path, status, message):
    client = local()
    resp = client.post("/v1/adapters", json={"name": "x", "path": path})
    assert resp.status_code == status, resp.text
    err = error_of(resp)
    assert message in err["message"] and err["param"] == "path"
    assert client.get("/v1/adapters").json()["data"] == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("bad/list-config", "adapter_config.json must be a JSON object, not list"),
        ("bad/r-abc", 'r must be a positive integer, got "abc"'),
        ("bad/r-null", "r must be a positive integer, got null"),
        ("bad/r-zero", "r must be a positive integer, got 0"),
        ("bad/targets-5", "target_modules must be"),
        ("bad/alpha-str", "lora_alpha must be a number"),
        ("bad/not-lora", "only LoRA adapters are served"),
        ("bad/random-bytes", "adapter_model.safetensors is not a valid safetensors file"),
        ("bad/rank-mismatch", "has rank 4 but adapter_config.json says r=8"),
        ("bad/no-lora-b", "has no lora_B tensor"),
        ("bad/wrong-dims", "needs [4, 576]"),
        ("bad/unknown-module", "does not have"),
        ("bad/huge-rank", "adapter rank 4096 is above RAG_MAX_LORA_RANK (64)"),
        ("wide", "adapter rank 128 is above RAG_MAX_LORA_RANK (64)"),
        ("bad/file-link", "adapter_model.safetensors is a symlink leading outside"),
        ("bad/config-link", "adapter_config.json is a symlink leading outside"),
        ("bad/fails-in-peft", "does not fit SmolLM2-135M-Instruct"),
    ],
)
def test_broken_adapters_are_400(local, path, message):
    """Each defect is a 400 naming it (OpenAI error shape), on the local backend, and nothing
    is registered."""
    client = local(upstream_url=None, max_lora_rank=64)  # the local backend, not upstream
    resp = client.post("/v1/adapters", json={"name": "x", "path": path})
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == "path"
    assert message in err["message"], err["message"]
    assert client.get("/v1/adapters").json()["data"] == []


def _structure(model) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.mark.parametrize("bad", ["bad/rank-mismatch", "bad/fails-in-peft"])
def test_failed_load_leaves_model_as_before(
    make_client, bundled_model_dir, adapters_dir, tmp_path, expected, bad
):
    """A refused load, as the first adapter and beside a loaded one, leaves the model exactly
    as it was: same modules, same base output, and later loads see no stale PEFT state
    (no "Already found a peft_config" warning, outputs equal to a fresh load's)."""
    import warnings

    backend = LocalBackend(Settings(local_model=str(bundled_model_dir)))
    asyncio.run(backend.start())
    client = make_client(data_dir=tmp_path / "data", backend=backend, adapters_dir=adapters_dir)
    base = _structure(backend.model)

    def answer(model):
        return chat(client, model).json()["choices"][0]["message"]["content"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert client.post("/v1/adapters", json={"name": "bad", "path": bad}).status_code == 400
        assert _structure(backend.model) == base
        assert answer(None) == expected["base"]
        assert (
            client.post("/v1/adapters", json={"name": "alpha", "path": "alpha"}).status_code == 201
        )
        loaded = _structure(backend.model)
        resp = client.post("/v1/adapters", json={"name": "bad", "path": bad})
        assert resp.status_code == 400, resp.text
        assert _structure(backend.model) == loaded
        assert answer("alpha") == expected["alpha"]
        assert answer(None) == expected["base"]
        assert client.post("/v1/adapters", json={"name": "beta", "path": "beta"}).status_code == 201
        assert answer("beta") == expected["beta"]
        assert answer("alpha") == expected["alpha"]
        assert answer(None) == expected["base"]
    stray = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, DeprecationWarning | FutureWarning)
    ]
    assert stray == []
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["alpha", "beta"]
    assert client.delete("/v1/adapters/alpha").status_code == 204
    assert client.delete("/v1/adapters/beta").status_code == 204
    assert _structure(backend.model) == base


def test_max_lora_rank_setting():
    assert Settings().max_lora_rank == 64
    assert Settings.from_env({"RAG_MAX_LORA_RANK": "16"}).max_lora_rank == 16
    assert Settings.from_env({"RAG_UPSTREAM_MAX_LORA_RANK": "32"}).max_lora_rank == 32  # old name
    both = {"RAG_MAX_LORA_RANK": "16", "RAG_UPSTREAM_MAX_LORA_RANK": "32"}
    assert Settings.from_env(both).max_lora_rank == 16
    with pytest.raises(ValueError, match="RAG_MAX_LORA_RANK"):
        Settings(max_lora_rank=0)


def test_bad_adapter_requests(local):
    client = local()
    assert (
        client.post("/v1/adapters", json={"name": "bad name", "path": "alpha"}).status_code == 400
    )
    assert client.post("/v1/adapters", json={"path": "alpha"}).status_code == 400
    assert client.post("/v1/adapters", json={"name": "a", "path": "alpha"}).status_code == 201
    resp = client.post("/v1/adapters", json={"name": "a", "path": "beta"})
    assert resp.status_code == 409 and error_of(resp)["param"] == "name"
    assert error_of(client.delete("/v1/adapters/zzz"))["code"] == "adapter_not_found"


def test_concurrent_requests_do_not_cross_talk(
    tmp_path, embedder, bundled_model_dir, adapters_dir, expected, fake_server
):
    backend = LocalBackend(Settings(local_model=str(bundled_model_dir)))
    asyncio.run(backend.start())
    settings = Settings(data_dir=tmp_path, port=free_port(), adapters_dir=adapters_dir)
    with running_server(settings, embedder, backend) as url:
        for name in ("alpha", "beta"):
            httpx.post(
                url + "/v1/adapters", json={"name": name, "path": name}, timeout=60
            ).raise_for_status()

        async def burst() -> list[tuple[str, str]]:
            order = ["alpha", "base", "beta"] * 3
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                replies = await asyncio.gather(
                    *[
                        client.post(
                            "/v1/chat/completions",
                            json={
                                "model": None if m == "base" else m,
                                "messages": QUESTION,
                                "max_tokens": 24,
                                "temperature": 0,
                                "rag": {"enabled": False},
                                "stream": i % 2 == 0,
                            },
                        )
                        for i, m in enumerate(order)
                    ]
                )
            out = []
            for m, r in zip(order, replies, strict=True):
                if r.text.startswith("data:"):
                    chunks = [
                        json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")
                    ]
                    text = "".join(
                        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                    )
                else:
                    text = r.json()["choices"][0]["message"]["content"]
                out.append((m, text))
            return out

        for model, text in asyncio.run(burst()):
            assert text == expected[model], model


def test_registry_survives_restart_and_scan_on_start(local, tmp_path, expected):
    data = tmp_path / "persist"
    first = local(data_dir=data)
    assert first.post("/v1/adapters", json={"name": "beta", "path": "beta"}).status_code == 201
    first.__exit__(None, None, None)
    second = local(data_dir=data)
    assert [a["name"] for a in second.get("/v1/adapters").json()["data"]] == ["beta"]
    assert chat(second, "beta").json()["choices"][0]["message"]["content"] == expected["beta"]
    third = local(data_dir=tmp_path / "scan", load_adapters_on_start=True)
    names = {a["name"] for a in third.get("/v1/adapters").json()["data"]}
    assert {"alpha", "beta"} <= names
    assert not {"pickled", "foreign", "link-out"} & names  # refused ones are skipped


# ---- upstream vLLM -------------------------------------------------------------------------


@pytest.fixture
def upstream(tmp_path, embedder, fake_upstream, adapters_dir):
    settings = Settings(
        data_dir=tmp_path,
        port=free_port(),
        upstream_url=fake_upstream.url,
        adapters_dir=adapters_dir,
        max_lora_rank=64,
    )
    with running_server(settings, embedder) as url:
        yield url


def test_vllm_load_unload_and_versions(upstream, fake_upstream, adapters_dir):
    resp = httpx.post(upstream + "/v1/adapters", json={"name": "alpha", "path": "alpha"})
    assert resp.status_code == 201, resp.text
    assert fake_upstream.lora_calls == [("load", "alpha@1")]
    assert fake_upstream.loras["alpha@1"] == str((adapters_dir / "alpha").resolve())
    reply = httpx.post(
        upstream + "/v1/chat/completions", timeout=30, json={"model": "alpha", "messages": QUESTION}
    ).json()
    assert fake_upstream.requests[-1]["model"] == "alpha@1"
    assert reply["model"] == "alpha"
    listed = httpx.get(upstream + "/v1/models").json()["data"]
    models = [m["id"] for m in listed if m.get("type") != "embedding"]
    assert models == [MODEL, "alpha"]
    assert httpx.delete(upstream + "/v1/adapters/alpha").status_code == 204
    assert fake_upstream.lora_calls[-1] == ("unload", "alpha@1")
    httpx.post(upstream + "/v1/adapters", json={"name": "alpha", "path": "alpha"})
    assert fake_upstream.lora_calls[-1] == ("load", "alpha@2")  # never load_inplace


def test_vllm_restart_reregisters(upstream, fake_upstream):
    httpx.post(upstream + "/v1/adapters", json={"name": "beta", "path": "beta"})
    fake_upstream.loras.clear()  # the upstream restarted and forgot its adapters
    import time

    time.sleep(5.1)  # past the re-check interval
    resp = httpx.post(
        upstream + "/v1/chat/completions", timeout=30, json={"model": "beta", "messages": QUESTION}
    )
    assert resp.status_code == 200, resp.text
    assert fake_upstream.lora_calls == [("load", "beta@1"), ("load", "beta@1")]
    assert fake_upstream.requests[-1]["model"] == "beta@1"


def test_vllm_rank_refused(upstream, fake_upstream):
    resp = httpx.post(upstream + "/v1/adapters", json={"name": "wide", "path": "wide"})
    assert resp.status_code == 400
    assert "--max-lora-rank" in error_of(resp)["message"]
    assert fake_upstream.lora_calls == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("bad/list-config", "must be a JSON object"),
        ("bad/r-abc", "r must be a positive integer"),
        ("bad/targets-5", "target_modules must be"),
        ("bad/random-bytes", "not a valid safetensors file"),
        ("bad/file-link", "symlink leading outside"),
    ],
)
def test_vllm_broken_adapter_not_forwarded(upstream, fake_upstream, path, message):
    resp = httpx.post(upstream + "/v1/adapters", json={"name": "x", "path": path})
    assert resp.status_code == 400, resp.text
    assert message in error_of(resp)["message"]
    assert fake_upstream.lora_calls == []


def test_replicas_on_one_database_serve_the_same_adapters(
    tmp_path, embedder, fake_upstream, adapters_dir, pg_cluster
):
    """Two replicas of the postgres engine: an adapter loaded through A is served by B (it
    follows the database), one unloaded through B is gone from A, and a refused load leaves
    nothing shared."""
    database_url = pg_cluster.create_database()

    def settings(name: str) -> Settings:
        return Settings(
            data_dir=tmp_path / name,
            port=free_port(),
            upstream_url=fake_upstream.url,
            adapters_dir=adapters_dir,
            max_lora_rank=64,
            database_url=database_url,
        )

    def served(url: str) -> list[str]:
        return [a["name"] for a in httpx.get(url + "/v1/adapters").json()["data"]]

    def wait_for(url: str, names: list[str]) -> None:
        deadline = time.monotonic() + 20
        while served(url) != names:
            assert time.monotonic() < deadline, (url, served(url), names)
            time.sleep(0.2)

    with running_server(settings("a"), embedder) as a, running_server(settings("b"), embedder) as b:
        resp = httpx.post(a + "/v1/adapters", json={"name": "alpha", "path": "alpha"})
        assert resp.status_code == 201, resp.text
        wait_for(b, ["alpha"])
        reply = httpx.post(
            b + "/v1/chat/completions", timeout=30, json={"model": "alpha", "messages": QUESTION}
        )
        assert reply.status_code == 200 and reply.json()["model"] == "alpha"
        bad = httpx.post(a + "/v1/adapters", json={"name": "beta", "path": "bad/r-abc"})
        assert bad.status_code == 400
        assert httpx.delete(b + "/v1/adapters/alpha").status_code == 204
        wait_for(a, [])
        assert served(b) == []


# ---- the adapter capability ----------------------------------------------------------------


def test_backends_declare_the_adapter_capability(bundled_model_dir):
    """Both backends subclass AdapterBackend, so the type checker holds them to it, and are
    found to be adapter backends by the app's check even before a model is loaded."""
    from rag_service.backends.base import AdapterBackend
    from rag_service.backends.upstream import UpstreamBackend

    assert AdapterBackend in LocalBackend.__mro__ and AdapterBackend in UpstreamBackend.__mro__
    upstream = UpstreamBackend(
        Settings(upstream_url="http://127.0.0.1:9/v1", upstream_model="m"),
        count_text_tokens=len,
    )
    local = LocalBackend(Settings(local_model=str(bundled_model_dir)))  # not started
    assert isinstance(upstream, AdapterBackend) and isinstance(local, AdapterBackend)


def test_a_request_that_fails_before_the_upstream_answers_holds_no_adapter(
    make_client, adapters_dir
):
    """The upstream went away: a chat for an adapter fails (502, no connection, naming what it
    was doing) and holds nothing, so the unload after it does not wait for the request."""
    from tests.fake_upstream import serve_fake

    with serve_fake(free_port()) as fake:
        client = make_client(upstream_url=fake.url, adapters_dir=adapters_dir, max_lora_rank=64)
        assert (
            client.post("/v1/adapters", json={"name": "alpha", "path": "alpha"}).status_code == 201
        )
        body = {"model": "alpha", "messages": QUESTION, "rag": {"enabled": False}}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    time.sleep(5.1)  # past the interval after which the upstream is asked for its adapters
    for stream in (False, True):
        resp = client.post("/v1/chat/completions", json={**body, "stream": stream})
        assert resp.status_code == 502, resp.text
        message = error_of(resp)["message"]
        assert "cannot connect to the upstream server" in message and "listing models" in message
    started = time.monotonic()
    resp = client.delete("/v1/adapters/alpha")
    assert time.monotonic() - started < 30, "the unload waited for a request that had failed"
    assert resp.status_code == 502 and "(unload_lora_adapter)" in error_of(resp)["message"]
    assert client.get("/v1/adapters").json()["data"] == []
