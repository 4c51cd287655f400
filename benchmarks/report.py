"""Render the README's benchmark figures from benchmarks/results/*.json.

``python -m benchmarks.report`` rewrites the block between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in README.md, and the retrieval-quality tables between
``<!-- hybrid-grid:start -->`` / ``<!-- quality-pipelines:start -->`` / ``<!-- raft:start -->``
and their ends, so the README always quotes the latest results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _where(result: dict[str, Any]) -> str:
    env = result["environment"]
    hw = env["gpu"] or f"{env['cpu_count']}-core {env['cpu']}"
    return f"{hw}, git {env['git_sha'][:9]}"


def _ok(value: float, target: str) -> str:
    op, limit = target.split()[0], float(target.split()[1])
    good = value >= limit if op == ">=" else value <= limit
    return f"{value} ({'meets' if good else 'misses'} {target})"


def _p(lat: dict[str, Any]) -> str:
    return f"{lat['p50_ms']} / {lat['p99_ms']} ms"


def _b7_name(scale: int, index: str) -> str:
    """B7's collection names, as ``benchmarks.bench_postgres.collection_name`` makes them."""
    size = f"{scale // 1000}k" if scale % 1000 == 0 else str(scale)
    return f"s{size}-{index.lower()}"


def _b7(b7: dict[str, Any]) -> list[str]:
    f = b7["figures"]
    pg = f["postgres"]
    lines = [
        f"**B7, postgres engine vs embedded** ({_where(b7)}; PostgreSQL "
        f"{pg['server_version']} + pgvector {pg['pgvector']} from `pgserver` on the same cores, "
        f"shared_buffers {pg['shared_buffers']}; B3's data, top_k 10, sequential queries over "
        "HTTP, ratios from one run):",
        "",
        "| chunks | index | embedded p50 / p99 | postgres p50 / p99 | postgres / embedded p50 | "
        "HNSW recall@10 vs exact, embedded / postgres |",
        "|---|---|---|---|---|---|",
    ]
    for scale, v in f["search"].items():
        recall = v["recall_at_10_hnsw_vs_exact"]
        for index in ("Flat", "HNSW32"):
            r = v[_b7_name(int(scale), index)]
            rec = (
                f"{recall['embedded_faiss_hnsw32']} / {recall['postgres_pgvector_hnsw32']}"
                if index != "Flat"
                else f"exact results agree: {v['exact_results_agree_across_engines']}"
            )
            lines.append(
                f"| {int(scale):,} | {index} | {_p(r['embedded'])} | {_p(r['postgres'])} | "
                f"{r['p50_postgres_over_embedded']} | {rec} |"
            )
    lines += [
        "",
        "Ingest through each engine's API (precomputed vectors, "
        f"{b7['params']['batch']} documents per transaction), chunks/s, postgres / embedded "
        "in brackets. pgvector's HNSW collections are loaded in bulk (index dropped, chunks "
        "written, the same index built by `CREATE INDEX`); the last column adds "
        f"{b7['params']['probe']} chunks to the built HNSW collections, an insert each:",
        "",
        "| chunks | Flat: embedded / postgres | HNSW32: embedded / postgres bulk | "
        "insert into built HNSW32: embedded / postgres |",
        "|---|---|---|---|",
    ]
    for scale, v in f["ingest"].items():
        fl, hn, pr = (
            v["flat_store_write"],
            v["hnsw32_store_write"],
            v["hnsw32_insert_into_built_collection"],
        )
        lines.append(
            f"| {int(scale):,} | {fl['embedded_chunks_per_s']} / {fl['postgres_chunks_per_s']} "
            f"({fl['postgres_over_embedded']}) | {hn['embedded_chunks_per_s']} / "
            f"{hn['postgres_bulk_chunks_per_s']} ({hn['postgres_bulk_over_embedded']}) | "
            f"{pr['embedded_chunks_per_s']} / {pr['postgres_chunks_per_s']} "
            f"({pr['postgres_over_embedded']}) |"
        )
    http = f["ingest_http"]
    c = f["concurrent_search"]
    largest = list(f["search"])[-1]
    big = _b7_name(int(largest), "HNSW32")
    pg_big = f["store_detail"]["postgres"][big]
    emb_big = f["store_detail"]["embedded"][big]
    lines += [
        "",
        f"Through HTTP, embedding included ({http['embedded']['documents']} sentences): "
        f"embedded {http['embedded']['chunks_per_s']} chunks/s, postgres "
        f"{http['postgres']['chunks_per_s']} ({http['postgres_over_embedded']}). At "
        f"{int(largest):,} chunks the pgvector HNSW32 index takes "
        f"{pg_big['hnsw_index_bytes_per_chunk']} bytes per chunk ({pg_big['hnsw_index_mib']} MiB; "
        f"the partition's heap {pg_big['heap_bytes_per_chunk']} more), the FAISS HNSW32 "
        f"snapshot {emb_big['faiss_snapshot_bytes_per_chunk']}; `CREATE INDEX` took "
        f"{pg_big['create_index_seconds']} s.",
        "",
        f"{c['clients']} concurrent search clients on `{c['collection']}` "
        f"({b7['params']['duration']} s each; servers, database and clients on the same cores):",
        "",
        "| setup | requests/s | p50 | p99 | errors |",
        "|---|---|---|---|---|",
    ]
    setups = (
        ("embedded_1_process", "embedded, one process"),
        ("postgres_1_replica", "postgres, one replica"),
        ("postgres_2_replicas", "postgres, two replicas (two `serve` processes, one database)"),
        ("postgres_workers_2", "postgres, `serve --workers 2`"),
    )
    for key, label in setups:
        r = c.get(key)
        if isinstance(r, dict) and r.get("latency"):
            lines.append(
                f"| {label} | {r['requests_per_s']} | {r['latency']['p50_ms']} ms | "
                f"{r['latency']['p99_ms']} ms | {r['errors']} |"
            )
    loads = [s["loadavg_1m_before"] for s in f["steps"]] + [
        s["loadavg_1m_after"] for s in f["steps"]
    ]
    lines += [
        "",
        f"Two replicas over one: {c['two_replicas_over_one_throughput']}x the throughput. "
        f"The machine's 1-minute load average ran from {min(loads)} to {max(loads)} during "
        "the run.",
        "",
    ]
    return lines


def render() -> str:
    lines: list[str] = []
    if b1 := _load("b1_embedding_concurrency"):
        f = b1["figures"]
        lines += [
            f"**B1, embeddings under concurrency** ({_where(b1)}): 64 clients posting one short "
            "text each to /v1/embeddings.",
            "",
            "| in-process encode(batch_size=64) | server, batching on | server, batch size 1 | "
            "on / in-process | on / off |",
            "|---|---|---|---|---|",
            f"| {f['in_process_texts_per_s']} texts/s | {f['server_batched_texts_per_s']} | "
            f"{f['server_unbatched_texts_per_s']} | "
            f"{_ok(f['batched_vs_in_process'], '>= 0.7')} | "
            f"{_ok(f['batched_vs_unbatched'], '>= 4')} |",
            "",
        ]
    if b2 := _load("b2_b6_ingest"):
        f = b2["figures"]
        g = f["b2_ingest"]
        lines += [
            f"**B2, ingest** ({_where(b2)}): Python tutorial sources, {f['documents']} documents,"
            f" {f['chunks']} chunks of up to 200 tokens.",
            "",
            "| in-process encode | service upsert over HTTP | service / in-process | "
            "first ingest | re-post unchanged | speed-up |",
            "|---|---|---|---|---|---|",
            f"| {g['in_process_encode_chunks_per_s']} chunks/s | {g['service_chunks_per_s']} "
            f"chunks/s | {_ok(g['service_vs_in_process'], '>= 0.8')} | "
            f"{g['first_ingest_seconds']} s | {g['reingest_unchanged_seconds']} s | "
            f"{_ok(g['reingest_speedup'], '>= 20')} |",
            "",
        ]
        if t := f.get("b6_txtai"):
            lines += [
                "**B6, side by side with txtai** (same corpus, same chunks, same model "
                "directory; txtai in-process, rag-service over HTTP with durable commits):",
                "",
                "| | ingest chunks/s | search p50 | search p99 |",
                "|---|---|---|---|",
                f"| rag-service | {t['rag_service']['chunks_per_s']} | "
                f"{t['rag_service']['search_http']['p50_ms']} ms | "
                f"{t['rag_service']['search_http']['p99_ms']} ms |",
                f"| txtai {b2['environment']['versions'].get('txtai', '')} | "
                f"{t['txtai']['chunks_per_s']} | {t['txtai']['search']['p50_ms']} ms | "
                f"{t['txtai']['search']['p99_ms']} ms |",
                "",
            ]
    if b3 := _load("b3_b4_b5_search"):
        f = b3["figures"]
        lines += [
            f"**B3, search latency over HTTP** ({_where(b3)}; real embeddings of "
            f"{f['base_sentences']} Python-doc sentences, the 100k scale adds noisy copies of "
            "them; top_k 10, sequential queries):",
            "",
            "| chunks | exact p50 / p99 | HNSW32 p50 / p99 | HNSW recall@10 | in-process embed + "
            "FAISS p50 | HTTP / in-process |",
            "|---|---|---|---|---|---|",
        ]
        for scale, v in f["b3_search"].items():
            lines.append(
                f"| {int(scale):,} | {v['http_exact']['p50_ms']} / {v['http_exact']['p99_ms']} ms"
                f" | {v['http_hnsw32']['p50_ms']} / {v['http_hnsw32']['p99_ms']} ms | "
                f"{v['hnsw32_recall_at_10_vs_exact']} | "
                f"{v['in_process_embed_plus_faiss_exact']['p50_ms']} ms | "
                f"{_ok(v['http_p50_over_in_process_p50'], '<= 1.3')} |"
            )
        b4 = f["b4_search_during_ingest"]
        b5 = f["b5_restart"]
        lines += [
            "",
            f"**B4, searches during an ingest**: p99 {b4['idle']['p99_ms']} ms idle, "
            f"{b4['during_ingest']['p99_ms']} ms while another client ingested "
            f"{b4['documents_ingested_meanwhile']} documents: ratio "
            f"{_ok(b4['p99_ratio'], '<= 2')}.",
            "",
            f"**B5, restart**: {b5['chunks_total']:,} chunks in four collections (100k Flat, "
            f"100k HNSW32, 10k each): ready in {b5['ready_seconds_from_snapshots']} s from "
            f"snapshots, {b5['ready_seconds_without_snapshots']} s with the indexes rebuilt from "
            f"stored vectors; re-embedded: {b5['reembedded']}. Most of the warm start is loading "
            "the embedding model; restoring a 100k index takes "
            f"{max(r['seconds'] for r in b5['restore_from_snapshots'])} s.",
            "",
        ]
    if b7 := _load("b7_postgres"):
        lines += _b7(b7)
    if _load("quality_hybrid_grid") or _load("quality_pipelines"):
        lines += [
            "**Retrieval quality**: the hybrid grid and every pipeline (keys, trained embedder, "
            "reranker) on two sets and two splits are in [Retrieval quality]"
            "(#retrieval-quality).",
            "",
        ]
    if c := _load("c1_c3_chat"):
        f = c["figures"]
        c1, c2 = f["c1_overhead"], f["c2_concurrency"]
        lines += [
            f"**C1-C3, chat** ({_where(c)}):",
            "",
            "| | through the service p50 | fake upstream direct + in-process retrieval p50 | "
            "ratio of p50s | p50 of paired ratios |",
            "|---|---|---|---|---|",
            *(
                f"| C1 {label} | {c1[key]['through_service']['p50_ms']} ms | "
                f"{c1[key]['direct_plus_in_process_retrieval']['p50_ms']} ms | "
                f"{_ok(c1[key]['p50_ratio'], '<= 1.2')} | "
                f"{c1[key].get('p50_of_paired_ratios', '-')} |"
                for key, label in (
                    ("non_stream", "non-stream"),
                    ("stream_ttfb", "stream, first byte"),
                )
            ),
            "",
            f"C2: 64 concurrent streaming chats, {len(c2['rounds'])} rounds: {c2['errors']} "
            f"errors, first byte p50 {c2['ttfb_p50_ms_last_round']} ms / p99 "
            f"{c2['ttfb_p99_ms_last_round']} ms, largest event-loop stall "
            f"{c2['event_loop_max_lag_ms']} ms.",
            "",
        ]
        if c3 := f.get("c3_local_generation"):
            lines += [
                f"C3, local SmolLM2-135M on CPU: {c3['service_tokens_per_s']} tokens/s through "
                f"HTTP ({c3['service_stream_tokens_per_s']} streamed) vs "
                f"{c3['plain_generate_tokens_per_s']} with plain transformers generate: "
                f"{_ok(c3['service_vs_plain'], '>= 0.9')}.",
                "",
            ]
    if ft := _load("finetune_facts"):
        f = ft["figures"]
        b, o, n = f["base"], f["ours"], f["naive"]
        lines += [
            f"**Fine-tuning demo** ({_where(ft)}): {f['facts']} synthetic facts, LoRA r=16 on "
            "the bundled SmolLM2-135M, CPU fp32, greedy answers to the same questions.",
            "",
            "| | exact match | stops at EOS | steps | train time | tokens/s (real tokens) |",
            "|---|---|---|---|---|---|",
            f"| base model | {b['exact_match']} | {b['stopped_at_eos']} | - | - | - |",
            f"| rag-train lora | {o['exact_match']} | {o['stopped_at_eos']} | {o['steps']} | "
            f"{o['train_seconds']} s | {o['tokens_per_second']} |",
            f"| naive recipe (pad to {ft['params']['naive_max_length']}, pad = EOS, loss on "
            f"every token) | {n['exact_match']} | {n['stopped_at_eos']} | {n['steps']} | "
            f"{n['train_seconds']} s | {n['tokens_per_second']} |",
            "",
            f"Ours trains {f['tokens_per_second_ours_over_naive']}x more real tokens per second "
            "(target >= 2). The naive run was capped at "
            f"{n['steps']} steps (one of its steps costs about ten of ours); its answers run on "
            "past the fact because EOS was masked as padding, e.g. "
            f'"{f["examples"]["naive"][0]["prediction"][:60]}..." for '
            f'"{f["examples"]["naive"][0]["reference"]}".',
            "",
        ]
    if ad := _load("d1_d2_adapters"):
        f = ad["figures"]
        d1, d2 = f["d1_throughput"], f["d2_load_during_streams"]
        names = {
            "serial": "one request at a time, set_adapter before each",
            "switch": "batches of one adapter, set_adapter per batch",
            "rows": "batches mixing adapters, per-row adapter_names",
        }
        lines += [
            f"**D1/D2, adapters in the service** ({_where(ad)}; local backend, CPU, "
            f"{ad['params']['clients']} clients, {ad['params']['tokens']} tokens each):",
            "",
            "| serving mode | all base tokens/s | alternating 2 adapters + base | mixed / base |",
            "|---|---|---|---|",
        ]
        for mode, r in d1.items():
            default = " (default)" if mode == f["default_mode"] else ""
            lines.append(
                f"| {mode}: {names.get(mode, mode)}{default} | {r['all_base']['tokens_per_s']} | "
                f"{r['alternating_two_adapters_and_base']['tokens_per_s']} | "
                f"{r['mixed_over_base_tokens_per_s']} |"
            )
        lines += [
            "",
            f"Fastest with mixed adapters: {f['d1_fastest_mixed_mode']}. Loading an adapter while "
            f"{d2['streams']} chats streamed: {d2['failed']} failed, load took "
            f"{d2['load_seconds']} s, longest gap between two tokens of a generating stream "
            f"{d2['max_token_gap_ms']} ms.",
            "",
        ]
    if soak := _load("s1_soak"):
        f, p = soak["figures"], soak["params"]
        statuses = f["upsert_statuses"]
        lines += [
            f"**S1, soak** ({_where(soak)}): {p['clients']} clients for {p['duration']:g} s, "
            f"each looping over a mix of upserts ({p['batch']} documents with ids from a pool "
            f"of {p['pool']}), dense and hybrid searches with and without a metadata filter, "
            f"and RAG chats (plain and streamed) against the fake upstream; "
            f"{f['seed_documents']} Debian FAQ paragraphs seeded. {f['errors']} errors in "
            f"{f['requests']:,} requests, {f['requests_per_s_after_warmup']} requests/s; "
            f"latencies after a {p['warmup']:g} s warm-up:",
            "",
            "| route | requests | errors | p50 | p99 |",
            "|---|---|---|---|---|",
        ]
        for route, r in f["routes"].items():
            lat = r["latency"] or {"p50_ms": "-", "p99_ms": "-"}
            lines.append(
                f"| {route} | {r['requests']:,} | {r['errors']} | {lat['p50_ms']} ms | "
                f"{lat['p99_ms']} ms |"
            )
        lines += [
            "",
            f"Upserted documents: {statuses.get('created', 0)} created, "
            f"{statuses.get('updated', 0)} updated, {statuses.get('unchanged', 0)} unchanged. "
            f"Server RSS {f['rss_ready_mib']} MiB when ready, {f['rss_start_mib']} MiB after "
            f"seeding, {f['rss_after_warmup_mib']} MiB after the warm-up, {f['rss_end_mib']} MiB "
            f"at the end: {f['rss_growth_first_half_mib']:+} MiB over the first half of the "
            f"load, {f['rss_growth_last_half_mib']:+} MiB over the second "
            f"({'flattening' if f['rss_flattens'] else 'not flattening'}). Largest event-loop "
            f"stall {f['event_loop_lag_max_ms']} ms "
            f"({'under the load' if f['event_loop_lag_max_during_load'] else 'while seeding'}"
            f"); under the load {f['event_loop_ticks_over_100ms']} of "
            f"{f['event_loop_ticks']:,} 10 ms timer ticks ran over 100 ms late.",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _cell(figures: dict[str, float]) -> str:
    return f"{figures['recall@1']:.3f} / {figures['recall@5']:.3f}"


def render_hybrid_grid() -> str:
    result = _load("quality_hybrid_grid")
    if result is None:
        return "(run `python -m benchmarks.bench_hybrid`)\n"
    f = result["figures"]
    sets = f["sets"]
    best = f"{f['recommended']['fusion']}@{f['recommended']['alpha']}"
    names = list(sets)
    lines = [
        "| setting | " + " | ".join(f"{n} ({sets[n]['questions']} q)" for n in names) + " |",
        "|---|" + "---|" * len(names),
        "| dense | " + " | ".join(_cell(sets[n]["dense"]) for n in names) + " |",
    ]
    for setting in sets[names[0]]["hybrid"]:
        label = f"**{setting} (default)**" if setting == best else setting
        cells = " | ".join(_cell(sets[n]["hybrid"][setting]) for n in names)
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        f"({_where(result)}; `convex@a` / `rrf@a`: fusion and alpha.)",
    ]
    return "\n".join(lines) + "\n"


PIPELINES = {
    "dense": "base dense",
    "hybrid": "default hybrid",
    "keys": "known-question keys",
    "keys_hybrid": "keys, hybrid",
    "tuned": "fine-tuned embedder",
    "tuned_hybrid": "fine-tuned, hybrid",
    "tuned_keys": "fine-tuned + keys",
    "rerank": "reranker (over dense)",
    "keys_rerank": "keys + reranker",
    "tuned_keys_rerank": "fine-tuned + keys + reranker",
}


def render_pipelines() -> str:
    result = _load("quality_pipelines")
    if result is None:
        return "(run `python -m benchmarks.bench_quality`)\n"
    f = result["figures"]
    labels = list(f)
    lines = [
        "Recall@1 / recall@5 on the test questions (train / test questions per column):",
        "",
        "| pipeline | "
        + " | ".join(f"{k} ({f[k]['train_questions']} / {f[k]['test_questions']})" for k in labels)
        + " |",
        "|---|" + "---|" * len(labels),
    ]
    for key, name in PIPELINES.items():
        if any(key in f[k] for k in labels):
            cells = [_cell(f[k][key]) if key in f[k] else "not run" for k in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best, training = [], []
    for k in labels:
        won = f[k]["best"]
        best.append(f"{PIPELINES[won['pipeline']]}, {won['recall@1_gain_over_dense']:+.3f}")
        runs = [f[k].get(f"{n}_training") for n in ("embed", "rerank")]
        if None in runs:
            training.append("not run")
            continue
        kinds = ("embed", "rerank")
        worse = [n for n, r in zip(kinds, runs, strict=True) if not r["better_than_base"]]
        flag = f" (flagged worse: {', '.join(worse)})" if worse else ""
        training.append(f"{runs[0]['train_seconds']} / {runs[1]['train_seconds']}{flag}")
    lines.append("| best, recall@1 over dense | " + " | ".join(best) + " |")
    lines.append("| training: embed / rerank (s) | " + " | ".join(training) + " |")
    epochs = ", ".join(f"{k} {f[k]['epochs']}" for k in labels if f[k].get("epochs"))
    lines += ["", f"Training epochs at most: {epochs}."]
    lines += ["", f"({_where(result)}; rerank depth {result['params']['rerank_depth']}.)"]
    return "\n".join(lines) + "\n"


RAFT_ROWS = {
    "token_f1": "answer token F1",
    "key_span": "key span in the answer",
    "citation_rate": "answers citing any [n]",
    "cites_oracle": "cites the answering chunk",
    "citation_precision": "citation precision",
    "refusal": "refuses when the chunk is absent",
    "false_refusal": "refuses when the chunk is present",
}


def render_raft() -> str:
    """The ``raft`` block: base + RAG vs adapter + RAG on held-out questions."""
    result = _load("raft")
    if result is None:
        return "(run `python -m benchmarks.bench_raft`)\n"
    f, p = result["figures"], result["params"]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    base, tuned = f["base"], f["adapter"]
    lines = [
        f"Held-out questions: {base['answerable']} answerable, {base['unanswerable']} with the "
        f"answering chunk left out; retrieval missed the chunk for {base['retrieval_miss']}.",
        "",
        "| metric | base + RAG | adapter + RAG |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {pct(base[k])} | {pct(tuned[k])} |" for k, label in RAFT_ROWS.items()]
    t, d = f["training"], f["data"]
    splits = d["splits"]
    targets = "; ".join(
        f"{name.replace('_', ' ')} {pct(v['measured'])} "
        f"({'meets' if v['met'] else 'misses'} {pct(v['target'])})"
        for name, v in f["targets"].items()
    )
    lines += [
        "",
        f"Data: {f['corpus']['documents']} documents, {f['corpus']['chunks']} chunks of "
        f"{p['chunk_tokens']} tokens; {d['chunks_sampled']} sampled, examples train / val / test "
        f"{splits['train']['examples']} / {splits['val']['examples']} / "
        f"{splits['test']['examples']}, top_k {p['top_k']}. Training: {t['global_step']} steps, "
        f"{t['epochs']} epochs in {t['seconds']} s ({t['tokens_per_second']} tokens/s).",
        f"Targets: {targets}.",
        "",
        f"({_where(result)}.)",
    ]
    return "\n".join(lines) + "\n"


def render_onnx() -> str:
    """The ``onnx`` block: PyTorch vs ONNX Runtime, from ``benchmarks/bench_onnx.py``."""
    result = _load("onnx")
    if result is None:
        return "(run `python -m benchmarks.bench_onnx`)\n"
    f = result["figures"]
    torch_, onnx = f["torch"], f["onnx"]
    base = f["in_process_embed_plus_faiss"]
    lines = [
        f"**E1, embedding runtime** ({_where(result)}; load average "
        f"{f['load_average_before'][0]} before, {f['load_average_after'][0]} after; one run):",
        "",
        "| | PyTorch | ONNX Runtime | in-process sentence-transformers |",
        "|---|---|---|---|",
        f"| search p50 / p99, 1 client (HTTP) | {_p(torch_['search_1_clients'])} | "
        f"{_p(onnx['search_1_clients'])} | {_p(base)} (encode + FAISS) |",
        f"| search p50 / p99, 32 clients | {_p(torch_['search_32_clients'])} | "
        f"{_p(onnx['search_32_clients'])} | |",
        f"| search p50 / in-process p50 | {torch_['search_p50_over_in_process_p50']} | "
        f"{_ok(onnx['search_p50_over_in_process_p50'], '<= 0.6')} | 1 |",
        f"| ingest over HTTP, chunks/s | {torch_['ingest_chunks_per_s']} | "
        f"{onnx['ingest_chunks_per_s']} | {f['raw_encode_chunks_per_s']} (raw encode) |",
        f"| ingest / raw encode | {torch_['ingest_over_raw_encode']} | "
        f"{_ok(onnx['ingest_over_raw_encode'], '>= 1.8')} | 1 |",
        f"| B1, 64 clients, texts/s (mean batch) | {torch_['b1']['texts_per_s']} "
        f"({torch_['b1']['mean_batch_size']}) | {onnx['b1']['texts_per_s']} "
        f"({onnx['b1']['mean_batch_size']}) | |",
        f"| B4, search p99 idle / during ingest | {torch_['b4']['idle']['p99_ms']} / "
        f"{torch_['b4']['during_ingest']['p99_ms']} ms | {onnx['b4']['idle']['p99_ms']} / "
        f"{onnx['b4']['during_ingest']['p99_ms']} ms | |",
        "",
    ]
    if enc := f.get("encoder"):
        one, bulk = enc["one_query"], enc["bulk_texts_per_s"]
        lines += [
            "| encoder alone | one query p50 / p99 | bulk texts/s |",
            "|---|---|---|",
            *(
                f"| {name} | {_p(one[key])} | {bulk[key]} |"
                for name, key in (
                    ("PyTorch (the service before)", "torch"),
                    ("ONNX Runtime fp32 (the default on CPU)", "onnx"),
                    ("ONNX Runtime int8 (opt-in)", "onnx_int8"),
                    ("raw sentence-transformers encode", "raw_sentence_transformers"),
                )
            ),
            "",
            f"Export {enc['export_seconds']} s once per model (a start with the graph cached: "
            f"{enc['start_seconds_cached']} s); probe cosine vs PyTorch "
            f"{enc['probe_cosine_fp32']:.6f} (fp32), {enc['probe_cosine_int8']:.4f} (int8).",
            "",
        ]
    if q := f.get("int8_quality"):
        lines += [
            f"int8's cost on the rephrased Debian FAQ ({q['questions']} questions, "
            f"{q['documents']} answers): recall@1 {q['fp32']['recall_at_1']} -> "
            f"{q['int8']['recall_at_1']}, recall@5 {q['fp32']['recall_at_5']} -> "
            f"{q['int8']['recall_at_5']}.",
            "",
        ]
    return "\n".join(lines)


def _replace(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}{end}"
    return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = _replace(text, "bench", render())
    text = _replace(text, "hybrid-grid", render_hybrid_grid())
    text = _replace(text, "quality-pipelines", render_pipelines())
    text = _replace(text, "raft", render_raft())
    text = _replace(text, "onnx", render_onnx())
    Path(readme).write_text(text)
    print(render())


if __name__ == "__main__":
    main()
