"""The quickstart end to end on a tiny random Llama with the real tokenizer, data and tasks."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from routertune.loading import DEFAULT_MODEL, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-smol")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_quickstart_writes_a_complete_report(tiny_model_folder, tmp_path):
    from routertune.quickstart import QuickstartSettings, run_quickstart

    out = tmp_path / "report"
    settings = QuickstartSettings(
        model=str(tiny_model_folder),
        output_dir=str(out),
        train_samples=8,
        validation_samples=4,
        max_seq_length=256,
        per_device_train_batch_size=4,
        tasks=("piqa", "mmlu"),
        limit=2,
        mmlu_limit=1,
        bench_context=16,
        bench_new_tokens=2,
        bench_repeats=1,
    )
    report = run_quickstart(settings)
    assert report == out / "report.md"
    text = report.read_text()
    for heading in ("## Held-out LM loss", "## Accuracy", "## Speed", "## Against the paper's headline"):
        assert heading in text
    assert "| piqa | acc_norm | 2 |" in text and "| mmlu | acc | 57 |" in text
    results = json.loads((out / "results.json").read_text())
    assert {"train", "eval_dense", "eval_routed", "eval_drop", "bench_routed", "bench_drop"} <= set(results)
    assert 0 < results["train"]["train_examples"] <= 8  # examples with no answer token left are dropped
    assert results["eval_routed"]["capacity"]["overall"] is not None
    # the baseline removes as many attention layers as the routed model skipped, rounded
    drop = results["attention_drop"]
    assert drop["candidates"] == [1, 2]
    assert (out / "routers" / "routers.safetensors").is_file()
    for png in ("accuracy.png", "capacity.png"):
        assert (out / png).stat().st_size > 1000
