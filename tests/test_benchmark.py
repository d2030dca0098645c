"""routertune bench: variants of one model, the report's schema, and bad inputs (no timed assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from routertune import (
    GRANULARITIES,
    RouterConfig,
    RouterLoadError,
    attach_routers,
    load_routers,
    save_routers,
)
from routertune.benchmark import (
    PRESETS,
    SCHEMA,
    BenchError,
    BenchSettings,
    build_random_model,
    force_skip,
    forced_skip_layers,
    routers_detached,
    run_benchmark,
    sublayers_deleted,
    variant,
)
from routertune.benchmark.compiled import COMPILED_VARIANTS
from routertune.benchmark.presets import preset_config
from routertune.benchmark.suite import _oracle_layers
from routertune.cli import app
from routertune.routing.attach import routed_layers

from helpers import randomize_routers, tiny_model

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "models"))
from tiny_models import save_tiny_llama  # noqa: E402

runner = CliRunner()
TINY = dict(contexts=(12,), batches=(1, 2), new_tokens=2, repeats=1, warmup=0)


def test_forced_skip_layers_deepest_first():
    routed = [3, 4, 5, 6, 7, 8]
    assert forced_skip_layers(routed, 0.5) == [6, 7, 8]
    assert forced_skip_layers(routed, 0.0) == []
    assert forced_skip_layers(routed, 1.0) == routed
    assert forced_skip_layers(routed, 0.25) == [7, 8]  # 1.5 rounds up
    assert forced_skip_layers([5, 1, 3], 0.34) == [5]
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(BenchError, match="skip_ratio"):
            forced_skip_layers(routed, bad)


def test_routers_detached_is_the_plain_model_and_restores_routers():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        plain = model(ids).logits
    attach_routers(model, RouterConfig(router_layers=2))
    randomize_routers(model, seed=3)
    force_skip(model, 0.5)
    weights = {i: layer.router.proj.weight.clone() for i, layer in routed_layers(model).items()}
    thresholds = {i: layer.router.threshold for i, layer in routed_layers(model).items()}
    with torch.no_grad():
        routed = model(ids).logits
        with routers_detached(model):
            assert routed_layers(model) == {}
            torch.testing.assert_close(model(ids).logits, plain)
        torch.testing.assert_close(model(ids).logits, routed)
    assert {i: layer.router.threshold for i, layer in routed_layers(model).items()} == thresholds
    for i, layer in routed_layers(model).items():
        torch.testing.assert_close(layer.router.proj.weight, weights[i])


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_sequence", "block_sequence"])
def test_oracle_computes_what_the_routed_model_computes(granularity):
    """Deleting the skipped sub-layers gives the same logits as routing around them."""
    model = tiny_model("llama")
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    skipped = force_skip(model, 0.5)
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        routed = model(ids).logits
        with sublayers_deleted(model, skipped, granularity.split("_")[0]):
            torch.testing.assert_close(model(ids).logits, routed)
        with variant(model, "all_kept"):
            dense = model(ids).logits
    assert not torch.allclose(dense, routed)  # the skip really changed the function


def test_oracle_layers_rules():
    assert _oracle_layers({1: 1.0, 2: 0.0}, {1: 1.0, 2: 0.0}) == ([2], None)
    layers, reason = _oracle_layers({1: 0.5, 2: 0.0}, {1: 0.5, 2: 0.0})
    assert layers is None and "[1]" in reason
    assert _oracle_layers({1: 1.0}, {1: 1.0})[1].startswith("nothing is skipped")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_run_benchmark_with_forced_skip(granularity):
    model = build_random_model("random:llama-tiny")
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    report = run_benchmark(model, BenchSettings(skip_ratio=0.5, **TINY), name="tiny")
    assert report["schema"] == SCHEMA and report["skip"]["layers"] == [2]
    target, unit = granularity.split("_")
    for cell in report["results"]:
        assert cell["capacity"]["prefill"] == {1: 1.0, 2: 0.0}
        assert cell["capacity"]["decode"] == {1: 1.0, 2: 0.0}
        assert cell["oracle_layers"] == [2]
        for phase in ("prefill", "decode"):
            f = cell["flops"][phase]
            s = cell["speedup"][phase]
            assert s["ideal"] == pytest.approx(f["dense"]["total"] / f["routed"]["total"])
            assert s["ideal"] > 1.0
            assert s["measured"] > 0 and s["oracle_measured"] > 0
            assert s["measured_over_ideal"] == pytest.approx(s["measured"] / s["ideal"])
            if unit == "sequence" or target == "mlp":
                assert f["routed"]["total"] == f["deleted"]["total"]
            else:
                assert f["routed"]["total"] > f["deleted"]["total"]  # keys/values still computed
        kv = cell["kv_cache_bytes"]
        if target == "mlp" or unit == "token":
            assert kv["routed"] == kv["dense"]  # attention (or its K/V) still runs in every layer
        else:
            assert kv["routed"] < kv["dense"]
            assert kv["routed"] == kv["oracle"]


def test_threshold_zero_ideal_is_exactly_one():
    model = build_random_model("random:llama-tiny")
    attach_routers(model, RouterConfig(router_layers=2))
    report = run_benchmark(model, BenchSettings(skip_ratio=0.0, **TINY))
    for cell in report["results"]:
        assert cell["speedup"]["prefill"]["ideal"] == 1.0
        assert cell["speedup"]["decode"]["ideal"] == 1.0
        assert cell["variants"]["oracle"] is None and "nothing is skipped" in cell["oracle_note"]
        assert cell["kv_cache_bytes"]["routed"] == cell["kv_cache_bytes"]["dense"]


def test_bench_settings_reject_bad_values():
    with pytest.raises(BenchError, match="context"):
        BenchSettings(contexts=(0,))
    with pytest.raises(BenchError, match="variants"):
        BenchSettings(variants=("routed",))
    with pytest.raises(BenchError, match="new_tokens"):
        BenchSettings(new_tokens=0)


def test_presets_parameter_counts_match_built_models():
    from transformers import AutoModelForCausalLM

    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(preset_config(preset))
        assert sum(p.numel() for p in model.parameters()) == preset.num_parameters(), name


def test_preset_too_big_for_memory_is_refused(monkeypatch):
    import routertune.benchmark.presets as bench

    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(BenchError, match="GiB"):
        build_random_model("random:llama-1b")


# ---- the CLI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _bench(*args: str):
    return runner.invoke(app, ["bench", *args])


def test_cli_json_report(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    result = _bench(
        "--model", str(tiny_folder), "--context", "16", "--new_tokens", "2", "--repeats", "1", "--batch", "1,2",
        "--skip_ratio", "0.5", "--router_layers", "2", "--json", str(out),
    )
    assert result.exit_code == 0, result.output
    assert "| 16 | 2 | decode |" in result.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA
    assert report["model"] == str(tiny_folder.resolve())
    assert report["environment"]["device"] == "cpu" and report["environment"]["dtype"] == "float32"
    assert report["settings"]["contexts"] == [16] and report["settings"]["new_tokens"] == 2
    assert [(c["context"], c["batch"]) for c in report["results"]] == [(16, 1), (16, 2)]
    for cell in report["results"]:
        assert set(cell["variants"]) == {"dense", "all_kept", "routed", "oracle"}
        for v in cell["variants"].values():
            assert len(v["prefill_s"]) == 1 and len(v["decode_s"]) == 1
            assert v["prefill_tokens_per_s"] > 0 and v["decode_tokens_per_s"] > 0
            assert v["prefill_s_median"] > 0 and v["kv_cache_bytes"] > 0
        assert cell["kv_cache_bytes"]["routed"] < cell["kv_cache_bytes"]["dense"]
        for phase in ("prefill", "decode"):
            s = cell["speedup"][phase]
            for key in ("measured", "ideal", "measured_over_ideal", "oracle_measured", "oracle_ideal",
                        "routed_over_oracle"):
                assert s[key] > 0, key
            assert s["all_kept_overhead"] > -1
            assert cell["flops"][phase]["dense"]["total"] > cell["flops"][phase]["routed"]["total"] > 0


def test_cli_compiled_report(tiny_folder, tmp_path):
    """--compile: every variant decodes its eager reference's tokens; the forced route
    compiles as deleted sub-layers (same KV as the oracle), the scored one as ops."""
    out = tmp_path / "bench.json"
    result = _bench(
        "--model", str(tiny_folder), "--context", "12", "--new_tokens", "3", "--repeats", "2", "--batch", "2",
        "--skip_ratio", "0.5", "--router_layers", "2", "--compile", "--compile_backend", "eager",
        "--json", str(out),
    )
    assert result.exit_code == 0, result.output
    assert "| 12 | 2 |" in result.stdout
    report = json.loads(out.read_text())
    assert report["kind"] == "compiled" and report["settings"]["backend"] == "eager"
    (cell,) = report["results"]
    assert set(cell["variants"]) == set(COMPILED_VARIANTS)
    for v in cell["variants"].values():
        assert v["tokens_equal_eager"] and len(v["decode_s"]) == 2 and v["decode_tokens_per_s"] > 0
    kv = {name: v["kv_cache_bytes"] for name, v in cell["variants"].items()}
    assert kv["routed_compiled"] == kv["oracle_compiled"] == kv["routed_scored_compiled"] < kv["dense_compiled"]
    for key in ("routed_compiled_vs_dense_compiled", "oracle_compiled_vs_dense_compiled", "dense_compiled_vs_dense_eager"):
        assert cell["decode_speedup"][key] > 0


def test_gpu_check_script_at_a_toy_shape(tmp_path):
    """benchmarks/gpu_check.py, the prepared GPU run, on CPU at a toy shape (the compiled section
    traced without compiling; `bash benchmarks/gpu_check.sh` on a GPU runs inductor)."""
    import subprocess

    out = tmp_path / "gpu_check.json"
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--compile_backend", "eager", "--out", str(out),
         "--kernels", "sdpa,eager"],  # flex attention compiles with inductor: tests/test_attention_kernels.py
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert set(sections) == {"exact", "kernels", "eager", "train", "compiled_batch1", "compiled_batch2"}
    assert sections["exact"]["routers_on_equals_dense"] and sections["exact"]["skipping_equals_deleted"]
    for kernel in ("sdpa", "eager"):
        checks = {k: v for k, v in sections["kernels"][kernel].items() if k != "seconds"}
        assert checks == {"routers_on_equals_dense": True, "skipping_equals_deleted": True,
                          "mixed_rows_equal_rows_alone": [True, True]}, kernel
    assert sections["train"]["router"]["trainable_parameters"] < sections["train"]["full"]["trainable_parameters"]
    for batch in (1, 2):
        (cell,) = sections[f"compiled_batch{batch}"]["report"]["results"]
        assert all(v["tokens_equal_eager"] for v in cell["variants"].values())


def test_cli_loads_saved_routers(tiny_folder, tmp_path):
    model = tiny_model("llama")  # same shape as the tiny folder's model (hidden 64, 4 layers)
    attach_routers(model, RouterConfig(granularity="attn_token", router_layers=2))
    randomize_routers(model, seed=5)
    save_routers(model, tmp_path / "routers")
    out = tmp_path / "r.json"
    result = _bench("--model", str(tiny_folder), "--routers", str(tmp_path / "routers"), "--context", "8",
                    "--new_tokens", "2", "--repeats", "1", "--batch", "2", "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["granularity"] == "attn_token" and report["routed_layers"] == [1, 2]
    assert report["skip"]["ratio"] is None
    cell = report["results"][0]
    assert set(cell["capacity"]["prefill"]) == {"1", "2"}
    assert all(0.0 <= c <= 1.0 for c in cell["capacity"]["decode"].values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "random:llama-99b"], "unknown preset 'random:llama-99b'; presets: random:llama-tiny"),
        (["--model", "random:llama-tiny", "--skip_ratio", "1.5"], "skip_ratio must be in [0, 1]; got 1.5"),
        (["--model", "random:llama-tiny", "--skip_ratio", "-0.5"], "skip_ratio must be in [0, 1]"),
        (["--model", "random:llama-tiny", "--context", "16,abc"], "--context must be comma-separated"),
        (["--model", "random:llama-tiny", "--batch", "0"], "--batch must be comma-separated positive"),
        (["--model", "random:llama-tiny", "--granularity", "attn_layer"], "--granularity must be one of"),
        (["--model", "random:llama-tiny", "--variants", "routed,oracle"], "variants must include dense"),
        (["--model", "./no/such/folder"], "does not exist"),
    ],
)
def test_cli_bad_inputs(args, message):
    defaults = ["--new_tokens", "1", "--repeats", "1"] + ([] if "--context" in args else ["--context", "8"])
    result = _bench(*args, *defaults)
    assert result.exit_code == 1
    assert message in result.output


def test_cli_routers_for_another_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    attach_routers(other, RouterConfig(router_layers=2))
    save_routers(other, tmp_path / "routers")
    with pytest.raises(RouterLoadError):  # the library error the CLI reports
        load_routers(build_random_model("random:llama-tiny"), tmp_path / "routers")
    result = _bench("--model", "random:llama-tiny", "--routers", str(tmp_path / "routers"), "--context", "8")
    assert result.exit_code == 1
    assert "were saved for a model with hidden_size=32 and 6 layers" in result.output
    assert "this model has hidden_size=64 and 4 layers" in result.output


# ---- the benchmark scripts -------------------------------------------------------------------
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_design_script_alternatives_compute_the_same_and_report(tmp_path):
    """The compared implementations agree with the library (checked inside) and the report is written."""
    design = _script("bench_design")
    out = tmp_path / "design"
    design.main(["--model", "random:llama-tiny", "--router_layers", "2", "--context", "16", "--new_tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--threads", "1", "--only", "kv_rows", "--only", "token_attn",
                 "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["runs"]) == {"kv_rows", "token_attn"}
    assert report["runs"]["kv_rows"]["environment"]["threads"] == 1
    kv_rows = report["runs"]["kv_rows"]["entries"][0]["variants"]
    assert set(kv_rows) == {"dense", "compact_rows", "zero_kv_rows", "all_rows_kv", "compute_all_mask"}
    assert kv_rows["all_rows_kv"]["prefill_ideal"] < kv_rows["compact_rows"]["prefill_ideal"]
    # the compact layers hold half their rows: less KV than the batch-wide zero-row buffers
    assert kv_rows["compact_rows"]["kv_cache_bytes"] < kv_rows["zero_kv_rows"]["kv_cache_bytes"]
    assert "(b) attn_token" in out.with_suffix(".md").read_text()
    # A later run of one measurement keeps the others.
    design.main(["--model", "random:llama-tiny", "--router_layers", "2", "--threads", "1", "--repeats", "1",
                 "--only", "overhead_micro", "--micro_steps", "3", "--out", str(out)])
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert set(runs) == {"kv_rows", "token_attn", "overhead_micro"}
    assert runs["overhead_micro"]["entries"][0]["layers"] == 30


def test_skipping_script_tiny_suite(tmp_path):
    skipping = _script("bench_skipping")
    out = tmp_path / "skip"
    skipping.main(["--suite", "tiny", "--threads", "1", "--warmup", "0", "--out", str(out)])
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert list(runs) == ["tiny"]
    checks = runs["tiny"]["goals"]["checks"]
    assert len(checks) == 4 and all(c["measured_over_ideal"] > 0 for c in checks)
    assert "## tiny: random:llama-tiny" in out.with_suffix(".md").read_text()


@pytest.mark.integration
def test_real_default_model_bench(tmp_path):
    """SmolLM2-135M-Instruct through the real CLI: the deepest half of layers 13..28 skip attention."""
    out = tmp_path / "real.json"
    result = _bench("--context", "32", "--batch", "2", "--new_tokens", "2", "--repeats", "1", "--warmup", "0",
                    "--skip_ratio", "0.5", "--device", "cpu", "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == "smollm2-135m-instruct" and report["model_shape"]["num_layers"] == 30
    assert report["routed_layers"] == list(range(13, 29)) and report["skip"]["layers"] == list(range(21, 29))
    cell = report["results"][0]
    assert cell["oracle_layers"] == list(range(21, 29))
    # 8 of 30 layers store no KV: 2 (K, V) x 3 heads x 64 dims x 4 bytes x 2 rows x (32 + 2 decode steps).
    per_layer = 2 * 3 * 64 * 4 * 2 * (32 + 2)
    assert cell["kv_cache_bytes"]["dense"] == 30 * per_layer
    assert cell["kv_cache_bytes"]["routed"] == cell["kv_cache_bytes"]["oracle"] == 22 * per_layer


def _tiny_chat_llama(folder: Path, layers: int):
    """A saved tiny Llama with a byte-level chat tokenizer (what the builtin data needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import byte_chat_tokenizer

    tokenizer = byte_chat_tokenizer(model_max_length=4096, padding_side="left")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_headroom_script_on_a_tiny_model(tmp_path):
    """benchmarks/headroom.py end to end: per-example oracle routes, run as per-row forced routes
    in mixed batches, cost what the same skips cost on their own."""
    folder, _ = _tiny_chat_llama(tmp_path / "tiny", layers=4)
    out = tmp_path / "headroom"
    _script("headroom").main(["--model", str(folder), "--n_fit", "6", "--n_test", "6", "--max_length", "512",
                              "--batch_size", "3", "--greedy_width", "2", "--output", str(out)])  # fmt: skip
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["units"] == [1, 2] and report["examples"]["test"] > 1
    caps = report["capacities"]
    # 0.875 of two units skips none: every choice is the dense model
    assert caps["0.875"]["skipped_units"] == 0
    assert all(abs(c["kl"]) < 1e-6 for c in caps["0.875"]["choices"].values())
    # one unit: each example's cheaper one (the oracle) is at least as good as any fixed one
    one = caps["0.75"]["choices"]
    assert caps["0.75"]["skipped_units"] == 1 and one["static"]["kl"] > 0
    assert one["oracle"]["kl"] <= min(c["kl"] for c in one.values()) + 1e-6
    assert one["oracle_greedy"]["kl"] == pytest.approx(one["oracle"]["kl"], abs=1e-6)
    assert "| 0.75 | 1 | oracle |" in out.with_suffix(".md").read_text()


def test_granularity_table_matches_a_token_row_with_the_drop_of_its_flops():
    """A token that skips attention still computes its keys/values: half the token-attentions
    kept saves less than dropping half the attentions, so the drop set against an attn_token
    point is the one of the nearest FLOP ideal, fewer units than its share says; a sequence point
    keeps the share rule."""
    from transformers import LlamaConfig

    table = _script("granularity_table")
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000)  # fmt: skip
    per_layer = {str(i): 0.5 for i in range(8, 16)}
    ideal = table.curve._ideal(config, {int(k): v for k, v in per_layer.items()}, 512, "attn_token")
    token = {"point": "routed-attn_token:native", "setup": {"granularity": "attn_token"},
             "eval": {"capacity": {"overall": 0.5, "per_layer": per_layer}}, "ideal_speedup_512": ideal}  # fmt: skip
    n = table._n_drop(token, lambda: config)

    def drop_ideal(k):
        caps = {int(layer): (0.0 if j < k else 1.0) for j, layer in enumerate(per_layer)}
        return table.curve._ideal(config, caps, 512, "attn_sequence")["prefill"]

    assert 0 < n < 4  # the share rule would drop 4 of the 8 routed attentions
    assert all(abs(drop_ideal(n) - ideal["prefill"]) <= abs(drop_ideal(k) - ideal["prefill"]) for k in range(9))
    sequence = {**token, "setup": {"granularity": "attn_sequence"}}
    assert table._n_drop(sequence, lambda: config) == 4
    with pytest.raises(SystemExit, match="needs the config"):
        table._n_drop(token)


def test_granularity_table_script_on_a_tiny_model(tmp_path):
    """benchmarks/granularity_table.py end to end on a tiny model: train (one step), evaluate
    routed points and the drop of the same unit and compute, time them, report; every number of
    the table is the recorded one."""
    from routertune.baselines import n_drop_for_capacity

    folder, model = _tiny_chat_llama(tmp_path / "tiny", layers=6)
    # mlp_sequence: random routers (they skip about half), so that a drop of the same compute exists
    attach_routers(model, RouterConfig(granularity="mlp_sequence"))
    randomize_routers(model, seed=1)
    save_routers(model, tmp_path / "routers-mlp_sequence")
    randomize_routers(model, seed=3)  # a second seed's run of the same row
    save_routers(model, tmp_path / "routers-mlp_sequence-seed3")

    table = _script("granularity_table")
    common = ["--model", str(folder), "--routers", str(tmp_path / "routers-{granularity}"),
              "--points_dir", str(tmp_path / "points"), "--curve_dir", str(tmp_path / "no-curve")]  # fmt: skip
    table.main([*common, "train", "--granularities", "attn_token", "--run_dir", str(tmp_path / "runs"),
                "--max_train_samples", "8"])  # fmt: skip
    assert (tmp_path / "routers-attn_token" / "train_results.json").exists()
    table.main([*common, "eval", "--granularities", "attn_token,mlp_sequence,mlp_sequence-seed3",
                "--tasks", "arc_easy,rte", "--limit", "6", "--mmlu_limit", "1"])  # fmt: skip
    table.main([*common, "speed", "--granularities", "attn_token,mlp_sequence", "--contexts", "16",
                "--new_tokens", "2", "--repeats", "1", "--threads", "1"])  # fmt: skip
    out = tmp_path / "table"
    table.main([*common, "report", "--output", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["granularity"]: r for r in data["rows"]}
    mlp = rows["mlp_sequence"]
    n_drop = n_drop_for_capacity(mlp["routed"]["capacity"], 4)
    assert 0 < n_drop < 4 and mlp["drop"]["point"] == f"drop-mlp:{n_drop}"
    drop = json.loads((tmp_path / "points" / f"drop-mlp-{n_drop}.json").read_text())
    assert drop["setup"]["unit"] == "mlp" and len(drop["setup"]["dropped"]) == n_drop
    assert rows["block_token"].get("routed") is None and "speed" in rows["attn_token"]
    lines = {line.split(" | ")[0].strip("| "): line for line in out.with_suffix(".md").read_text().splitlines()}
    cells = lines["mlp_sequence"].strip("|").split(" | ")
    assert cells[1:4] == [
        f"{mlp['routed']['capacity']:.3f}",
        f"{100 * mlp['routed']['average']:.2f}",
        f"{100 * mlp['routed']['vs_dense']['difference']:+.2f} +- {100 * mlp['routed']['vs_dense']['stderr']:.2f}",
    ]
    assert cells[5] == f"{100 * mlp['drop']['average']:.2f}"
    assert cells[7] == f"{mlp['speed']['16']['prefill']['measured']:.3f}x ({mlp['speed']['16']['prefill']['ideal']:.3f}x)"
    assert "not run" in lines["block_token"] and "about 61.0 | 1.25x" in lines["block_token"]
    seed3 = rows["mlp_sequence-seed3"]  # right after its granularity's row, with its own drop
    assert list(rows).index("mlp_sequence-seed3") == list(rows).index("mlp_sequence") + 1
    assert seed3["paper"] == mlp["paper"] and seed3["routed"]["point"] == "routed-mlp_sequence-seed3:native"
    assert seed3["drop"]["point"].startswith("drop-mlp:") and "average" in seed3["drop"]
    assert lines["mlp_sequence-seed3"].split(" | ")[2] == f"{100 * seed3['routed']['average']:.2f}"
    with pytest.raises(SystemExit, match="seedx"):
        table.main([*common, "eval", "--granularities", "mlp_sequence-seedx"])


def test_lora_table_script_on_a_tiny_model(tmp_path):
    """benchmarks/lora_table.py on recorded rows as training writes them (routers alone, LoRA
    alone with routers fixed to keep, LoRA + routers): evaluated with the adapters merged,
    timed, reported; every number of the table is the recorded one."""
    import copy

    from peft import LoraConfig, get_peft_model

    from routertune.training.trainer import rename_to_plain_names

    folder, model = _tiny_chat_llama(tmp_path / "tiny", layers=6)
    for name, threshold, lora in (("attn_sequence", 0.5, False), ("lora", 0.0, True), ("lora-routers", 0.5, True)):
        routed = copy.deepcopy(model)
        attach_routers(routed, RouterConfig(threshold=threshold))
        randomize_routers(routed, seed=2)
        out = tmp_path / f"routers-{name}"
        if lora:
            config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
            peft_model = get_peft_model(routed, config)
            peft_model.save_pretrained(str(out), state_dict={n: p for n, p in peft_model.named_parameters() if "lora_" in n})
            rename_to_plain_names(routed, out / "adapter_model.safetensors")
        save_routers(routed, out)
    lora_table = _script("lora_table")
    common = ["--model", str(folder), "--routers", str(tmp_path / "routers-{granularity}"),
              "--points_dir", str(tmp_path / "points"), "--curve_dir", str(tmp_path / "no-curve")]  # fmt: skip
    lora_table.main([*common, "train"])  # every row recorded: nothing to train
    lora_table.main([*common, "eval", "--tasks", "arc_easy,rte", "--limit", "6"])
    lora_table.main([*common, "speed", "--contexts", "16", "--new_tokens", "2", "--repeats", "1", "--threads", "1"])
    out = tmp_path / "lora"
    lora_table.main([*common, "report", "--output", str(out), "--table_dir", str(tmp_path / "no-table")])

    rows = {r["row"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["lora"]["capacity"] == 1.0 and "vs_lora" in rows["lora-routers"]
    md = out.with_suffix(".md").read_text().splitlines()
    lines = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in md}
    both = rows["lora-routers"]
    assert lines["lora-routers"][1:5] == [
        f"{both['capacity']:.3f}",
        f"{100 * both['average']:.2f}",
        f"{100 * both['vs_dense']['difference']:+.2f} +- {100 * both['vs_dense']['stderr']:.2f}",
        f"{100 * both['vs_lora']['difference']:+.2f} +- {100 * both['vs_lora']['stderr']:.2f}",
    ]
    assert lines["lora-routers"][6] == f"{both['speed']['16']['prefill']:.3f}x"
    assert lines["lora"][6] == "1.000x (dense)" and lines["lora"][-2:] == ["71.0", "1.00x"]


def test_task_headroom_script_on_a_tiny_model(tmp_path):
    """benchmarks/task_headroom.py end to end: single-unit passes, the per-document oracle (a forced
    route per document, WinoGrande's per-choice contexts included: a pair of documents that shares
    its contexts shares one route) and the best static set; with
    one unit skipped, every document of the oracle pass scores exactly as in the pass that skips
    its chosen unit for every document."""
    folder, _ = _tiny_chat_llama(tmp_path / "tiny", layers=6)
    script = _script("task_headroom")
    out = tmp_path / "task_headroom"
    common = ["--model", str(folder), "--router_layers", "3", "--candidates", "2,3,4",
              "--tasks", "arc_easy,winogrande", "--limit", "6", "--k", "1,2",
              "--points_dir", str(tmp_path / "points"), "--curve_dir", str(tmp_path / "no-curve"), "--output", str(out)]  # fmt: skip
    for step in ("singles", "sets", "report"):
        script.main([*common, step])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["documents"] == 12 and [r["k"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["additive_cost"]["oracle"] <= row["additive_cost"]["static"] + 1e-12
        assert len(row["static_set"]) == row["k"] and set(row["static_set"]) <= {2, 3, 4}
        for name in ("static", "oracle"):  # recorded with their answer-choice log-likelihoods
            measured = row["measured_cost"][name]
            assert measured["kl"] >= 0 and 0 <= measured["answers_changed"] <= 1
    points = tmp_path / "points"
    docs, costs = script.skip_costs(script.Run(script.argparse.Namespace(
        points_dir=str(points), curve_dir="", candidates="2,3,4", tasks=None)))  # fmt: skip
    groups = script.context_groups(docs)
    assert len(set(groups)) < len(docs), "WinoGrande's pairs share their contexts: one group each"
    oracle_sets, _ = script.choose_sets(costs, 1, groups)
    assert len(set(oracle_sets)) > 1, "the test needs documents that choose different units"
    for n, g in enumerate(groups):  # a group's documents take one route: their summed costs' cheapest
        members = [m for m, h in enumerate(groups) if h == g]
        summed = {u: sum(costs[u][m] for m in members) for u in costs}
        assert summed[oracle_sets[n][0]] == min(summed.values())
    oracle = script._docs(json.loads((points / "oracle-1.json").read_text()))
    singles = {u: script._docs(json.loads((points / f"skip-{u}.json").read_text())) for u in (2, 3, 4)}
    for n, ((_, doc), (unit,)) in enumerate(zip(oracle, oracle_sets, strict=True)):
        assert doc["logliks"] == pytest.approx(singles[unit][n][1]["logliks"], abs=2e-4)
    row = data["rows"][0]
    line = next(x for x in out.with_suffix(".md").read_text().splitlines() if x.startswith("| 1 ("))
    assert f"{100 * row['average']['oracle']:.2f}" in line
    vs_drop = row["oracle_vs_drop"]
    assert f"{100 * vs_drop['difference']:+.2f} +- {100 * vs_drop['stderr']:.2f}" in line
