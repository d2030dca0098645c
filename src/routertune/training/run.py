"""One Router-Tuning run, start to finish: data, model, routers, freezing, Trainer, final output.

    routertune train --data_type builtin --max_train_samples 1000 --output_dir runs/rt
    accelerate launch --config_file configs/accelerate/deepspeed_zero1.yaml -m routertune.train ...

Order matters: every flag and every data line is checked before a model is loaded, and the
final output is written only after training (and the optional held-out evaluation) succeeded.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from routertune.training.arguments import TrainArgumentError, TrainConfig
from routertune.training.sharding import check_supported, local_parameter_bytes, sharded_engine

RESULTS_NAME = "train_results.json"


def run(config: TrainConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Trains as ``config`` says and returns the results written to ``train_results.json``.

    Args:
        config: parsed and checked arguments (see :func:`routertune.training.arguments.parse_args`).
        callbacks: extra ``transformers.TrainerCallback`` objects.
    """
    from transformers import set_seed

    from routertune.data import PaddingCollator
    from routertune.routing.attach import get_router_config
    from routertune.training.data import describe_source, encode, lm_loss_and_capacity, load_examples
    from routertune.training.trainer import RouterTrainer

    t = config.training
    started = time.time()
    engine = sharded_engine(t)
    try:
        check_supported(engine, t.router_only)
    except ValueError as exc:
        raise TrainArgumentError(str(exc)) from None
    examples = load_examples(config.data)  # bad data fails here, before any weights load
    resume = resume_checkpoint(t)
    set_seed(t.seed)
    model, routed, tokenizer = build_model(config, progress=t.should_log)
    train_ds = encode(examples.train, tokenizer, config.data.max_seq_length, "training", config.data.route_on)
    eval_ds = (
        encode(examples.validation, tokenizer, config.data.max_seq_length, "validation", config.data.route_on)
        if examples.validation
        else None
    )
    collator = PaddingCollator.from_tokenizer(tokenizer)

    trainable, total = _count_parameters(model)
    _say(
        t,
        f"routertune train: {describe_source(examples.source)}: {len(train_ds)} examples "
        f"({train_ds.num_tokens()} tokens, {train_ds.num_label_tokens()} with loss); "
        f"trainable parameters {trainable:,} of {total:,}; loss {config.loss.loss}; "
        f"router config {get_router_config(routed).to_dict()}",
    )
    trainer = RouterTrainer(
        model=model,
        args=t,
        train_dataset=train_ds,
        data_collator=collator,
        routed_model=routed,
        router_only=t.router_only,
        loss=config.loss.loss,
        distill_weight=config.loss.distill_weight,
        distill_temperature=config.loss.distill_temperature,
        distill_tokens=config.loss.distill_tokens,
        lora=config.lora.use_lora,
        tokenizer=tokenizer,
        callbacks=callbacks,
    )
    train_output = trainer.train(resume_from_checkpoint=resume)

    results: dict[str, Any] = {
        "model": str(config.model.model_name_or_path),
        "data": describe_source(examples.source),
        "train_examples": len(train_ds),
        "train_tokens": train_ds.num_tokens(),
        "router_config": get_router_config(routed).to_dict(),
        "router_only": t.router_only,
        "use_lora": config.lora.use_lora,
        "loss": config.loss.loss,
        "distill_weight": config.loss.distill_weight if config.loss.loss != "lm" else None,
        "learning_rate": t.learning_rate,
        "optim": str(getattr(t.optim, "value", t.optim)),
        "global_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * t.world_size,
        "steps": train_output.global_step,
        "train_metrics": train_output.metrics,
        "last_logged": trainer.last_logged,
        "resumed_from": resume,
        "engine": engine,
        "processes": t.world_size,
        "peak_memory_bytes_per_process": _gathered(trainer, _peak_memory(trainer)),
        "parameter_bytes_per_process": _gathered(trainer, local_parameter_bytes(trainer.model)),
    }
    # On sharded weights every forward gathers them from all processes: all of them evaluate.
    if eval_ds is not None and (t.should_save or engine is not None):
        device = t.device
        batch = t.per_device_eval_batch_size
        results["validation"] = {
            "examples": len(eval_ds),
            "dense": lm_loss_and_capacity(routed, eval_ds, collator, batch, device, routed=False),
            "routed": lm_loss_and_capacity(routed, eval_ds, collator, batch, device, routed=True),
        }
    results["wall_time_s"] = round(time.time() - started, 1)
    text = json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"
    trainer.save_final(t.output_dir, extra_files={RESULTS_NAME: text})
    _say(t, summary(results, t.output_dir))
    return results


def build_model(config: TrainConfig, progress: bool = True) -> tuple[Any, Any, Any]:
    """Loads the model, attaches (or loads) routers, freezes by structure, adds LoRA if asked.

    Returns:
        ``(model, routed, tokenizer)``: ``model`` is what the Trainer trains (the PEFT wrapper
        with LoRA, else ``routed``); ``routed`` is the transformers model carrying the routers.
    """
    from routertune import RouterConfig, attach_routers, load_routers
    from routertune.loading import load_model_and_tokenizer
    from routertune.routing.attach import get_router_config, router_parameters
    from routertune.routing.router_files import ADAPTER_CONFIG

    m = config.model
    # On the CPU first: the Trainer (or accelerate/DeepSpeed) places it on each process's device.
    model, tokenizer = load_model_and_tokenizer(
        m.model_name_or_path, dtype=m.torch_dtype, device="cpu", progress=progress
    )
    if m.tokenizer_name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # the collator pads labels on the right
    if m.attn_implementation:
        model.set_attn_implementation(m.attn_implementation)
    model.config.use_cache = False

    if m.router_dir:
        if (Path(m.router_dir) / ADAPTER_CONFIG).exists():
            # Its routers were trained on top of that adapter, and the output would not carry it.
            raise TrainArgumentError(
                f"--router_dir {m.router_dir} holds a LoRA adapter trained with its routers; starting "
                "from LoRA-trained routers is not supported (start from a router-only folder)"
            )
        load_routers(model, m.router_dir)
        saved = get_router_config(model)
        # Training-time knobs come from the command line; the structure comes from the folder.
        checked = RouterConfig.from_dict(
            {
                **saved.to_dict(),
                "target_capacity": config.router.target_capacity,
                "gradient_scale": config.router.gradient_scale,
            }
        )
        saved.target_capacity, saved.gradient_scale = checked.target_capacity, checked.gradient_scale
    else:
        attach_routers(model, config.router_config)

    # Freeze by structure: only the Router modules' weights (the seed matched "router" in names).
    for p in model.parameters():
        p.requires_grad_(not config.training.router_only)
    for p in router_parameters(model):
        p.requires_grad_(True)

    trained = model
    if config.lora.use_lora:
        trained = add_lora(model, config)
    return trained, model, tokenizer


def add_lora(model: Any, config: TrainConfig) -> Any:
    """Wraps ``model`` with a LoRA adapter (routers excluded from LoRA, kept trainable)."""
    from peft import LoraConfig, get_peft_model

    from routertune.routing.attach import router_parameters

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules(),
        exclude_modules=r".*\.router\.proj",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise TrainArgumentError(f"--lora_target_modules {lora.lora_target_modules!r}: {exc}") from None
    for p in router_parameters(model):  # get_peft_model froze everything that is not LoRA
        p.requires_grad_(True)
    return peft_model


def resume_checkpoint(t: Any) -> str | None:
    """The checkpoint to resume from, following the seed: an explicit ``--resume_from_checkpoint``
    (a folder, or ``true``/``last`` for the newest in output_dir), else the newest checkpoint in
    output_dir unless ``--overwrite_output_dir``.

    Raises:
        TrainArgumentError: the named checkpoint does not exist, or output_dir already holds a
            finished result and neither flag says what to do.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from routertune.routing.router_files import CONFIG_NAME

    out = Path(t.output_dir)
    asked = t.resume_from_checkpoint
    if asked:
        if str(asked).lower() in ("true", "last"):
            last = get_last_checkpoint(str(out)) if out.is_dir() else None
            if last is None:
                raise TrainArgumentError(f"--resume_from_checkpoint {asked}: no checkpoint-* folder in {out}")
            return last
        if not Path(asked).is_dir():
            raise TrainArgumentError(f"--resume_from_checkpoint {asked}: no such folder")
        return str(asked)
    if not out.is_dir():
        return None
    if t.overwrite_output_dir:
        if t.should_save:
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old, ignore_errors=True)
        return None
    last = get_last_checkpoint(str(out))
    if last is not None:
        _say(t, f"resuming from {last} (pass --overwrite_output_dir to start afresh)")
        return last
    if (out / CONFIG_NAME).exists():
        raise TrainArgumentError(
            f"{out} already holds trained routers; pass --overwrite_output_dir to replace them or choose another --output_dir"
        )
    return None


def summary(results: dict[str, Any], output_dir: str) -> str:
    lines = [f"saved routers to {output_dir} ({results['steps']} steps, {results['wall_time_s']} s)"]
    logged = results.get("last_logged") or {}
    per_layer = {k.split("_")[-1]: v for k, v in logged.items() if k.startswith("capacity/layer_")}
    if per_layer:
        lines.append(
            f"capacity in the last logging window {logged['capacity']:.3f}; per layer "
            + " ".join(f"{k}:{v:.2f}" for k, v in per_layer.items())
        )
    val = results.get("validation")
    if val:
        lines.append(
            f"held-out LM loss ({val['examples']} examples, {val['dense']['tokens']} tokens): dense "
            f"{val['dense']['loss']:.4f}, routed {val['routed']['loss']:.4f} at capacity "
            f"{val['routed']['capacity']['overall']:.3f}"
        )
    return "\n".join(lines)


def _peak_memory(trainer: Any) -> int:
    """This process's peak memory in bytes: the allocator's peak on a GPU, the resident set's
    high-water mark on the CPU."""
    import resource

    import torch

    device = trainer.accelerator.device
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _gathered(trainer: Any, value: int) -> list[int]:
    """``value`` of every process, in rank order (call on every process)."""
    import torch

    if trainer.accelerator.num_processes == 1:
        return [int(value)]
    local = torch.tensor([value], dtype=torch.long, device=trainer.accelerator.device)
    return [int(v) for v in trainer.accelerator.gather(local).cpu().tolist()]


def _count_parameters(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _say(t, message: str) -> None:
    if t.should_log:
        print(message, file=sys.stderr, flush=True)
