"""Attention drop baseline: importance, real skipping, equality with deleted sub-layers, save/load, CLI."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "baselines"))

from baseline_fixtures import (  # noqa: E402
    byte_chat_tokenizer,
    chat_examples,
    save_tiny_model,
    tiny_causal_lm,
    write_chat_jsonl,
)

from routertune import RouterConfig, attach_routers, load_routers  # noqa: E402
from routertune.baselines import (  # noqa: E402
    DROP_REPORT,
    AttentionDropError,
    apply_attention_drop,
    apply_drop,
    attention_importance,
    candidate_layers,
    choose_dropped,
    drop_layers,
    drop_report,
    n_drop_for_capacity,
    save_drop,
    sublayer_importance,
)
from routertune.routing.attach import get_router_config, routed_layers  # noqa: E402
from routertune.routing.config import RouterConfigError  # noqa: E402
from routertune.routing.observe import track_capacity

from helpers import FAMILIES, tiny_model, without_sublayers  # noqa: E402
from helpers import VOCAB as FAMILY_VOCAB  # noqa: E402

VOCAB = 259


def random_batches(n_batches=2, batch=3, length=12, seed=0):
    """Left-padded random batches (rows of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        for b in range(1, batch):
            mask[b, : 2 * b] = 0
            ids[b, : 2 * b] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_zeroed_attention_is_least_important(arch):
    model = tiny_causal_lm(arch, vocab_size=VOCAB)
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
    importance = attention_importance(model, None, random_batches())
    assert sorted(importance) == list(range(6))
    assert importance[3] == pytest.approx(0.0, abs=1e-6)
    assert all(v > 1e-4 for i, v in importance.items() if i != 3)
    # ...so it is the first to go.
    assert apply_attention_drop(model, importance, n_drop=1) == [3]


def test_importance_ignores_padding_tokens():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    (batch,) = random_batches(n_batches=1)
    padded = attention_importance(model, None, [batch])
    # The same rows one by one, without their padding.
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool()
        rows.append(
            {"input_ids": batch["input_ids"][b, keep][None], "attention_mask": torch.ones(1, int(keep.sum()))}
        )
    # Token-weighted mean: combine the per-row means by their token counts.
    per_row = [attention_importance(model, None, [r]) for r in rows]
    counts = [r["input_ids"].shape[1] for r in rows]
    for i in padded:
        expected = sum(p[i] * c for p, c in zip(per_row, counts, strict=True)) / sum(counts)
        assert padded[i] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_importance_of_routed_model_is_the_dense_one():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    plain = attention_importance(model, None, random_batches())
    attach_routers(model, RouterConfig(layers=[1, 2, 3, 4], threshold=2.0))  # routers skip everything
    assert attention_importance(model, None, random_batches()) == pytest.approx(plain, rel=1e-5)


def test_importance_from_chat_examples_with_a_tokenizer():
    tok = byte_chat_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    importance = attention_importance(
        model, tok, chat_examples(5), layers=[2, 4], batch_size=2, max_length=64
    )
    assert sorted(importance) == [2, 4]
    assert all(0.0 < v < 2.0 for v in importance.values())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_drop_really_skips_and_equals_deleted_sublayers(arch):
    model = tiny_causal_lm(arch, vocab_size=VOCAB)
    importance = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.4, 4: 0.05, 5: 0.0}
    ref = without_sublayers(model, [2, 4], "attn")
    dropped = apply_attention_drop(model, importance, capacity=0.5)
    assert dropped == [2, 4]  # layers 0 and 5 are not candidates, whatever their importance
    calls = {i: 0 for i in range(6)}
    for i, layer in enumerate(model.model.layers):
        attention = getattr(layer.self_attn, "base_layer", layer.self_attn)  # the model's own module
        attention.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    (batch,) = random_batches(n_batches=1)
    with torch.no_grad():
        out = model(**batch).logits
        expected = ref(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert calls[2] == calls[4] == 0 and all(calls[i] == 1 for i in (0, 1, 3, 5))
    # Generation: the dropped layers write no KV and the tokens match the deleted-sub-layer model.
    prompt = batch["input_ids"][:1]
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref_gen = ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)
    assert calls[2] == calls[4] == 0


def test_drop_layers_drops_exactly_the_given_layers():
    """A given set (e.g. the least-KL set of benchmarks/headroom.py) = those attentions deleted."""
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    ref = without_sublayers(model, [1, 3], "attn")
    with pytest.raises(AttentionDropError, match=r"layers \[0\] are not candidates"):
        drop_layers(model, [0, 3])
    assert get_router_config(model) is None  # refused before any router went in
    drop_layers(model, [3, 1])
    (batch,) = random_batches(n_batches=1)
    with torch.no_grad():
        out, expected = model(**batch).logits, ref(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-4, atol=1e-5)
    with pytest.raises(RouterConfigError, match="already has routers"):
        drop_layers(model, [2])


def test_capacity_is_the_kept_share_of_candidates():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    importance = {i: float(10 - i) for i in range(6)}
    dropped = apply_attention_drop(model, importance, capacity=0.25)  # drop round(0.75 * 4) = 3
    assert dropped == [2, 3, 4]
    with track_capacity(model) as stats:
        with torch.no_grad():
            for batch in random_batches():
                model(**batch)
    assert stats.overall == pytest.approx(0.25)
    assert stats.per_layer == {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0}


def test_n_drop_rounding_half_up_and_range():
    assert n_drop_for_capacity(0.5, 16) == 8
    assert n_drop_for_capacity(0.625, 4) == 2  # 1.5 -> 2
    assert n_drop_for_capacity(1.0, 16) == 0
    assert n_drop_for_capacity(0.0, 16) == 16
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(AttentionDropError, match="capacity"):
            n_drop_for_capacity(bad, 16)


def test_candidates_match_router_layers_and_skip_mask_anchors():
    llama = tiny_causal_lm("llama", vocab_size=VOCAB)
    assert candidate_layers(llama) == [1, 2, 3, 4]
    assert candidate_layers(llama, router_layers=2) == [3, 4]
    assert candidate_layers(llama) == RouterConfig().routed_layer_indices(6)
    # Qwen2 with sliding layers from layer 3: layer 3 sizes the sliding mask and is never dropped.
    qwen = tiny_causal_lm(
        "qwen2", layers=8, vocab_size=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=3
    )
    assert 3 not in candidate_layers(qwen) and candidate_layers(qwen) == [1, 2, 4, 5, 6]


def test_bad_requests_fail_clearly():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    importance = {i: 0.1 * i for i in range(6)}
    with pytest.raises(AttentionDropError, match="exactly one"):
        apply_attention_drop(model, importance)
    with pytest.raises(AttentionDropError, match="exactly one"):
        apply_attention_drop(model, importance, n_drop=1, capacity=0.5)
    with pytest.raises(AttentionDropError, match=r"n_drop must be an integer in \[0, 4\]"):
        apply_attention_drop(model, importance, n_drop=5)
    with pytest.raises(AttentionDropError, match="no importance for candidate layers \\[4\\]"):
        apply_attention_drop(model, {1: 0.1, 2: 0.2, 3: 0.3}, n_drop=1)
    with pytest.raises(AttentionDropError, match="do not exist"):
        attention_importance(model, None, random_batches(), layers=[7])
    assert get_router_config(model) is None  # nothing attached by the failed calls
    apply_attention_drop(model, importance, n_drop=1)
    with pytest.raises(RouterConfigError, match="already has routers"):
        apply_attention_drop(model, importance, n_drop=1)
    with pytest.raises(ValueError, match="empty"):
        attention_importance(tiny_causal_lm("llama", vocab_size=VOCAB), None, [])


def test_choose_dropped_breaks_ties_towards_deeper_layers():
    assert choose_dropped({1: 0.2, 2: 0.1, 3: 0.1, 4: 0.3}, [1, 2, 3, 4], 1) == [3]


def test_saved_drop_loads_unchanged_into_a_fresh_model(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    fresh = copy.deepcopy(model)
    importance = attention_importance(model, None, random_batches())
    dropped = apply_attention_drop(model, importance, n_drop=2)
    report = drop_report(importance, candidate_layers(fresh), dropped, data="random", n_examples=6)
    out = save_drop(model, tmp_path / "drop", report)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [DROP_REPORT, "router_config.json", "routers.safetensors"]
    )
    saved = json.loads((out / DROP_REPORT).read_text())
    assert saved["dropped"] == dropped and saved["capacity"] == 0.5 and saved["candidates"] == [1, 2, 3, 4]
    load_routers(fresh, out)
    assert {i: layer.router.threshold for i, layer in routed_layers(fresh).items()} == {
        i: (2.0 if i in dropped else 0.0) for i in (1, 2, 3, 4)
    }
    (batch,) = random_batches(n_batches=1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


def test_drop_cli_writes_a_loadable_folder(tmp_path):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder = save_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "calib.jsonl", 6)
    out = tmp_path / "drop"
    result = CliRunner().invoke(
        app,
        [
            "drop",
            "--model",
            str(folder),
            "--data",
            str(data),
            "--n",
            "6",
            "--capacity",
            "0.5",
            "--output",
            str(out),
            "--max_length",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / DROP_REPORT).read_text())
    assert (
        report["n_drop"] == 2
        and report["calibration_data"] == str(data)
        and report["calibration_examples"] == 6
    )
    assert f"dropped attention of layers {report['dropped']}" in result.output
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    load_routers(model, out)
    assert sorted(routed_layers(model)) == [1, 2, 3, 4]


def test_drop_cli_rejects_bad_arguments(tmp_path):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder = save_tiny_model(tmp_path / "model")
    runner = CliRunner()
    both = runner.invoke(
        app,
        [
            "drop",
            "--model",
            str(folder),
            "--n_drop",
            "1",
            "--capacity",
            "0.5",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert both.exit_code != 0 and "exactly one of --n_drop and --capacity" in both.output
    bad = runner.invoke(
        app, ["drop", "--model", str(folder), "--capacity", "1.5", "--output", str(tmp_path / "o")]
    )
    assert bad.exit_code != 0 and "capacity must be in [0, 1]" in bad.output
    missing = runner.invoke(
        app,
        [
            "drop",
            "--model",
            str(folder),
            "--capacity",
            "0.5",
            "--data",
            str(tmp_path / "none.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert missing.exit_code != 0 and "none.jsonl" in missing.output
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_attention_drop_on_the_real_model(tmp_path):
    """SmolLM2-135M: importance on 8 builtin examples, half of the 16 candidate attention layers dropped."""
    from routertune.calibrate import calibration_split
    from routertune.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", device="cpu", progress=False)
    fit, _ = calibration_split("builtin", n=8, n_heldout=0)
    importance = attention_importance(model, tok, fit, max_length=128)
    assert len(importance) == 30 and all(0.0 <= v < 1.0 for v in importance.values())
    candidates = candidate_layers(model)
    assert candidates == list(range(13, 29))
    dropped = apply_attention_drop(model, importance, capacity=0.5)
    assert len(dropped) == 8 and set(dropped) <= set(candidates)
    assert max(importance[i] for i in dropped) <= min(importance[i] for i in candidates if i not in dropped)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()  # still produces text; quality is measured in docs/baselines.md


def test_assistant_loss_matches_the_model_loss():
    from routertune.baselines import assistant_loss
    from routertune.calibrate import make_batches

    tok = byte_chat_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    (batch,) = make_batches(tok, chat_examples(3), batch_size=3, max_length=400)
    assert int((batch["labels"] != -100).sum()) > 20
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert assistant_loss(model, [batch]) == pytest.approx(expected, rel=1e-5)
    # Dropping attention changes it; texts without labels cannot be scored.
    apply_attention_drop(model, {i: 0.0 for i in range(6)}, n_drop=2)
    assert abs(assistant_loss(model, [batch]) - expected) > 1e-4
    with pytest.raises(AttentionDropError, match="no assistant token"):
        assistant_loss(model, make_batches(tok, ["plain text"], batch_size=1))


# --- MLP and block drops (the baselines of mlp_* and block_* routers) ---------------------------


@pytest.mark.parametrize("unit", ["attn", "mlp", "block"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_importance_is_how_much_the_unit_turns_the_residual_stream(arch, unit):
    """Against hidden states of the plain model and of the model without that layer's MLP (whose
    output is the stream the MLP adds to, ``h + attn``: post-norms, branch scales and parallel
    residuals included)."""
    import torch.nn.functional as F

    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, FAMILY_VOCAB, (2, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    importance = sublayer_importance(model, None, [batch], unit, layers=[1, 2])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # [i] = input of layer i
        for i in (1, 2):
            no_mlp = without_sublayers(model, [i], "mlp")(**batch, output_hidden_states=True).hidden_states[i + 1]
            before, after = {
                "attn": (hidden[i], no_mlp),
                "mlp": (no_mlp, hidden[i + 1]),
                "block": (hidden[i], hidden[i + 1]),
            }[unit]
            expected = float((1 - F.cosine_similarity(before.float(), after.float(), dim=-1)).mean())
            assert importance[i] == pytest.approx(expected, rel=1e-4, abs=1e-6), (arch, unit, i)


@pytest.mark.parametrize("unit", ["mlp", "block"])
def test_zeroed_unit_is_least_important_and_dropped_first(unit):
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.zero_()
        if unit == "block":
            model.model.layers[3].self_attn.o_proj.weight.zero_()
    importance = sublayer_importance(model, None, random_batches(), unit)
    assert importance[3] == pytest.approx(0.0, abs=1e-6)
    assert all(v > 1e-4 for i, v in importance.items() if i != 3)
    assert apply_drop(model, importance, n_drop=1, unit=unit) == [3]
    assert get_router_config(model).granularity == f"{unit}_sequence"


@pytest.mark.parametrize("unit", ["mlp", "block"])
def test_mlp_and_block_drops_equal_the_deleted_units(unit):
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    ref = without_sublayers(model, [2, 4], unit)
    assert candidate_layers(model, unit=unit) == [1, 2, 3, 4]
    drop_layers(model, [4, 2], unit=unit)
    calls = {i: 0 for i in range(6)}
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer.mlp, "base_layer", layer.mlp)
        mlp.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    (batch,) = random_batches(n_batches=1)
    with torch.no_grad():
        out, expected = model(**batch).logits, ref(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-4, atol=1e-5)
    assert calls[2] == calls[4] == 0 and all(calls[i] == 1 for i in (0, 1, 3, 5))
    prompt = batch["input_ids"][:1]
    gen = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_mlp_candidates_are_the_mlp_routers_layers():
    """An MLP never writes KV, so a mask-anchor layer may drop its MLP (as mlp routers may route it)."""
    qwen = tiny_causal_lm(
        "qwen2", layers=8, vocab_size=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=3
    )
    mlp = candidate_layers(qwen, unit="mlp")
    assert 3 in mlp and 3 not in candidate_layers(qwen, unit="block")
    attach_routers(qwen, RouterConfig(granularity="mlp_sequence"))
    assert sorted(routed_layers(qwen)) == mlp
    with pytest.raises(AttentionDropError, match="unknown unit 'ffn'"):
        candidate_layers(qwen, unit="ffn")


def test_mlp_drop_report_and_folder(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    fresh = copy.deepcopy(model)
    importance = sublayer_importance(model, None, random_batches(), "mlp")
    dropped = apply_drop(model, importance, capacity=0.5, unit="mlp")
    report = drop_report(importance, [1, 2, 3, 4], dropped, data="random", n_examples=6, unit="mlp")
    assert report["method"] == "mlp_drop" and report["unit"] == "mlp" and report["capacity"] == 0.5
    out = save_drop(model, tmp_path / "mlp-drop", report)
    assert sorted(p.name for p in out.iterdir()) == ["mlp_drop.json", "router_config.json", "routers.safetensors"]
    load_routers(fresh, out)
    assert get_router_config(fresh).granularity == "mlp_sequence"
    (batch,) = random_batches(n_batches=1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


def test_drop_cli_drops_mlp_and_rejects_an_unknown_unit(tmp_path):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder = save_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "calib.jsonl", 6)
    args = ["drop", "--model", str(folder), "--data", str(data), "--n", "6", "--n_drop", "1", "--max_length", "64"]
    result = CliRunner().invoke(app, [*args, "--unit", "mlp", "--output", str(tmp_path / "mlp")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mlp" / "mlp_drop.json").read_text())
    assert report["unit"] == "mlp" and f"dropped MLP of layers {report['dropped']}" in result.output
    bad = CliRunner().invoke(app, [*args, "--unit", "ffn", "--output", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--unit must be one of attn, mlp, block" in bad.output
    assert not (tmp_path / "bad").exists()
