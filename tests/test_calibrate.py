"""Threshold calibration: hits the requested capacity, survives save/load, fails clearly; the CLI."""

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

from routertune import RouterConfig, attach_routers, load_routers, save_routers  # noqa: E402
from routertune.calibrate import (  # noqa: E402
    CALIBRATION_REPORT,
    CalibrationError,
    calibrate_thresholds,
    calibration_split,
    kept_target,
    make_batches,
    save_calibrated,
    threshold_for_count,
)
from routertune.routing.attach import routed_layers  # noqa: E402
from routertune.routing.observe import measure_capacity, track_capacity  # noqa: E402

from helpers import randomize_routers  # noqa: E402

VOCAB = 259


def random_batches(n_batches=6, batch=8, max_len=20, seed=0):
    """Left-padded batches of random token rows with random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(4, max_len + 1, (batch,), generator=g)
        T = int(lengths.max())
        ids = torch.zeros(batch, T, dtype=torch.long)
        mask = torch.zeros(batch, T, dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            ids[b, T - n :] = torch.randint(3, VOCAB, (n,), generator=g)
            mask[b, T - n :] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def routed_model(granularity="attn_sequence", arch="llama", seed=0):
    model = tiny_causal_lm(arch, vocab_size=VOCAB)
    attach_routers(model, RouterConfig(granularity=granularity))
    randomize_routers(model, seed=seed, scale=0.2)
    return model


def independent_counts(model, batches):
    with track_capacity(model) as stats, torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    return stats.counts


# ---- quantile thresholds ----------------------------------------------------------------
def test_threshold_for_count_keeps_exactly_k_distinct_scores():
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0))
    for k in range(51):
        t = threshold_for_count(scores, k)
        assert int(((scores - t) >= 0).sum()) == k
    assert threshold_for_count(scores, 0) == 2.0 and threshold_for_count(scores, 50) == 0.0


def test_threshold_for_count_with_ties_picks_the_closer_side():
    def kept(scores, k):
        return int(((scores - threshold_for_count(scores, k)) >= 0).sum())

    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    assert kept(scores, 3) == 4  # 4 is as close to 3 as 1 is: keep the ties
    assert kept(scores, 2) == 1  # 1 is closer to 2 than 4
    ties = torch.full((10,), 0.5)
    assert kept(ties, 2) == 0 and kept(ties, 6) == 10
    with pytest.raises(CalibrationError):
        threshold_for_count(scores, 6)


def test_kept_target_rounds_half_up():
    assert kept_target(0.5, 5) == 3 and kept_target(0.5, 4) == 2 and kept_target(0.0, 9) == 0


# ---- calibration -------------------------------------------------------------------------
def one_batch(batches):
    """The same rows as one left-padded batch."""
    T = max(b["input_ids"].shape[1] for b in batches)

    def pad(t):
        return torch.nn.functional.pad(t, (T - t.shape[1], 0))

    return [{k: torch.cat([pad(b[k]) for b in batches]) for k in ("input_ids", "attention_mask")}]


@pytest.mark.parametrize("capacity", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("granularity", ["attn_sequence", "attn_token", "block_sequence", "mlp_token"])
@pytest.mark.parametrize("batching", ["one batch", "six batches"])
def test_per_layer_hits_capacity_within_one_unit_per_layer(granularity, capacity, batching):
    model = routed_model(granularity)
    batches = random_batches()
    if batching == "one batch":
        batches = one_batch(batches)
    result = calibrate_thresholds(model, batches, capacity, method="per_layer")
    assert result.converged
    # One forward for a single batch; else one (stopped) pass per routed layer + one to measure.
    assert result.passes == (1 if batching == "one batch" else 5)
    counts = independent_counts(model, batches)
    assert sorted(counts) == [1, 2, 3, 4]
    for kept, total in counts.values():
        assert abs(kept - kept_target(capacity, total)) <= 1
    assert result.calibration["counts"] == {str(i): {"kept": k, "total": t} for i, (k, t) in counts.items()}
    assert result.thresholds == {i: layer.router.threshold for i, layer in routed_layers(model).items()}


def test_per_layer_thresholds_do_not_depend_on_batching():
    a, b = routed_model(), routed_model()
    batches = random_batches()
    ra = calibrate_thresholds(a, batches, 0.5, method="per_layer")
    rb = calibrate_thresholds(b, one_batch(batches), 0.5, method="per_layer")
    assert ra.calibration["counts"] == rb.calibration["counts"]
    assert ra.thresholds == pytest.approx(rb.thresholds, abs=1e-5)


@pytest.mark.parametrize("capacity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("granularity", ["attn_sequence", "attn_token"])
def test_global_threshold_hits_overall_capacity_within_one_unit(granularity, capacity):
    model = routed_model(granularity, seed=1)
    batches = random_batches(seed=1)
    result = calibrate_thresholds(model, batches, capacity, method="global", tolerance=0.0)
    assert result.converged
    assert len(set(result.thresholds.values())) == 1
    assert result.passes == len(result.history) <= 12
    counts = independent_counts(model, batches)
    kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
    assert abs(kept - kept_target(capacity, total)) <= 1


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_calibration_on_other_architectures(arch):
    model = routed_model("attn_sequence", arch=arch)
    batches = random_batches(seed=2)
    assert calibrate_thresholds(model, batches, 0.5, method="per_layer").converged
    for kept, total in independent_counts(model, batches).values():
        assert abs(kept - kept_target(0.5, total)) <= 1


def test_capacity_one_is_the_dense_model_and_zero_skips_all():
    plain = tiny_causal_lm("llama", vocab_size=VOCAB)
    model = copy.deepcopy(plain)
    attach_routers(model, RouterConfig())
    randomize_routers(model, scale=0.2)
    batches = random_batches(n_batches=2)
    result = calibrate_thresholds(model, batches, 1.0)
    assert set(result.thresholds.values()) == {0.0} and result.calibration["overall"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batches[0]).logits, plain(**batches[0]).logits)
    result = calibrate_thresholds(model, batches, 0.0)
    assert set(result.thresholds.values()) == {2.0} and result.calibration["overall"] == 0.0


def test_thresholds_survive_save_and_load(tmp_path):
    model = routed_model("attn_sequence")
    fresh = tiny_causal_lm("llama", vocab_size=VOCAB)
    batches = random_batches()
    result = calibrate_thresholds(model, batches, 0.4)
    result.heldout = measure_capacity(model, random_batches(seed=9))
    out = save_calibrated(model, tmp_path / "cal", result.to_dict())
    config = json.loads((out / "router_config.json").read_text())["router_config"]
    assert {int(k): v for k, v in config["layer_thresholds"].items()} == result.thresholds
    report = json.loads((out / CALIBRATION_REPORT).read_text())
    assert report["target_capacity"] == 0.4 and report["heldout"]["overall"] == result.heldout["overall"]
    load_routers(fresh, out)
    assert {i: layer.router.threshold for i, layer in routed_layers(fresh).items()} == result.thresholds
    assert independent_counts(fresh, batches) == independent_counts(model, batches)


def test_untrained_routers_cannot_be_split_and_say_so():
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    attach_routers(model, RouterConfig())  # zero routers: every score is 0.5
    with pytest.warns(UserWarning, match="did not reach capacity 0.5: off by up to 8 units"):
        result = calibrate_thresholds(model, random_batches(n_batches=2), 0.5, method="per_layer")
    assert not result.converged
    with pytest.warns(UserWarning, match="did not reach capacity 0.5: off by 32 of 64 units"):
        result = calibrate_thresholds(model, random_batches(n_batches=2), 0.5, method="global", max_passes=2)
    assert not result.converged and result.passes == 2


def test_bad_inputs_fail_clearly():
    model = routed_model()
    batches = random_batches(n_batches=1)
    for bad in (-0.1, 1.5, float("nan"), "half", None):
        with pytest.raises(CalibrationError, match="target capacity"):
            calibrate_thresholds(model, batches, bad)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate_thresholds(model, [], 0.5)
    with pytest.raises(CalibrationError, match="method must be one of global, per_layer"):
        calibrate_thresholds(model, batches, 0.5, method="median")
    with pytest.raises(CalibrationError, match="no routers"):
        calibrate_thresholds(tiny_causal_lm("llama", vocab_size=VOCAB), batches, 0.5)


# ---- data --------------------------------------------------------------------------------
def test_make_batches_pads_left_and_sorts_by_length():
    tok = byte_chat_tokenizer()
    batches = make_batches(tok, chat_examples(5), batch_size=2, max_length=40)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) <= 40
    first = batches[0]
    assert bool(first["attention_mask"][:, -1].all())  # left padding: every row ends on a real token
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()
    with pytest.raises(CalibrationError, match="empty"):
        make_batches(tok, [], batch_size=2)


def test_make_batches_route_on_prompt_marks_the_tokens_before_the_answer():
    tok = byte_chat_tokenizer()
    examples = chat_examples(5)
    plain = make_batches(tok, examples, batch_size=2, max_length=512)
    prompt = make_batches(tok, examples + ["a text is all prompt"], batch_size=2, max_length=512, route_on="prompt")
    assert all("routing_mask" not in b for b in plain)
    answered = texts = 0
    for b in prompt:
        routing, labels, mask = b["routing_mask"], b["labels"], b["attention_mask"]
        assert (routing[mask == 0] == 0).all()  # padding is never decided on
        for r in range(routing.shape[0]):
            answer = (labels[r] != -100).nonzero()
            if len(answer):  # an example: its prompt ...
                first = int(answer[0])
                assert first > 0 and (routing[r, :first] == mask[r, :first]).all()
                assert (routing[r, first:] == 0).all()  # ... and nothing from the first answer token on
                answered += 1
            else:  # the text: all of it
                assert (routing[r] == mask[r]).all()
                texts += 1
    assert (answered, texts) == (len(examples), 1)  # every example kept its answer within 512 tokens
    with pytest.raises(CalibrationError, match="route_on"):
        make_batches(tok, examples, route_on="context")


def test_calibrating_on_prompts_keeps_the_share_on_the_prompts_alone():
    """Thresholds calibrated with route_on="prompt" keep the target share when each example's
    prompt is run alone, as generation routes; calibrated on whole conversations they need not."""
    tok = byte_chat_tokenizer()
    examples = chat_examples(24, seed=3)
    batches = make_batches(tok, examples, batch_size=1, max_length=512, route_on="prompt")
    assert all((b["labels"] != -100).any() for b in batches)  # each has an answer after its prompt
    prompts = [
        {k: b[k][:, b["routing_mask"][0].bool()] for k in ("input_ids", "attention_mask")} for b in batches
    ]
    model = routed_model("attn_sequence")
    result = calibrate_thresholds(model, batches, 0.5, method="per_layer")
    assert result.calibration["counts"] == measure_capacity(model, prompts)["counts"]
    # Without the routing mask the same thresholds decide on prompt + answer: other decisions.
    whole = [{k: v for k, v in b.items() if k != "routing_mask"} for b in batches]
    assert measure_capacity(model, whole)["counts"] != result.calibration["counts"]


def test_calibration_split_from_a_file_and_errors(tmp_path):
    path = write_chat_jsonl(tmp_path / "c.jsonl", 10)
    fit, held = calibration_split(path, n=6, n_heldout=3)
    assert [e["id"] for e in fit] == [f"fixture_{i}" for i in range(6)]
    assert [e["id"] for e in held] == ["fixture_6", "fixture_7", "fixture_8"]
    fit, held = calibration_split(path, n=8, n_heldout=5)
    assert len(fit) == 8 and len(held) == 2
    with pytest.raises(CalibrationError, match=">= 1"):
        calibration_split(path, n=0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CalibrationError, match="holds no example"):
        calibration_split(tmp_path / "empty.jsonl", n=4)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        calibration_split(tmp_path / "missing.jsonl", n=4)
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        calibration_split(tmp_path / "bad.jsonl", n=4)


# ---- CLI ---------------------------------------------------------------------------------
@pytest.fixture
def cli_setup(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    model = tiny_causal_lm("llama", vocab_size=VOCAB)
    attach_routers(model, RouterConfig())
    randomize_routers(model, scale=0.2)
    routers = save_routers(model, tmp_path / "routers")
    data = write_chat_jsonl(tmp_path / "calib.jsonl", 40)
    return folder, routers, data


def test_calibrate_cli_saves_thresholds_and_reports_heldout(tmp_path, cli_setup):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder, routers, data = cli_setup
    out = tmp_path / "calibrated"
    args = [
        "calibrate",
        "--model",
        str(folder),
        "--routers",
        str(routers),
        "--target_capacity",
        "0.5",
        "--data",
        str(data),
        "--n",
        "24",
        "--n_heldout",
        "16",
        "--max_length",
        "64",
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(app, args + ["--method", "per_layer", "--route_on", "all"])
    assert result.exit_code == 0, result.output
    assert "target capacity 0.5000 reached" in result.output
    report = json.loads((out / CALIBRATION_REPORT).read_text())
    assert report["n"] == 24 and report["n_heldout"] == 16 and report["heldout"]["overall"] is not None
    assert report["route_on"] == "all"
    for c in report["calibration"]["counts"].values():
        assert abs(c["kept"] - kept_target(0.5, c["total"])) <= 1
    # The source folder is untouched; the new one loads with its thresholds.
    assert (
        json.loads((routers / "router_config.json").read_text())["router_config"]["layer_thresholds"] is None
    )
    fresh = tiny_causal_lm("llama", vocab_size=VOCAB)
    load_routers(fresh, out)
    assert {str(i): layer.router.threshold for i, layer in routed_layers(fresh).items()} == report[
        "thresholds"
    ]
    # Defaults: global method, in place.
    result = CliRunner().invoke(app, args[:-2])
    assert result.exit_code == 0, result.output
    report = json.loads((routers / CALIBRATION_REPORT).read_text())
    assert report["method"] == "global" and len(set(report["thresholds"].values())) == 1
    assert report["route_on"] == "prompt"
    kept = sum(c["kept"] for c in report["calibration"]["counts"].values())
    total = sum(c["total"] for c in report["calibration"]["counts"].values())
    assert abs(kept - kept_target(0.5, total)) <= max(1, int(0.005 * total))


def test_calibrate_cli_bad_inputs(tmp_path, cli_setup):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder, routers, data = cli_setup
    runner = CliRunner()
    base = ["calibrate", "--model", str(folder), "--data", str(data)]
    r = runner.invoke(app, base + ["--routers", str(routers), "--target_capacity", "1.2"])
    assert r.exit_code == 1 and "--target_capacity must be in [0, 1]" in r.output
    r = runner.invoke(app, base + ["--routers", str(routers), "--target_capacity", "0.5", "--route_on", "answer"])
    assert r.exit_code == 1 and "--route_on must be 'prompt' or 'all'" in r.output
    r = runner.invoke(app, base + ["--routers", str(tmp_path / "nope"), "--target_capacity", "0.5"])
    assert r.exit_code == 1 and "does not exist" in r.output
    (tmp_path / "empty.jsonl").write_text("")
    r = runner.invoke(
        app,
        [
            "calibrate",
            "--model",
            str(folder),
            "--routers",
            str(routers),
            "--target_capacity",
            "0.5",
            "--data",
            str(tmp_path / "empty.jsonl"),
        ],
    )
    assert r.exit_code == 1 and "holds no example" in r.output
