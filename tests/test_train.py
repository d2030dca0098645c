"""Router-Tuning training on a tiny random Llama: freezing, optimizer contents, saving, resuming,
LoRA, full fine-tuning, the regulariser, distillation, non-finite losses and bad inputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "train"))

from train_fixtures import save_tiny_model, write_chat_jsonl  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from routertune import load_routers  # noqa: E402
from routertune.data import DataFormatError  # noqa: E402
from routertune.routing.attach import (  # noqa: E402
    get_router_config,
    plain_parameter_names,
    routed_layers,
    router_parameters,
)
from routertune.train import main  # noqa: E402
from routertune.training.arguments import TrainArgumentError, parse_args  # noqa: E402
from routertune.training.run import run  # noqa: E402
from routertune.training.trainer import NonFiniteLossError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model folder and a 40-example chat jsonl."""
    root = tmp_path_factory.mktemp("tiny_train")
    model = save_tiny_model(root / "model")
    data = write_chat_jsonl(root / "data.jsonl", 40)
    return model, data


def args(tiny, out: Path, *extra: str) -> list[str]:
    model, data = tiny
    return [
        "--model_name_or_path", str(model),
        "--train_file", str(data),
        "--output_dir", str(out),
        "--router_layers", "3",
        "--max_steps", "4",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--save_steps", "2",
        "--use_cpu",
        "--disable_tqdm", "True",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


class Capture(TrainerCallback):
    """Keeps the trainer's model, optimizer and logs for inspection after training."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.model = None
        self.optimizer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer


def train(tiny, out: Path, *extra: str, callbacks=None) -> dict:
    return run(parse_args(args(tiny, out, *extra)), callbacks=callbacks)


def saved_router_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "routers.safetensors"))


# ---- router-only ------------------------------------------------------------------------------
def test_router_only_optimizes_routers_and_nothing_else(tiny, tmp_path):
    cap = Capture()
    train(tiny, tmp_path / "out", "--optim", "adamw_torch", callbacks=[cap])  # AdamW: it keeps state
    model = cap.model
    routers = router_parameters(model)
    assert len(routers) == 3
    in_optimizer = [p for g in cap.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in routers}
    assert all(len(g["params"]) > 0 for g in cap.optimizer.param_groups)
    # optimizer state exists only for routers; frozen weights never got a gradient
    assert set(map(id, cap.optimizer.state)) == {id(p) for p in routers}
    router_ids = {id(p) for p in routers}
    frozen = [p for p in model.parameters() if id(p) not in router_ids]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    weights = saved_router_weights(tmp_path / "out")
    assert sorted(weights) == ["layers.2.weight", "layers.3.weight", "layers.4.weight"]
    assert all(w.abs().sum() > 0 for w in weights.values())


def test_output_holds_routers_only_and_they_load(tiny, tmp_path):
    out = tmp_path / "out"
    results = train(tiny, out)
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert names == {"router_config.json", "routers.safetensors", "train_results.json"}
    assert not list(out.glob(".routertune-final-*"))
    assert json.loads((out / "train_results.json").read_text())["steps"] == results["steps"] == 4
    from routertune.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny[0], device="cpu", progress=False)
    load_routers(model, out)
    assert get_router_config(model).granularity == "attn_sequence"
    loaded = {i: p.detach().clone() for i, p in enumerate(router_parameters(model))}
    assert all(w.abs().sum() > 0 for w in loaded.values())


def test_logs_lm_loss_regulariser_and_capacity_per_layer(tiny, tmp_path):
    cap = Capture()
    train(tiny, tmp_path / "out", "--target_capacity", "0.2", "--gradient_scale", "0.5", callbacks=[cap])
    step_logs = [log for log in cap.logs if "loss" in log]
    assert len(step_logs) == 4
    first = step_logs[0]
    for key in (
        "lm_loss",
        "capacity_loss",
        "capacity",
        "capacity/layer_2",
        "capacity/layer_3",
        "capacity/layer_4",
    ):
        assert key in first, key
    # all units start on (capacity 1) so the regulariser is 0.5 * 3 layers * (1 - 0.2)
    assert first["capacity"] == pytest.approx(1.0)
    assert first["capacity_loss"] == pytest.approx(0.5 * 3 * 0.8, rel=1e-5)
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["capacity_loss"], rel=1e-4)
    # the regulariser pushes capacity down
    assert step_logs[-1]["capacity"] < 1.0


def test_prompt_routing_masks_cover_the_tokens_before_the_first_answer_token():
    from routertune.data import PaddingCollator
    from routertune.data.encode import IGNORE_INDEX, prompt_routing_mask

    labels = [IGNORE_INDEX] * 3 + [7, 8] + [IGNORE_INDEX] + [9]
    assert prompt_routing_mask(labels) == [1, 1, 1, 0, 0, 0, 0]
    assert prompt_routing_mask([IGNORE_INDEX] * 2) == [1, 1]
    batch = PaddingCollator(pad_token_id=0)(
        [
            {"input_ids": [5] * 7, "labels": labels, "routing_mask": prompt_routing_mask(labels)},
            {"input_ids": [5] * 2, "labels": [IGNORE_INDEX, 4], "routing_mask": [1, 0]},
        ]
    )
    assert batch["routing_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]


def test_route_on_prompt_trains_routers_that_decide_on_the_prompt(tiny, tmp_path):
    """With --route_on prompt the routers see only the prompt, so they train differently from
    routing on the whole conversation, and the held-out evaluation routes the same way."""
    runs = {}
    for route_on in ("all", "prompt"):
        out = tmp_path / route_on
        results = train(tiny, out, "--route_on", route_on, "--validation_samples", "8")
        runs[route_on] = (saved_router_weights(out), results)
    assert any(
        not torch.equal(runs["all"][0][name], runs["prompt"][0][name]) for name in runs["all"][0]
    ), "routing on the prompt alone should change the router updates"
    assert math.isfinite(runs["prompt"][1]["validation"]["routed"]["loss"])


def test_gradient_checkpointing_gives_routers_the_same_updates(tiny, tmp_path):
    # frozen embeddings + checkpointed layers: the LM gradient must still reach the routers
    cap = Capture()
    train(tiny, tmp_path / "plain", "--max_steps", "2")
    train(tiny, tmp_path / "ckpt", "--max_steps", "2", "--gradient_checkpointing", callbacks=[cap])
    assert cap.model.is_activation_checkpointing
    plain, ckpt = saved_router_weights(tmp_path / "plain"), saved_router_weights(tmp_path / "ckpt")
    for key in plain:
        assert plain[key].abs().sum() > 0
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-7)


def test_router_dir_starts_from_saved_routers(tiny, tmp_path):
    train(tiny, tmp_path / "first")
    first = saved_router_weights(tmp_path / "first")
    # learning rate 0: the routers must come out exactly as they went in
    results = train(tiny, tmp_path / "again", "--router_dir", str(tmp_path / "first"), "--learning_rate", "0")
    assert results["router_config"]["layers"] == [2, 3, 4]
    again = saved_router_weights(tmp_path / "again")
    for key in first:
        torch.testing.assert_close(again[key], first[key])
    # routers trained on top of a LoRA adapter are no start for new training (the output would lack it)
    (tmp_path / "first" / "adapter_config.json").write_text("{}")
    with pytest.raises(TrainArgumentError, match="holds a LoRA adapter trained with its routers"):
        train(tiny, tmp_path / "third", "--router_dir", str(tmp_path / "first"))
    assert not (tmp_path / "third" / "routers.safetensors").exists()


def test_bf16_mixed_precision_trains_float32_routers(tiny, tmp_path):
    cap = Capture()
    train(tiny, tmp_path / "out", "--bf16", "--max_steps", "2", callbacks=[cap])
    assert all(p.dtype == torch.float32 for p in router_parameters(cap.model))
    losses = [log["lm_loss"] for log in cap.logs if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    weights = saved_router_weights(tmp_path / "out")
    assert all(torch.isfinite(w).all() and w.abs().sum() > 0 for w in weights.values())


# ---- resume, failures -------------------------------------------------------------------------
class CrashAt(TrainerCallback):
    """Simulates a crash (a killed job) when optimizer step ``step`` begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny, tmp_path):
    train(tiny, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny, tmp_path / "crashed", callbacks=[CrashAt(2)])
    assert not (tmp_path / "crashed" / "router_config.json").exists()
    part = saved_router_weights(tmp_path / "crashed" / "checkpoint-2")
    train(tiny, tmp_path / "crashed", "--resume_from_checkpoint", "last")
    full, resumed = saved_router_weights(tmp_path / "full"), saved_router_weights(tmp_path / "crashed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-7)
        assert not torch.equal(part[key], full[key])


def test_output_dir_with_checkpoint_resumes_and_finished_result_is_protected(tiny, tmp_path):
    out = tmp_path / "out"
    train(tiny, out, "--max_steps", "2")
    results = train(tiny, out)  # seed behaviour: picks up the newest checkpoint
    assert results["resumed_from"].endswith("checkpoint-2")
    for ckpt in out.glob("checkpoint-*"):
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    with pytest.raises(TrainArgumentError, match="already holds trained routers"):
        train(tiny, out)
    assert train(tiny, out, "--overwrite_output_dir")["resumed_from"] is None


class PoisonAt(TrainerCallback):
    """Makes every later forward return NaN by writing NaN into a frozen weight after ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*checkpoint-2"):
        train(tiny, out, callbacks=[PoisonAt(2)])
    assert (out / "checkpoint-2" / "routers.safetensors").is_file()
    assert not (out / "router_config.json").exists()  # no final output from a failed run
    weights = saved_router_weights(out / "checkpoint-2")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_failure_while_saving_leaves_no_final_output(tiny, tmp_path, monkeypatch):
    import routertune.training.trainer as trainer_module

    real = trainer_module.write_artifacts

    def fail_after_routers(trainer, folder, trained, checkpoint):
        real(trainer, folder, trained, checkpoint=checkpoint)
        if not checkpoint:
            raise OSError("disk full")

    monkeypatch.setattr(trainer_module, "write_artifacts", fail_after_routers)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        train(tiny, out)
    assert not (out / "routers.safetensors").exists() and not (out / "router_config.json").exists()
    assert not list(out.glob(".routertune-final-*"))


# ---- LoRA and full fine-tuning ----------------------------------------------------------------
def test_lora_and_routers_are_trained_and_saved_together(tiny, tmp_path):
    out = tmp_path / "out"
    cap = Capture()
    train(tiny, out, "--use_lora", "--lora_r", "2", "--lora_target_modules", "all-linear", callbacks=[cap])
    in_optimizer = {id(p) for g in cap.optimizer.param_groups for p in g["params"]}
    routers = {id(p) for p in router_parameters(cap.model.base_model.model)}
    lora = {id(p) for n, p in cap.model.named_parameters() if "lora_" in n}
    assert routers and lora and in_optimizer == routers | lora
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and not any("router" in k for k in adapter)  # routers are never LoRA-wrapped
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0
    assert all(w.abs().sum() > 0 for w in saved_router_weights(out).values())
    # every trained LoRA tensor is in the file, routed sub-layers' too, under the plain names
    routed = cap.model.base_model.model
    lora_names = [n for n, _ in cap.model.named_parameters() if "lora_" in n]
    trained_names = plain_parameter_names(routed, {n.replace(".default", ""): 0 for n in lora_names})
    assert set(adapter) == set(trained_names)
    assert any(".self_attn.q_proj." in k for k in adapter if f".layers.{max(routed_layers(routed))}." in k)

    # base + routers (+ the adapter, merged on load) reproduce the trained model
    from routertune.loading import load_model_and_tokenizer

    trained = cap.model.eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    base, _ = load_model_and_tokenizer(tiny[0], device="cpu", progress=False)
    load_routers(base, out)
    torch.testing.assert_close(base(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_lora_resume_from_checkpoint(tiny, tmp_path):
    lora = ("--use_lora", "--lora_r", "2")
    train(tiny, tmp_path / "full", *lora)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny, tmp_path / "crashed", *lora, callbacks=[CrashAt(2)])
    train(tiny, tmp_path / "crashed", *lora)  # the newest checkpoint is picked up, as in the seed
    for name in ("adapter_model.safetensors", "routers.safetensors"):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "crashed" / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_full_finetuning_trains_everything_and_saves_loadable_weights(tiny, tmp_path):
    out = tmp_path / "out"
    cap = Capture()
    train(tiny, out, "--router_only", "False", "--learning_rate", "1e-3", callbacks=[cap])
    in_optimizer = {id(p) for g in cap.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in cap.model.parameters()}
    weights = load_file(str(out / "model.safetensors"))
    assert not any("router" in k for k in weights)
    from routertune.loading import load_model_and_tokenizer

    reloaded, _ = load_model_and_tokenizer(out, device="cpu", progress=False)
    load_routers(reloaded, out)
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, cap.model.eval()(input_ids=ids).logits)


# ---- distillation -----------------------------------------------------------------------------
def test_distillation_loss_is_finite_and_decreases(tiny, tmp_path):
    cap = Capture()
    # threshold 0.6: every routed attention starts skipped, so the routed model differs from the
    # dense teacher; the KL falls as the routers learn to keep what matters.
    train(tiny, tmp_path / "out", "--loss", "distill", "--threshold", "0.6", "--max_steps", "8",
          "--optim", "adamw_torch", "--learning_rate", "5e-2", "--lr_scheduler_type", "constant", "--gradient_scale", "0",
          callbacks=[cap])  # fmt: skip
    kl = [log["distill_loss"] for log in cap.logs if "loss" in log]
    assert len(kl) == 8 and all(torch.isfinite(torch.tensor(kl)))
    assert kl[0] > 0
    assert kl[-1] < 0.5 * kl[0]
    assert all("lm_loss" not in log for log in cap.logs)


def test_distillation_kl_matches_definition():
    from routertune.training.losses import distill_positions, distillation_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    pos = distill_positions(mask, labels, "labels", (2, 5))
    assert pos.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    p_t = teacher[pos].softmax(-1)
    expected = (p_t * (p_t.log() - student[pos].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_kl(student, teacher, pos), expected)
    assert float(distillation_kl(teacher, teacher, pos)) == pytest.approx(0.0, abs=1e-6)
    all_pos = distill_positions(mask, labels, "all", (2, 5))
    assert all_pos.tolist() == [[True, True, True, True, False], [True, True, False, False, False]]


# ---- arguments and bad inputs -----------------------------------------------------------------
def test_seed_aliases_and_defaults():
    config = parse_args(["--mod_n", "8", "--data_type", "builtin"])
    assert config.router.router_layers == 8
    assert parse_args(["--mindskip_n", "5"]).router.router_layers == 5
    assert config.training.router_only is True
    assert config.training.num_train_epochs == 1.0
    assert (config.router.target_capacity, config.router.gradient_scale) == (0.0, 0.02)
    assert parse_args(["--gradient_scale", "0"]).router_config.gradient_scale == 0.0
    assert parse_args(["--router_only", "False"]).training.router_only is False
    assert parse_args(["--warmup_ratio", "0.1"]).training.warmup_steps == 0.1


def test_optimizer_defaults_depend_on_what_is_trained():
    def optim(argv):
        t = parse_args(argv).training
        return str(t.optim.value), t.learning_rate

    assert optim([]) == ("sgd", 0.1)
    assert optim(["--use_lora"]) == ("adamw_torch", 2e-4)
    assert optim(["--router_only", "False"]) == ("adamw_torch", 2e-5)
    assert optim(["--learning_rate", "0.5"]) == ("sgd", 0.5)
    assert optim(["--optim", "adamw_torch_fused", "--router_only", "False"]) == ("adamw_torch_fused", 2e-5)
    assert optim(["--learning-rate=0.3", "--use_lora"]) == ("adamw_torch", 0.3)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n', r"line 2: malformed json"),
        ('{"messages": []}\n', r"line 1: field 'messages' is empty"),
        (
            '{"messages": [{"role": "robot", "content": "hi"}]}\n',
            r"line 1: messages\[0\] has unknown role 'robot'",
        ),
    ],
)
def test_bad_data_fails_before_the_model_is_loaded(tmp_path, content, match, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    # the model path does not exist: the data error must come first
    argv = [
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--train_file",
        str(data),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(DataFormatError, match=match):
        run(parse_args(argv))
    assert main(argv) == 1
    assert str(data) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--train_file", "/nonexistent/x.jsonl"], "--train_file /nonexistent/x.jsonl: no such file"),
        (
            ["--data_type", "alpaca", "--data_root", "/nonexistent"],
            r"reformatted/alpaca/data.jsonl does not exist",
        ),
        (["--data_type", "mixed", "--data_root", "/nonexistent"], r"mixed/data.jsonl does not exist"),
        (["--train_file", "a", "--data_type", "builtin"], "either --train_file or --data_type"),
        (["--target_capacity", "1.5"], r"target_capacity must be in \[0, 1\]"),
        (["--use_lora", "--router_only", "False"], "cannot be combined"),
        (["--distill_weight", "-1"], "--distill_weight must be >= 0"),
        (["--route_on", "answer"], "--route_on must be 'all' or 'prompt'"),
    ],
)
def test_bad_flags_are_reported(argv, match):
    with pytest.raises(TrainArgumentError, match=match):
        parse_args(argv)


def test_cli_verb_forwards_arguments(tmp_path):
    from typer.testing import CliRunner

    from routertune.cli import app

    result = CliRunner().invoke(app, ["train", "--train_file", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1
    assert "missing.jsonl: no such file" in result.output
    help_text = CliRunner().invoke(app, ["train", "--help"]).output
    assert "--router_only" in help_text and "--granularity" in help_text and "--learning_rate" in help_text


# ---- the real default model -------------------------------------------------------------------
@pytest.mark.integration
def test_real_model_router_tuning_few_steps(tmp_path):
    """SmolLM2-135M-Instruct, 8 builtin examples, 2 steps: routers move, capacity is logged."""
    out = tmp_path / "out"
    cap = Capture()
    argv = [
        "--data_type", "builtin",
        "--max_train_samples", "8",
        "--max_seq_length", "256",
        "--per_device_train_batch_size", "2",
        "--max_steps", "2",
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--output_dir", str(out),
        "--use_cpu",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    results = run(parse_args(argv), callbacks=[cap])
    # a few builtin examples lose every label to truncation at 256 tokens
    assert results["steps"] == 2 and 4 <= results["train_examples"] <= 8
    assert results["router_config"]["router_layers"] == 16
    logs = [log for log in cap.logs if "loss" in log]
    assert all(0 < log["lm_loss"] < 10 for log in logs)
    per_layer = {k for k in logs[0] if k.startswith("capacity/layer_")}
    assert per_layer == {f"capacity/layer_{i}" for i in range(13, 29)}
    weights = saved_router_weights(out)
    assert len(weights) == 16 and all(w.abs().sum() > 0 for w in weights.values())
