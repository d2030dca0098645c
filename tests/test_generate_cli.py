"""``routertune generate`` on a tiny random Llama folder, and once on the real default model."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from routertune import RouterConfig, attach_routers, save_routers
from routertune.commands import generate as generate_command
from routertune.loading import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "models"))
import tiny_models  # noqa: E402

SUMMARY = re.compile(
    r"(?P<new>\d+) new tokens in [\d.]+ s \([\d.]+ tokens/s, prompt (?P<prompt>\d+) tokens\); "
    r"KV cache (?P<kv>[\d,]+) bytes"
)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """An app holding only ``generate`` (the callback keeps the verb name on the command line)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    generate_command.register(app)
    return app


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("gen") / "tiny")


def run(app, *args: str):
    return CliRunner().invoke(app, ["generate", *args])


def summary(result) -> dict[str, int]:
    match = SUMMARY.search(result.stderr)
    assert match, result.stderr
    return {k: int(v.replace(",", "")) for k, v in match.groupdict().items()}


def expected_kv_bytes(cached_positions: int, layers_with_kv: int) -> int:
    """float32 keys + values: layers x 2 x kv_heads x positions x head_dim x 4 bytes."""
    head_dim = tiny_models.HIDDEN // tiny_models.HEADS
    return layers_with_kv * 2 * tiny_models.KV_HEADS * cached_positions * head_dim * 4


def test_greedy_streams_the_same_text_as_generate(app, tiny_folder):
    result = run(app, "--model", str(tiny_folder), "--prompt", "the theme", "--max_new_tokens", "7")
    assert result.exit_code == 0, result.stderr
    model, tokenizer = load_model_and_tokenizer(tiny_folder, progress=False)
    inputs = tokenizer("the theme", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert result.stdout == tokenizer.decode(new, skip_special_tokens=True) + "\n"
    stats = summary(result)
    assert stats["new"] == len(new)
    assert stats["prompt"] == inputs["input_ids"].shape[1]
    # The last generated token is never fed back, so the cache holds prompt + new - 1 positions.
    assert stats["kv"] == expected_kv_bytes(stats["prompt"] + stats["new"] - 1, tiny_models.LAYERS)
    assert "dense" in result.stderr


def test_chat_applies_the_template(app, tiny_folder):
    result = run(app, "--model", str(tiny_folder), "--prompt", "hi", "--chat", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.stderr
    _, tokenizer = load_model_and_tokenizer(tiny_folder, progress=False)
    templated = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert summary(result)["prompt"] == len(tokenizer(templated).input_ids)


def test_chat_without_template_is_a_clear_error(app, tmp_path):
    folder = tiny_models.save_tiny_llama(tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    result = run(app, "--model", str(folder), "--prompt", "hi", "--chat")
    assert result.exit_code == 1
    assert "no chat template" in result.stderr


def test_routers_that_skip_attention_shrink_the_kv_cache(app, tiny_folder, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_folder, progress=False)
    # threshold above 1: every routed attention is skipped, so those layers store no KV.
    attach_routers(model, RouterConfig(granularity="attn_sequence", threshold=2.0))
    routed = RouterConfig().routed_layer_indices(tiny_models.LAYERS)
    assert routed  # the tiny model must have routed layers for this test to mean anything
    save_routers(model, tmp_path / "routers")

    dense = run(app, "--model", str(tiny_folder), "--prompt", "the theme", "--max-new-tokens", "5")
    routed_run = run(
        app,
        "--model",
        str(tiny_folder),
        "--prompt",
        "the theme",
        "--max-new-tokens",
        "5",
        "--routers",
        str(tmp_path / "routers"),
    )
    assert dense.exit_code == 0 and routed_run.exit_code == 0, routed_run.stderr
    stats = summary(routed_run)
    positions = stats["prompt"] + stats["new"] - 1
    assert stats["kv"] == expected_kv_bytes(positions, tiny_models.LAYERS - len(routed))
    assert summary(dense)["kv"] == expected_kv_bytes(
        summary(dense)["prompt"] + summary(dense)["new"] - 1, tiny_models.LAYERS
    )
    assert f"routers {tmp_path / 'routers'}" in routed_run.stderr
    assert "Warning" not in routed_run.stderr  # same base model name


def test_compiled_decode_generates_the_same_text(app, tiny_folder, tmp_path):
    """--compile: static cache and inductor-compiled decode steps, routed sub-layers as ops."""
    model, _ = load_model_and_tokenizer(tiny_folder, progress=False)
    attach_routers(model, RouterConfig(granularity="attn_sequence"))
    with torch.no_grad():  # routers that score: the route is decided from the prompt
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "router"):
                layer.self_attn.router.proj.weight.normal_(
                    0.0, 0.5, generator=torch.Generator().manual_seed(1)
                )
    save_routers(model, tmp_path / "routers")
    args = [
        "--model",
        str(tiny_folder),
        "--prompt",
        "the theme",
        "--max-new-tokens",
        "6",
        "--routers",
        str(tmp_path / "routers"),
    ]
    eager = run(app, *args)
    compiled = run(app, *args, "--compile")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    assert "compiled decode" in compiled.stderr and "compiled decode" not in eager.stderr


def test_routers_from_another_base_model_warn(app, tiny_folder, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_folder, progress=False)
    model.config._name_or_path = "some-other-model"
    attach_routers(model, RouterConfig())
    save_routers(model, tmp_path / "routers")
    result = run(
        app,
        "--model",
        str(tiny_folder),
        "--prompt",
        "x",
        "--max-new-tokens",
        "1",
        "--routers",
        str(tmp_path / "routers"),
    )
    assert result.exit_code == 0, result.stderr
    assert "trained on 'some-other-model'" in result.stderr


def test_bad_router_folder_is_a_clear_error(app, tiny_folder, tmp_path):
    result = run(app, "--model", str(tiny_folder), "--prompt", "x", "--routers", str(tmp_path / "nothing"))
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "nothing" in result.stderr


def test_missing_model_folder_is_a_clear_error(app, tmp_path):
    result = run(app, "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert result.stdout == ""


def test_sampling_is_reproducible_with_a_seed(app, tiny_folder):
    args = ["--model", str(tiny_folder), "--prompt", "the", "--max-new-tokens", "12", "--temperature", "1.5"]
    first = run(app, *args, "--seed", "3")
    second = run(app, *args, "--seed", "3")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == second.stdout
    greedy = run(app, "--model", str(tiny_folder), "--prompt", "the", "--max-new-tokens", "12")
    samples = {run(app, *args, "--seed", str(seed)).stdout for seed in range(4)}
    assert len(samples | {greedy.stdout}) > 1  # temperature really samples


def test_invalid_options_are_rejected(app, tiny_folder):
    assert run(app, "--model", str(tiny_folder), "--prompt", "x", "--temperature", "-1").exit_code == 2
    assert run(app, "--model", str(tiny_folder), "--prompt", "x", "--max-new-tokens", "0").exit_code == 2
    result = run(app, "--model", str(tiny_folder), "--prompt", "x", "--top-p", "0")
    assert result.exit_code == 1 and "--top_p" in result.stderr
    result = run(app, "--model", str(tiny_folder), "--prompt", "x", "--dtype", "int3")
    assert result.exit_code == 1 and "unknown dtype" in result.stderr


@pytest.mark.integration
def test_real_default_model_answers_arithmetic():
    """SmolLM2-135M-Instruct (built-in, converted on first use) answers 2+3 greedily, via the real CLI."""
    from routertune.cli import app as cli_app

    result = CliRunner().invoke(
        cli_app, ["generate", "--prompt", "What is 2+3?", "--chat", "--max-new-tokens", "24"]
    )
    assert result.exit_code == 0, result.stderr
    assert "5" in result.stdout
    if not torch.cuda.is_available():
        assert "smollm2-135m-instruct on cpu float32" in result.stderr
    stats = summary(result)
    # 30 layers x 2 (K, V) x 3 KV heads x 64 dims x 4 bytes per cached position, all layers dense.
    assert stats["kv"] == 30 * 2 * 3 * 64 * 4 * (stats["prompt"] + stats["new"] - 1)


def test_attention_kernel_is_chosen_and_an_unavailable_one_is_refused(app, tiny_folder, tmp_path):
    """--attn_implementation eager loads the eager kernel and routes to sdpa's text; a kernel this
    machine cannot run (flash attention without CUDA / flash-attn) is an error naming it."""
    model, _ = load_model_and_tokenizer(tiny_folder, progress=False)
    attach_routers(model, RouterConfig(granularity="attn_sequence", threshold=2.0))
    save_routers(model, tmp_path / "routers")
    args = ("--model", str(tiny_folder), "--prompt", "the theme", "--max_new_tokens", "6",
            "--routers", str(tmp_path / "routers"))  # fmt: skip
    sdpa, eager = run(app, *args), run(app, *args, "--attn_implementation", "eager")
    assert sdpa.exit_code == eager.exit_code == 0, eager.stderr
    assert eager.stdout == sdpa.stdout
    eager_model, _ = load_model_and_tokenizer(tiny_folder, progress=False, attn_implementation="eager")
    assert eager_model.config._attn_implementation == "eager"
    refused = run(
        app, "--model", str(tiny_folder), "--prompt", "hi", "--attn_implementation", "flash_attention_2"
    )
    assert refused.exit_code == 1
    assert "flash_attention_2" in refused.stderr and "Traceback" not in refused.stderr
