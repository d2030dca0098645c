"""routertune.evaluation and `routertune eval` on a tiny random Llama with a byte-level tokenizer
(built locally), on the real offline tasks; one integration test on the real SmolLM2-135M."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from routertune import RouterConfig, attach_routers, save_routers  # noqa: E402
from routertune.evaluation import (  # noqa: E402
    EvaluationError,
    UnknownTaskError,
    build_task_manager,
    evaluate,
    resolve_tasks,
)
from routertune.evaluation.harness import MaskedHFLM  # noqa: E402
from routertune.routing.attach import routed_layers, set_thresholds  # noqa: E402
from routertune.routing.observe import router_probabilities, track_capacity
from routertune.tasks import PAPER_TASKS  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_tokenizer():
    """Byte-level BPE without merges: every byte is a token (259 ids with the specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def task_manager():
    return build_task_manager()


def requests_for(task_manager, tasks: dict[str, int]):
    """lm-eval Instances of the first ``limit`` docs of each task (real prompts)."""
    instances = []
    for name, limit in tasks.items():
        full = f"routertune_{name}"
        task = task_manager.load([full])["tasks"][full]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += task.instances
    return instances


# ARC: multi-token continuations; WinoGrande: shared continuation after different contexts;
# MMLU: one-token continuations sharing one context (lm-eval's logits cache groups them).
MIXED = {"arc_easy": 6, "winogrande": 4, "mmlu_anatomy": 3}


def random_routers(model, granularity: str, seed: int = 1) -> None:
    attach_routers(model, RouterConfig(granularity=granularity, router_layers=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routed_layers(model).values():
            layer.router.proj.weight.copy_(torch.randn(layer.router.proj.weight.shape, generator=gen))


def middle_threshold(scores: torch.Tensor) -> float:
    """Midpoint of the widest gap between sorted scores in their middle half.

    Never equal to a score: a threshold sitting on a score would let float noise (batch
    shapes change the last bits of a mean) flip that decision.
    """
    s = scores.double().sort().values
    lo, hi = len(s) // 4, max(3 * len(s) // 4, len(s) // 4 + 2)
    gaps = s[lo + 1 : hi] - s[lo : hi - 1]
    j = lo + int(gaps.argmax())
    return float((s[j] + s[j + 1]) / 2)


def loglikelihoods(lm_class, model, tokenizer, instances, batch_size: int, **kwargs):
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
    out = lm.loglikelihood(instances, disable_tqdm=True)
    return torch.tensor([ll for ll, _ in out], dtype=torch.float64), [greedy for _, greedy in out]


# ---- the padding-aware wrapper ----------------------------------------------------------
def test_masked_hflm_scores_like_lm_eval_hflm_on_a_plain_model(model, tokenizer, task_manager):
    from lm_eval.models.huggingface import HFLM

    instances = requests_for(task_manager, MIXED)
    ours, ours_greedy = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=4)
    ref, ref_greedy = loglikelihoods(HFLM, model, tokenizer, instances, batch_size=4)
    assert len(ours) == len(instances) >= 6 * 3 + 4 * 2 + 3 * 4
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ours_greedy == ref_greedy


@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_sequence", "attn_token"])
def test_routed_loglikelihoods_do_not_depend_on_batch_size(model, tokenizer, task_manager, granularity):
    from lm_eval.models.huggingface import HFLM

    instances = requests_for(task_manager, MIXED)
    random_routers(model, granularity)
    # Thresholds near the median score of each layer, so that about half the units are
    # skipped and many decisions sit close enough to the threshold that padding would flip them.
    with router_probabilities(model) as recorder:
        loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=1)
    set_thresholds(model, {i: middle_threshold(s) for i, s in recorder.per_layer().items()})

    results, counts = {}, {}
    for batch_size in (1, 4):
        with track_capacity(model) as stats:
            # route_on="all": the stock HFLM below routes on context + continuation too
            results[batch_size] = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size, route_on="all")
        counts[batch_size] = stats.counts
    torch.testing.assert_close(results[1][0], results[4][0], atol=1e-4, rtol=0)
    assert results[1][1] == results[4][1]
    assert counts[1] == counts[4]
    kept = sum(k for k, _ in counts[1].values())
    total = sum(t for _, t in counts[1].values())
    assert 0 < kept < total, "the routers should skip some units and keep others"

    if granularity.endswith("_sequence"):
        # lm-eval's own HFLM passes no mask: the padded mean changes decisions with the batch.
        stock_1 = loglikelihoods(HFLM, model, tokenizer, instances, batch_size=1)[0]
        stock_4 = loglikelihoods(HFLM, model, tokenizer, instances, batch_size=4)[0]
        torch.testing.assert_close(stock_1, results[1][0], atol=1e-4, rtol=0)  # no padding at batch 1
        assert (stock_1 - stock_4).abs().max() > 1e-2


@pytest.mark.parametrize("granularity", ["attn_sequence", "block_sequence"])
def test_context_routing_scores_like_prefill_then_continuation(model, tokenizer, task_manager, granularity):
    """route_on="prompt" (default) scores each request as generation would compute it: the
    context prefilled (routes decided there), then the continuation through the cache."""
    from transformers import DynamicCache

    instances = requests_for(task_manager, {"arc_easy": 3, "winogrande": 2})
    random_routers(model, granularity)
    with router_probabilities(model) as recorder:
        loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=1)
    set_thresholds(model, {i: middle_threshold(s) for i, s in recorder.per_layer().items()})
    ours, _ = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=4)

    lm = MaskedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    expected = []
    for instance in instances:
        ctx_ids, cont_ids = lm._encode_pair(*instance.args)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = model(torch.tensor([ctx_ids]), cache=cache, use_cache=True).logits[:, -1:]
            if len(cont_ids) > 1:
                rest = model(torch.tensor([cont_ids[:-1]]), cache=cache, use_cache=True).logits
                logits = torch.cat([logits, rest], dim=1)
        logprobs = logits[0].log_softmax(-1).gather(1, torch.tensor(cont_ids).unsqueeze(1))
        expected.append(float(logprobs.sum()))
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)

    with torch.no_grad():
        routed_on_all, _ = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=4, route_on="all")
    assert (routed_on_all - ours).abs().max() > 1e-3, "routing on the answer as well changes some scores"
    with pytest.raises(EvaluationError, match="route_on"):
        MaskedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, route_on="answer")


def test_threshold_zero_routers_give_exactly_the_plain_results(model, tokenizer, task_manager):
    instances = requests_for(task_manager, MIXED)
    plain_ll, plain_greedy = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=4)
    plain = evaluate(model, tokenizer, ["arc_easy", "winogrande"], limit=8, batch_size=4)

    random_routers(model, "attn_sequence")
    set_thresholds(model, 0.0)
    routed_ll, routed_greedy = loglikelihoods(MaskedHFLM, model, tokenizer, instances, batch_size=4)
    routed = evaluate(model, tokenizer, ["arc_easy", "winogrande"], limit=8, batch_size=4)

    assert torch.equal(plain_ll, routed_ll)
    assert plain_greedy == routed_greedy
    for name in ("arc_easy", "winogrande"):
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"):
            assert plain["tasks"][name].get(key) == routed["tasks"][name].get(key), (name, key)
    assert plain["average"] == routed["average"]
    assert plain["capacity"] is None and plain["routers"] is None
    assert routed["capacity"]["overall"] == 1.0
    assert set(routed["capacity"]["per_layer"].values()) == {1.0}
    assert routed["routers"]["granularity"] == "attn_sequence"


# ---- evaluate() --------------------------------------------------------------------------
def test_evaluate_reports_metrics_samples_and_capacity_per_task(model, tokenizer):
    random_routers(model, "attn_sequence")
    set_thresholds(model, 2.0)  # above every score: each routed attention is skipped
    model.train()
    result = evaluate(model, tokenizer, "arc_easy, mmlu", limit=2, batch_size=3)

    assert model.training, "evaluate() must restore the model's mode"
    arc, mmlu = result["tasks"]["arc_easy"], result["tasks"]["mmlu"]
    assert arc["samples"] == 2 and set(arc) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "seconds"}
    assert 0.0 <= arc["acc"] <= 1.0
    assert mmlu["samples"] == 2 * 57
    assert "acc_norm" not in mmlu
    assert set(mmlu["subtasks"]) >= {"mmlu_stem", "mmlu_humanities", "mmlu_anatomy"}
    assert mmlu["subtasks"]["mmlu_anatomy"]["samples"] == 2
    assert (
        sum(
            mmlu["subtasks"][f"mmlu_{c}"]["samples"]
            for c in ("stem", "humanities", "social_sciences", "other")
        )
        == 114
    )
    layers = {str(i) for i in routed_layers(model)}
    for capacity in (arc["capacity"], mmlu["capacity"], result["capacity"]):
        assert capacity["overall"] == 0.0
        assert set(capacity["per_layer"]) == layers
    # Sequence units are counted once per request: ARC has 4 choices per question, MMLU 4
    # one-token choices that share one forward.
    assert arc["capacity"]["counts"][min(layers)]["total"] == 8
    assert (
        result["capacity"]["counts"][min(layers)]["total"]
        == arc["capacity"]["counts"][min(layers)]["total"]
        + (mmlu["capacity"]["counts"][min(layers)]["total"])
    )
    assert result["average"]["metric_per_task"] == {"arc_easy": "acc_norm", "mmlu": "acc"}
    assert result["average"]["value"] == pytest.approx((arc["acc_norm"] + mmlu["acc"]) / 2)
    assert result["paper_average"] is None
    assert result["settings"]["lm_eval_tasks"] == {
        "arc_easy": "routertune_arc_easy",
        "mmlu": "routertune_mmlu",
    }
    json.dumps(result, allow_nan=False)  # JSON-able, no NaN


def test_paper_average_needs_all_eight_tasks():
    from routertune.evaluation.scores import average as _average

    per_task = {name: {"acc": 0.5, "acc_norm": 0.7} for name in PAPER_TASKS}
    avg = _average(per_task, list(PAPER_TASKS))
    # acc_norm for ARC-Challenge, HellaSwag, OpenBookQA, PIQA; acc for the other four.
    assert avg["value"] == pytest.approx((4 * 0.7 + 4 * 0.5) / 8)
    assert avg["acc"] == pytest.approx(0.5)


def test_include_path_tasks_are_used_under_their_own_name(model, tokenizer, tmp_path):
    (tmp_path / "my_piqa.yaml").write_text(
        "task: my_piqa\n"
        "custom_dataset: !function routertune.tasks.offline_data.load_olmo_dataset\n"
        "dataset_kwargs:\n  olmo_path: piqa/plain_text\n  splits: [validation]\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Goal: {{goal}}\\nSolution:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{[sol1, sol2]}}"\nmetric_list:\n  - metric: acc\n'
    )
    result = evaluate(model, tokenizer, ["my_piqa", "rte"], limit=3, include_path=tmp_path, batch_size=2)
    assert list(result["tasks"]) == ["my_piqa", "rte"]
    assert result["tasks"]["my_piqa"]["samples"] == 3
    assert result["average"]["metric_per_task"] == {"my_piqa": "acc", "rte": "acc"}


def test_unknown_task_lists_the_available_ones(task_manager):
    with pytest.raises(UnknownTaskError) as err:
        resolve_tasks(["arc_easy", "arc_medium"], task_manager)
    message = str(err.value)
    assert "arc_medium" in message
    for name in ("arc_challenge", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande"):
        assert name in message
    assert "57 in all" in message


def test_task_names_resolve_in_request_order(task_manager):
    assert resolve_tasks("piqa, routertune_rte,mmlu_anatomy", task_manager) == {
        "piqa": "routertune_piqa",
        "rte": "routertune_rte",
        "mmlu_anatomy": "routertune_mmlu_anatomy",
    }
    with pytest.raises(EvaluationError, match="twice"):
        resolve_tasks(["piqa", "routertune_piqa"], task_manager)
    with pytest.raises(EvaluationError, match="no task"):
        resolve_tasks(" , ", task_manager)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 0}, "limit must be > 0"),
        ({"limit": -3}, "limit must be > 0"),
        ({"limit": 2.5}, "whole number"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_fewshot": -1}, "num_fewshot"),
        ({"include_path": "/nonexistent/tasks"}, "not a folder"),
    ],
)
def test_bad_arguments_fail_before_any_work(model, tokenizer, kwargs, match):
    with pytest.raises(EvaluationError, match=match):
        evaluate(model, tokenizer, ["piqa"], **kwargs)


# ---- the CLI ------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path, tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(*args: str):
    from typer.testing import CliRunner

    from routertune.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def test_cli_writes_results_json_and_prints_a_table(model_dir, tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    random_routers(model, "attn_sequence")
    routers = save_routers(model, tmp_path / "routers")
    out = tmp_path / "results" / "eval.json"
    result = run_cli(
        "--model", str(model_dir), "--routers", str(routers), "--tasks", "arc_easy,rte",
        "--limit", "3", "--batch_size", "2", "--output_path", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "arc_easy" in result.stdout and "acc_norm" in result.stdout and "average" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["tasks"]["arc_easy"]["samples"] == 3
    assert saved["tasks"]["rte"]["samples"] == 3
    assert saved["routers_path"] == str(routers)
    assert saved["routers"]["granularity"] == "attn_sequence"
    assert 0.0 <= saved["capacity"]["overall"] <= 1.0
    assert not list(out.parent.glob(".*.tmp")), "the JSON is written through a temporary file"


def test_cli_device_map_places_the_model_and_its_routers(model_dir, tokenizer, tmp_path):
    """--device_map (transformers' placement, for models too big for one device) evaluates the
    same as one device: here every layer lands on the CPU, routers beside their layers."""
    model = tiny_llama(len(tokenizer))
    random_routers(model, "attn_sequence")
    routers = save_routers(model, tmp_path / "routers")
    results = {}
    for name, extra in (("device", ["--device", "cpu"]), ("device_map", ["--device_map", "auto"])):
        out = tmp_path / f"{name}.json"
        common = ["--model", str(model_dir), "--routers", str(routers), "--tasks", "rte", "--limit", "3"]
        result = run_cli(*common, "--output_path", str(out), *extra)
        assert result.exit_code == 0, result.output
        results[name] = json.loads(out.read_text())
    assert results["device_map"]["tasks"]["rte"]["acc"] == results["device"]["tasks"]["rte"]["acc"]
    assert results["device_map"]["capacity"] == results["device"]["capacity"]
    assert "not both" in run_cli("--model", str(model_dir), "--tasks", "rte", "--device", "cpu", "--device_map", "auto").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "arc_medium"], "unknown task(s): arc_medium"),
        (["--tasks", "piqa", "--limit", "0"], "--limit must be > 0"),
        (["--tasks", "piqa", "--limit", "-5"], "--limit must be > 0"),
        (["--tasks", "piqa", "--routers", "/nonexistent/routers"], "is not a folder"),
        (["--tasks", "piqa", "--batch_size", "0"], "--batch_size must be >= 1"),
        (["--tasks", "piqa", "--output_path", "/tmp"], "is a folder"),
    ],
)
def test_cli_bad_inputs_exit_non_zero_with_a_message(model_dir, args, message):
    result = run_cli("--model", str(model_dir), *args)
    assert result.exit_code == 1
    assert message in result.output


def test_cli_routers_of_another_model_are_refused(model_dir, tokenizer, tmp_path):
    other = tiny_llama(len(tokenizer), hidden=32)
    attach_routers(other, RouterConfig(router_layers=2))
    routers = save_routers(other, tmp_path / "other-routers")
    result = run_cli("--model", str(model_dir), "--routers", str(routers), "--tasks", "piqa", "--limit", "2")
    assert result.exit_code == 1
    assert "hidden_size=32" in result.output


# ---- the real model -----------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_arc_easy_and_piqa(tmp_path):
    """SmolLM2-135M-Instruct through `routertune eval`, zero-shot, first 50 documents (~45 s).

    Recorded on this CPU (float32): arc_easy acc 0.48, acc_norm 0.40; piqa acc 0.68,
    acc_norm 0.70. REFERENCE.md, first 200: arc_easy acc ~0.50, piqa acc ~0.64. The bounds
    allow three documents to flip (other BLAS builds round differently).
    """
    out = tmp_path / "smollm2.json"
    result = run_cli("--tasks", "arc_easy,piqa", "--limit", "50", "--output_path", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    arc, piqa = saved["tasks"]["arc_easy"], saved["tasks"]["piqa"]
    assert arc["samples"] == piqa["samples"] == 50
    assert arc["acc"] == pytest.approx(0.48, abs=0.06)
    assert arc["acc_norm"] == pytest.approx(0.40, abs=0.06)
    assert piqa["acc"] == pytest.approx(0.68, abs=0.06)
    assert piqa["acc_norm"] == pytest.approx(0.70, abs=0.06)
    assert saved["model"] == "smollm2-135m-instruct"
    assert saved["capacity"] is None


def test_task_limits_override_the_limit_per_task(model, tokenizer):
    from routertune.evaluation import EvaluationError, evaluate

    out = evaluate(model, tokenizer, tasks=["piqa", "rte"], limit=3, task_limits={"rte": 2})
    assert out["tasks"]["piqa"]["samples"] == 3 and out["tasks"]["rte"]["samples"] == 2
    with pytest.raises(EvaluationError, match="not evaluated"):
        evaluate(model, tokenizer, tasks=["piqa"], limit=2, task_limits={"mmlu": 1})


def test_per_doc_scores_match_the_task_metrics_and_pair_up(model, tokenizer):
    from routertune.evaluation import EvaluationError, paired_difference

    plain = evaluate(model, tokenizer, ["arc_easy", "mmlu"], limit=4, task_limits={"mmlu": 1}, per_doc=True)
    arc, mmlu = plain["tasks"]["arc_easy"], plain["tasks"]["mmlu"]
    assert len(arc["per_doc"]["acc"]) == len(arc["per_doc"]["acc_norm"]) == 4
    assert sum(arc["per_doc"]["acc_norm"]) / 4 == pytest.approx(arc["acc_norm"])
    assert len(mmlu["per_doc"]["acc"]) == 57  # one document per subject, all subjects
    assert sum(mmlu["per_doc"]["acc"]) / 57 == pytest.approx(mmlu["acc"])

    same = paired_difference(plain, plain)
    assert same["difference"] == 0.0 and same["stderr"] == 0.0

    random_routers(model, "attn_sequence")
    set_thresholds(model, 2.0)  # every routed attention skipped: a different model
    skipped = evaluate(model, tokenizer, ["arc_easy", "mmlu"], limit=4, task_limits={"mmlu": 1}, per_doc=True)
    diff = paired_difference(plain, skipped)
    expected = (
        (skipped["tasks"]["arc_easy"]["acc_norm"] - arc["acc_norm"])
        + (skipped["tasks"]["mmlu"]["acc"] - mmlu["acc"])
    ) / 2
    assert diff["difference"] == pytest.approx(expected)
    assert diff["tasks"]["arc_easy"]["metric"] == "acc_norm" and diff["tasks"]["mmlu"]["documents"] == 57
    if any(t["disagreements"] for t in diff["tasks"].values()):
        assert diff["stderr"] > 0

    with pytest.raises(EvaluationError, match="per-document"):
        paired_difference(plain, evaluate(model, tokenizer, ["arc_easy"], limit=4), tasks=["arc_easy"])
    with pytest.raises(EvaluationError, match="different documents"):
        paired_difference(plain, evaluate(model, tokenizer, ["arc_easy"], limit=3, per_doc=True), tasks=["arc_easy"])


def test_request_routes_score_each_document_as_its_own_fixed_route(model, tokenizer):
    """A forced route per request (the per-document oracle's tool): every document scores exactly
    as in a run where all documents take its route, while the batches mix rows of both routes;
    ``choices`` records each document's answer log-likelihoods and its contexts' keys (WinoGrande:
    one context per choice) to trace requests back to documents."""
    from routertune.evaluation.scores import context_key

    random_routers(model, "attn_sequence")
    first, second = sorted(routed_layers(model))
    tasks, kw = ["arc_easy", "winogrande"], {"limit": 6, "batch_size": 4, "choices": True}
    runs = {}
    for skipped in (first, second):
        set_thresholds(model, {i: 2.0 if i == skipped else 0.0 for i in (first, second)})
        runs[skipped] = evaluate(model, tokenizer, tasks, **kw)
    docs = [d for t in tasks for d in runs[first]["tasks"][t]["per_doc_choices"]]
    assert len(docs) == 12 and all(len(d["logliks"]) == len(d["lengths"]) >= 2 for d in docs)
    takes_first = {key for d in docs[::2] for key in d["contexts"]}

    def route(context: str) -> set[int]:
        return {first if context_key(context) in takes_first else second}

    set_thresholds(model, 0.5)  # scored routers, overridden by the forced routes
    mixed = evaluate(model, tokenizer, tasks, request_routes=route, **kw)
    for t in tasks:
        for n, doc in enumerate(mixed["tasks"][t]["per_doc_choices"]):
            run = runs[first if doc["contexts"][0] in takes_first else second]
            own = run["tasks"][t]["per_doc_choices"][n]
            assert (own["doc_id"], own["contexts"]) == (doc["doc_id"], doc["contexts"])
            got, want = torch.tensor(doc["logliks"]), torch.tensor(own["logliks"])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(EvaluationError, match="not routed"):
        evaluate(model, tokenizer, ["arc_easy"], limit=2, request_routes=lambda c: {0})
