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


def _table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def _renderings(value: float) -> set[str]:
    """The ways the report may print a number of results.json."""
    v = abs(value)
    out = set()
    for x in (v, 100 * v, v / 60, v / 2**20):
        out |= {f"{x:.1f}", f"{x:.2f}", f"{x:.3f}", f"{x:.4f}"}
    return out


def _numeric_leaves(node) -> list[float]:
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numeric_leaves(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numeric_leaves(v)]
    return []


def check_report_numbers(text: str, results: dict) -> None:
    """Every number of report.md is the one in results.json: the trade-off and per-task tables
    cell by cell against the raw results, and every decimal anywhere in the report among
    results.json's numbers."""
    import re

    from routertune.evaluation.scores import paired_difference
    from routertune.tasks import primary_metric

    dense = results["eval_dense"]
    points = {p["name"]: p for p in results["points"]}
    evals = {"dense": dense, **{name: p["eval"] for name, p in points.items()}}

    def pts(d):
        return f"{100 * d['difference']:+.2f} +- {100 * d['stderr']:.2f}"

    def speedup(point, context, phase):
        cell = next(c for c in point["bench"]["results"] if c["context"] == context)
        return f"{cell['speedup'][phase]['measured']:.3f}x"

    contexts = list(results["settings"]["bench_contexts"])
    rows = _table(text, "| model | capacity | average")
    assert [r["model"] for r in rows] == ["dense", *points]
    for row in rows:
        ev = evals[row["model"]]
        assert row["average"] == f"{100 * ev['average']['value']:.1f}"
        if row["model"] == "dense":
            assert row["capacity"] == "1.000" and row["vs dense"] == ""
            continue
        point = points[row["model"]]
        assert row["capacity"] == f"{point['capacity']:.3f}"
        assert row["vs dense"] == pts(paired_difference(dense, ev))
        if point["kind"] == "routed":
            drop = {"name": "dense", "eval": dense, **points.get(point["same_compute_drop"], {})}
            assert (
                row["vs drop of the same compute"]
                == f"{pts(paired_difference(drop['eval'], ev))} ({drop['name']})"
            )
        for c in contexts:
            for phase in ("prefill", "decode"):
                assert row[f"{phase} {c}"] == speedup(point, c, phase)

    tasks = _table(text, "| task | metric | n |")
    assert [t["task"] for t in tasks] == list(dense["tasks"])
    for t in tasks:
        metric = primary_metric(t["task"], dense["tasks"][t["task"]])
        assert t["metric"] == metric and t["n"] == str(dense["tasks"][t["task"]]["samples"])
        for name, ev in evals.items():
            assert t[name] == f"{100 * ev['tasks'][t['task']][metric]:.1f}"

    known = set().union(*(_renderings(x) for x in _numeric_leaves(results)))
    decimals = re.findall(r"\d+\.\d+", text)
    assert decimals and not [d for d in decimals if d not in known]


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
        calibrated_capacities=(0.5,),
        bench_contexts=(16, 24),
        bench_new_tokens=2,
        bench_repeats=1,
    )
    report = run_quickstart(settings)
    assert report == out / "report.md"
    text = report.read_text()
    for heading in ("## Held-out LM loss", "## The trade-off", "## Accuracy per task", "## Speed",
                    "## Against the paper's headline"):  # fmt: skip
        assert heading in text
    results = json.loads((out / "results.json").read_text())
    assert {"train", "eval_dense", "points", "attention_drop", "summary"} <= set(results)
    assert 0 < results["train"]["train_examples"] <= 8  # examples with no answer token left are dropped
    points = {p["name"]: p for p in results["points"]}
    assert list(points)[:2] == ["routed", "routed@0.5"]
    assert results["attention_drop"]["candidates"] == [1, 2]
    for name in ("routed", "routed@0.5"):
        routed = points[name]
        assert routed["capacity"] == routed["eval"]["capacity"]["overall"]
        # beside it: the drop of as many of the 2 candidate attention layers as it skipped, rounded
        n_drop = int((1 - routed["capacity"]) * 2 + 0.5)
        if n_drop == 0:
            assert routed["same_compute_drop"] == "dense"
        else:
            drop = points[routed["same_compute_drop"]]
            assert drop["kind"] == "drop" and drop["capacity"] == 1 - n_drop / 2
    assert abs(points["routed@0.5"]["calibration"]["calibration"]["overall"] - 0.5) <= 0.25
    check_report_numbers(text, results)
    assert (out / "routers" / "routers.safetensors").is_file()
    for png in ("accuracy.png", "capacity.png", "tradeoff.png"):
        assert (out / png).stat().st_size > 1000


def test_report_numbers_check_catches_a_wrong_number(tmp_path):
    """The check above fails on a report whose number is not the one in results.json."""
    from routertune.quickstart.report import write_report

    results = _synthetic_results()
    text = write_report(results, tmp_path).read_text()  # adds results["summary"]
    results = json.loads(json.dumps(results))  # as saved in results.json
    check_report_numbers(text, results)
    wrong = text.replace("| dense | 1.000 | 50.0 |", "| dense | 1.000 | 51.0 |")
    assert wrong != text
    with pytest.raises(AssertionError):
        check_report_numbers(wrong, results)


def _synthetic_results() -> dict:
    """Results of a quickstart on two tasks of four documents, with made-up speeds: for the
    report alone (no model is run)."""

    def ev(scores: dict[str, list[float]], capacity=None):
        tasks = {
            name: {"acc": sum(x) / len(x), "samples": len(x), "per_doc": {"acc": x}}
            for name, x in scores.items()
        }
        avg = sum(t["acc"] for t in tasks.values()) / len(tasks)
        return {
            "tasks": tasks,
            "average": {"value": avg},
            "capacity": {"overall": capacity, "per_layer": {"1": capacity}},
        }

    def bench(speedup):
        return {
            "results": [
                {
                    "context": 16,
                    "batch": 1,
                    "capacity_overall": {"prefill": 0.5},
                    "variants": {
                        "dense": {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0},
                        "routed": {
                            "prefill_tokens_per_s": 100.0 * speedup,
                            "decode_tokens_per_s": 10.0 * speedup,
                        },
                    },
                    "speedup": {ph: {"measured": speedup, "ideal": 1.25} for ph in ("prefill", "decode")},
                    "kv_cache_bytes": {"dense": 2**21, "routed": 2**20},
                }
            ]
        }

    return {
        "settings": {
            "limit": 4,
            "mmlu_limit": 1,
            "granularity": "attn_sequence",
            "router_layers": 2,
            "bench_contexts": [16],
            "bench_batch": 1,
            "bench_new_tokens": 2,
        },  # fmt: skip
        "train": {"model": "tiny", "train_examples": 8, "steps": 2},
        "timings_s": {"train": 30.0},
        "wall_time_s": 120.0,
        "eval_dense": ev({"winogrande": [1, 0, 1, 0], "rte": [1, 1, 0, 0]}),
        "points": [
            {
                "name": "routed",
                "kind": "routed",
                "target_capacity": None,
                "capacity": 0.5,
                "same_compute_drop": "drop 1",
                "eval": ev({"winogrande": [1, 1, 1, 0], "rte": [1, 0, 0, 0]}, 0.5),
                "bench": bench(1.1),
            },
            {
                "name": "drop 1",
                "kind": "drop",
                "capacity": 0.5,
                "dropped": [2],
                "eval": ev({"winogrande": [0, 0, 1, 0], "rte": [1, 1, 0, 1]}),
                "bench": bench(1.2),
            },
        ],  # fmt: skip
    }
