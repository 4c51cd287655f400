"""trainers on CPU with the bundled SmolLM2-135M-Instruct and tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from trainers import data
from trainers.cli import main as rag_train
from trainers.config import SFTConfig
from trainers.encoding import IGNORE, PadCollator, encode_example
from trainers.evaluate import evaluate_model, exact_match, normalise, token_f1
from trainers.merge import load_with_adapter, merge
from trainers.sft import TrainingError, load_base, train

FACTS = [
    ("What is the code name of project Alpha?", "Bluebird."),
    ("Who leads team Orion?", "Marta Kovacs."),
    ("Which floor is the robotics lab on?", "The ninth floor."),
    ("What color is the Zephyr badge?", "Teal."),
]


def chat(q: str, a: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [*messages, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    }


@pytest.fixture(scope="module")
def base_dir(bundled_model_dir) -> Path:
    return bundled_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    train_file, val_file = root / "train.jsonl", root / "val.jsonl"
    data.write_jsonl(train_file, [chat(q, a) for q, a in FACTS] * 2)
    data.write_jsonl(val_file, [chat(q, a) for q, a in FACTS[:2]])
    return {"train": train_file, "val": val_file}


@pytest.fixture(scope="module")
def trained(base_dir, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "adapter"
    cfg = SFTConfig(
        train_file=tiny["train"],
        val_file=tiny["val"],
        output_dir=out,
        base_model=str(base_dir),
        max_steps=8,
        batch_size=4,
        eval_steps=4,
        save_steps=0,
        logging_steps=1,
        learning_rate=2e-3,
        lora_r=8,
        seed=1,
    )
    return train(cfg)


# ---- data --------------------------------------------------------------------------------


def test_validate_reports_every_bad_line(tmp_path, base_dir):
    lines = [
        json.dumps(chat("hi", "hello")),
        "{not json",
        json.dumps({"text": "no messages"}),
        json.dumps(
            {
                "messages": [
                    {"role": "wizard", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ),
        json.dumps(
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}
        ),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
        ),
        json.dumps(chat("long " * 400, "answer")),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)

    def count(messages):
        ids = tok.apply_chat_template(messages, tokenize=True)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    good, problems = data.validate_file(path, count_tokens=count, max_tokens=256)
    assert len(good) == 1
    reasons = {p.line: p.reason for p in problems}
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8}
    assert "not JSON" in reasons[2]
    assert "no 'messages'" in reasons[3]
    assert "bad role 'wizard'" in reasons[4]
    assert "empty" in reasons[5]
    assert "no assistant turn" in reasons[6]
    assert "last turn is not the assistant" in reasons[7]
    assert "longer than the max length 256" in reasons[8]


def test_cli_validate_exit_code(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\nnope\n")
    assert rag_train(["data", "validate", str(path)]) == 1
    assert f"{path}:2: not JSON" in capsys.readouterr().out
    path.write_text(json.dumps(chat("q", "a")) + "\n")
    assert rag_train(["data", "validate", str(path)]) == 0


def test_dedup_split_deterministic_without_leaks(tmp_path):
    examples = [chat(f"question {i}", f"answer {i}") for i in range(50)]
    examples += [chat(f"  QUESTION   {i}", f"Answer {i}") for i in range(10)]  # near-duplicates
    unique, dropped = data.dedup(examples)
    assert (len(unique), dropped) == (50, 10)
    assert data.dedup(examples, normalised=False)[1] == 0
    a = data.split(examples, train=0.8, val=0.1, test=0.1, seed=7)
    b = data.split(examples, train=0.8, val=0.1, test=0.1, seed=7)
    c = data.split(examples, train=0.8, val=0.1, test=0.1, seed=8)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "val", "test")] == [40, 5, 5]
    keys = {k: {data.example_key(e) for e in v} for k, v in a.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    src = tmp_path / "all.jsonl"
    data.write_jsonl(src, examples)
    assert (
        rag_train(["data", "split", str(src), "--out-dir", str(tmp_path / "s"), "--seed", "7"]) == 0
    )
    assert data.load_examples(tmp_path / "s" / "test.jsonl") == a["test"]


def test_convert_formats(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "2+2?", "completion": "4"}),
                json.dumps({"user": "Capital of Peru?", "assistant": "Lima"}),
                json.dumps({"question": "?"}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "chat.jsonl"
    assert rag_train(["data", "convert", str(src), str(out), "--system", "Be brief."]) == 1
    rows = data.load_examples(out)
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "Lima"}


# ---- encoding ----------------------------------------------------------------------------


def test_labels_cover_assistant_tokens_and_eos_only(base_dir):
    _, tok = load_base(base_dir)
    example = encode_example(
        tok,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Who leads team Orion?"},
            {"role": "assistant", "content": "Marta Kovacs."},
            {"role": "user", "content": "And team Lyra?"},
            {"role": "assistant", "content": "Nobody yet."},
        ],
    )
    trained = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE]
    text = tok.decode(trained)
    assert "Marta Kovacs." in text and "Nobody yet." in text
    assert "Orion" not in text and "terse" not in text and "Lyra" not in text
    eos = tok.eos_token_id
    assert trained.count(eos) == 2  # each assistant turn learns to end
    ids = example.input_ids
    end = max(i for i, t in enumerate(ids) if t == eos and example.labels[i] == eos)
    assert example.labels[end] == eos
    # Padding is masked by position: a pad id equal to EOS is still trained inside the example.
    batch = PadCollator(eos)([example, encode_example(tok, chat("q", "a")["messages"])])
    short = batch["attention_mask"][1].sum()
    assert (batch["labels"][1, short:] == IGNORE).all()
    assert (batch["labels"][0] == eos).sum() == 2


# ---- training ----------------------------------------------------------------------------


def test_lora_run_learns_and_saves_only_adapter(trained, base_dir):
    m = trained.metrics
    assert m["global_step"] == 8
    assert m["train_loss_last"] < m["train_loss_first"] * 0.7
    assert m["eval_loss_best"] is not None
    out = trained.output_dir
    names = sorted(p.name for p in out.iterdir())
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.json",
        "metrics.json",
        "loss.png",
        "tokenizer.json",
    } <= set(names)
    assert not [n for n in names if n.endswith(".bin")]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        adapter_params = sum(f.get_tensor(k).numel() for k in keys)
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)
    assert keys and all("lora_" in k for k in keys)
    assert m["trainable_parameters"] == adapter_params  # nothing but the adapter trained
    record = json.loads((out / "training_config.json").read_text())
    assert record["base_model_sha256"] and record["data_sha256"]
    assert record["config"]["lora_r"] == 8 and record["versions"]["peft"]


def test_save_load_roundtrip_gives_identical_logits(trained, base_dir):
    _, tok = load_base(base_dir)
    ids = torch.tensor([encode_example(tok, chat(*FACTS[0])["messages"]).input_ids])
    with torch.inference_mode():
        before = trained.model(input_ids=ids).logits
        loaded, _ = load_with_adapter(base_dir, trained.output_dir)
        loaded.eval()
        after = loaded(input_ids=ids).logits
        base, _ = load_base(base_dir)
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, after, atol=1e-3)
    # Base weights are untouched: the adapter disabled gives the base model's logits.
    with torch.inference_mode(), loaded.disable_adapter():
        torch.testing.assert_close(loaded(input_ids=ids).logits, plain, atol=1e-5, rtol=1e-5)


def test_merge_matches_base_plus_adapter(trained, base_dir, tmp_path):
    out = merge(base_dir, trained.output_dir, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    merged, tok = load_base(out)
    ids = torch.tensor([encode_example(tok, chat(*FACTS[1])["messages"]).input_ids])
    with torch.inference_mode():
        expected = trained.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_resume_continues_the_step_count(base_dir, tiny, tmp_path):
    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    cfg = SFTConfig(
        train_file=tiny["train"],
        output_dir=out,
        base_model=str(base_dir),
        max_steps=4,
        batch_size=4,
        save_steps=2,
        logging_steps=1,
        seed=3,
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Interrupt()])
    assert not out.exists()  # nothing half-written at the destination
    assert (tmp_path / "run.partial" / "checkpoints" / "checkpoint-2").exists()
    resumed = train(SFTConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed.metrics["global_step"] == 4
    logged = [h["step"] for h in resumed.metrics["log_history"] if "loss" in h]
    assert logged == [1, 2, 3, 4]  # the first two come from the checkpoint's state
    assert not (tmp_path / "run.partial").exists()


def test_full_fine_tune_smoke(base_dir, tiny, tmp_path):
    result = train(
        SFTConfig(
            method="full",
            train_file=tiny["train"],
            output_dir=tmp_path / "f",
            base_model=str(base_dir),
            max_steps=2,
            batch_size=4,
            save_steps=0,
            learning_rate=1e-5,
        )
    )
    assert (result.output_dir / "model.safetensors").exists()
    assert result.metrics["trainable_parameters"] > 100_000_000


def test_training_errors(base_dir, tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    common = ["--train-file", str(tiny["train"]), "--max-steps", "1"]
    cases = [
        (
            [
                "lora",
                "--train-file",
                str(empty),
                "--output-dir",
                str(tmp_path / "a"),
                "--base-model",
                str(base_dir),
            ],
            "no examples",
        ),
        (
            [
                "lora",
                *common,
                "--output-dir",
                str(tmp_path / "b"),
                "--base-model",
                str(tmp_path / "nowhere"),
            ],
            "not a Hugging Face model directory",
        ),
        (
            [
                "lora",
                *common,
                "--output-dir",
                str(tmp_path / "c"),
                "--base-model",
                str(base_dir),
                "--qlora",
            ],
            "QLoRA needs a CUDA GPU",
        ),
        (
            [
                "lora",
                *common,
                "--output-dir",
                str(tmp_path / "d"),
                "--base-model",
                str(base_dir),
                "--target-modules",
                "no_such_proj",
            ],
            "target modules",
        ),
        (
            ["lora", *common, "--output-dir", str(tmp_path / "e"), "--batch-size", "0"],
            "--batch-size",
        ),
    ]
    for argv, message in cases:
        assert rag_train(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (tmp_path / argv[argv.index("--output-dir") + 1]).exists()


def test_adapter_base_mismatch(trained, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=49152,
        )
    ).save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(trained.output_dir).save_pretrained(other)
    with pytest.raises(TrainingError, match="does not fit base model"):
        load_with_adapter(other, trained.output_dir)
    (trained.output_dir / "adapter_model.safetensors").rename(tmp_path / "moved")
    try:
        with pytest.raises(TrainingError, match="safetensors"):
            load_with_adapter(other, trained.output_dir)
    finally:
        (tmp_path / "moved").rename(trained.output_dir / "adapter_model.safetensors")


# ---- evaluation --------------------------------------------------------------------------


def test_metrics_on_known_cases():
    assert exact_match("Teal.", "Teal.") == 1.0 and exact_match("teal", "Teal.") == 0.0
    assert normalise("The  Ninth floor!") == "ninth floor"
    assert token_f1("the ninth floor", "The ninth floor.") == 1.0
    assert token_f1("ninth level", "ninth floor") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0


def test_evaluate_base_vs_adapter(trained, base_dir, tiny, tmp_path):
    base, tok = load_base(base_dir)
    base_report = evaluate_model(base, tok, tiny["val"], max_new_tokens=16)
    tuned = evaluate_model(trained.model, tok, tiny["val"], max_new_tokens=16)
    for report in (base_report, tuned):
        assert report["examples"] == 2 and len(report["rows"]) == 2
        assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-3)
    assert tuned["loss"] < base_report["loss"]
    assert tuned["token_f1"] >= base_report["token_f1"]
    assert (
        rag_train(
            [
                "eval",
                "--model",
                str(base_dir),
                "--adapter",
                str(trained.output_dir),
                "--data",
                str(tiny["val"]),
                "--max-new-tokens",
                "8",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"base", "adapter"}


def test_train_help_names_every_option(capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        rag_train(["lora", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(SFTConfig):
        if f.name != "method":
            assert "--" + f.name.replace("_", "-") in out
