"""RouterTrainer: a ``transformers.Trainer`` that trains routers (and optionally LoRA or everything).

What it adds to the stock Trainer:

- the loss: the model's LM loss and/or KL towards the dense model's own predictions, plus the
  capacity regulariser (``gradient_scale * relu(capacity - target_capacity)``);
- logging of each loss term and of the share of routed units kept, per layer, averaged over
  the logging window (and over processes), shown compactly under the progress bar;
- a non-finite loss stops training with an error naming the step, before that step's update
  (the checkpoints already written are left untouched);
- checkpoints and the final output hold the routers (``save_routers``), plus the LoRA adapter
  when one is trained, plus the full weights only for full fine-tuning.

The optimizer sees exactly the parameters that require grad, so in router-only training no
gradient and no optimizer state is ever created for a frozen weight.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from routertune.routing.attach import (
    all_units_kept,
    capacity_regularizer,
    plain_parameter_names,
    routed_layers,
    router_parameters,
)
from routertune.routing.router_files import ADAPTER_WEIGHTS, CONFIG_NAME, load_routers, save_routers
from routertune.training.losses import distill_positions, distillation_kl
from routertune.training.sharding import full_copies

TRAINING_ARGS_NAME = "training_args.bin"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stops before applying that step."""


class _WindowMetrics:
    """Loss terms and per-layer capacity summed on the device over one logging window.

    Kept as tensors so that recording a micro-batch never waits for the device; read (one
    sync, one all-reduce) only when the Trainer logs.
    """

    NAMES = ("lm_loss", "distill_loss", "capacity_loss")

    def __init__(self, layer_ids: list[int]) -> None:
        self.layer_ids = layer_ids
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None  # (3 + L,): the three terms, then capacity per layer
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor | None], capacity: torch.Tensor | None) -> None:
        device = capacity.device if capacity is not None else None
        values = []
        for name in self.NAMES:
            value = terms.get(name)
            if value is None:
                values.append(torch.tensor(float("nan"), device=device))
            else:
                device = value.device if device is None else device
                values.append(value.detach().float().reshape(()).to(device))
        if capacity is None:
            capacity = torch.full((len(self.layer_ids),), float("nan"), device=device)
        row = torch.cat([torch.stack(values), capacity.detach().float().to(device)])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def read(self, reduce_fn) -> dict[str, float]:
        """Window means as floats; ``reduce_fn`` averages a tensor over processes."""
        if self.sums is None or self.count == 0:
            return {}
        means = reduce_fn(self.sums / self.count).tolist()
        out: dict[str, float] = {}
        for name, value in zip(self.NAMES, means[: len(self.NAMES)], strict=True):
            if not math.isnan(value):
                out[name] = value
        per_layer = means[len(self.NAMES) :]
        if per_layer and not any(math.isnan(v) for v in per_layer):
            out["capacity"] = sum(per_layer) / len(per_layer)
            for idx, value in zip(self.layer_ids, per_layer, strict=True):
                out[f"capacity/layer_{idx}"] = value
        self.reset()
        return out


class RouterTrainer(Trainer):
    """Trainer for Router-Tuning.

    Args:
        routed_model: the transformers ``*ForCausalLM`` that carries the routers (the model
            itself, or the one inside the PEFT wrapper passed as ``model``).
        router_only: routers (+ LoRA) only; False saves full weights too.
        loss: ``lm``, ``distill`` or ``lm+distill``.
        distill_weight, distill_temperature, distill_tokens: see ``routertune.training.losses``.
        lora: whether ``model`` is a PEFT model whose adapter is trained and saved.
        tokenizer: saved beside full weights (full fine-tuning), so the folder loads as a model.
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        routed_model: nn.Module,
        router_only: bool = True,
        loss: str = "lm",
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        distill_tokens: str = "labels",
        lora: bool = False,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.routed_model = routed_model
        self.router_only = router_only
        self.loss_mode = loss
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.distill_tokens = distill_tokens
        self.lora = lora
        self.tokenizer = tokenizer
        # Our loss is a per-micro-batch mean (LM + distill + regulariser): let the Trainer divide
        # it by the accumulation steps, and never hand the model num_items_in_batch.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._window = _WindowMetrics(sorted(routed_layers(routed_model)))
        self.last_logged: dict[str, float] = {}
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(RouterProgressCallback())

    # ---- optimizer: exactly the trainable parameters ------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The stock optimizer over parameters that require grad, without empty groups.

        Router weights get no weight decay unless ``--weight_decay`` says so (they are found by
        structure, so they are named like any Linear weight and would otherwise decay).
        """
        optimizer = super().create_optimizer(model)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    # ---- loss ---------------------------------------------------------------------------------
    @property
    def uses_lm(self) -> bool:
        return self.loss_mode in ("lm", "lm+distill")

    @property
    def uses_distill(self) -> bool:
        return self.loss_mode in ("distill", "lm+distill")

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        labels = inputs.get("labels")
        model_inputs = dict(inputs) if self.uses_lm else {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        if not model.training:
            # evaluate(): the stock LM loss of the routed model, nothing else
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        terms: dict[str, torch.Tensor | None] = {}
        total = None
        if self.uses_lm:
            if outputs.loss is None:
                raise ValueError("the LM loss needs 'labels' in the batch")
            terms["lm_loss"] = outputs.loss
            total = outputs.loss
        capacity = self._batch_capacity()
        reg = capacity_regularizer(self.routed_model)
        if reg is not None:
            terms["capacity_loss"] = reg
            total = reg if total is None else total + reg
        if self.uses_distill:
            kl = self._distillation(model, inputs, outputs.logits, labels)
            terms["distill_loss"] = kl
            weighted = self.distill_weight * kl
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"loss {self.loss_mode!r} produced no loss term")
        self._check_finite(total, terms)
        self._window.add(terms, capacity)
        return (total, outputs) if return_outputs else total

    def _batch_capacity(self) -> torch.Tensor | None:
        """``(L,)`` share of units kept by each routed layer in the latest training forward."""
        caps = [layer.routing.last_capacity for layer in routed_layers(self.routed_model).values()]
        if not caps or any(c is None for c in caps):
            return None
        return torch.stack([c.detach().float() for c in caps])

    def _distillation(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], student_logits: torch.Tensor, labels
    ) -> torch.Tensor:
        """KL(dense || routed): the teacher is the same network with every routed unit on."""
        attention_mask = inputs.get("attention_mask")
        positions = distill_positions(
            attention_mask, labels, self.distill_tokens, tuple(inputs["input_ids"].shape)
        )
        teacher_model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), all_units_kept(self.routed_model):
            teacher_logits = teacher_model(
                input_ids=inputs["input_ids"], attention_mask=attention_mask
            ).logits
        return distillation_kl(student_logits, teacher_logits, positions, self.distill_temperature)

    def _check_finite(self, total: torch.Tensor, terms: dict[str, torch.Tensor | None]) -> None:
        if bool(torch.isfinite(total.detach())):
            return
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if v is not None)
        step = self.state.global_step + 1
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training loss is {float(total.detach())} at step {step} ({parts}); training stopped before "
            f"this step's update and nothing was saved for it; {kept}. Try a lower --learning_rate, "
            "--max_grad_norm, or float32 instead of --bf16/--fp16."
        )

    # ---- logging ------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (not the final summary): add the window's terms
            logs.update(self._window.read(self._mean_over_processes))
            self.last_logged = dict(logs)
        super().log(logs, start_time)

    def _mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes > 1:
            return self.accelerator.reduce(tensor, reduction="mean")
        return tensor

    # ---- saving and resuming ------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoint content: routers, the LoRA adapter, and (full fine-tuning) all weights.

        Called on every process (the Trainer does): on sharded weights, gathering them is a
        collective; the main process writes.
        """
        trained = self.trained_weights()
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        write_artifacts(self, Path(output_dir), trained, checkpoint=True)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.save_model(output_dir)

    def trained_weights(self) -> TrainedWeights:
        """Full copies of the router weights and the LoRA adapter, on every process (a
        collective when the weights are sharded: call it on all of them)."""
        layers = routed_layers(self.routed_model)
        routers = [layer.router.proj.weight for layer in layers.values()]
        adapter = [(n, p) for n, p in self.model.named_parameters() if "lora_" in n] if self.lora else []
        copies = full_copies(routers + [p for _, p in adapter])
        return TrainedWeights(
            routers=dict(zip(layers, copies[: len(routers)], strict=True)),
            adapter={n: c for (n, _), c in zip(adapter, copies[len(routers) :], strict=True)} if self.lora else None,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self.router_only:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # full weights, routers included
        if self.lora:
            load_lora_adapter(self.model, Path(resume_from_checkpoint))
        load_routers(self.routed_model, resume_from_checkpoint, merge_adapter=False)  # adapter: above

    def save_final(self, output_dir: str | Path, extra_files: dict[str, str] | None = None) -> None:
        """Writes the trained result into ``output_dir`` without ever leaving it half-written.

        Every file is first written into a hidden staging folder inside ``output_dir``, then
        moved into place with atomic renames; ``router_config.json`` goes last, so a folder
        whose config is present holds weights from the same run.
        """
        self.accelerator.wait_for_everyone()
        trained = self.trained_weights()
        if self.args.should_save:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".routertune-final-", dir=output_dir))
            try:
                write_artifacts(self, staging, trained, checkpoint=False)
                for name, text in (extra_files or {}).items():
                    (staging / name).write_text(text)
                names = sorted(p.name for p in staging.iterdir())
                names.sort(key=lambda n: n == CONFIG_NAME)
                for name in names:
                    target = output_dir / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(staging / name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()


@dataclass
class TrainedWeights:
    """Full copies of what training changed: layer -> router weight, and the LoRA adapter's
    parameters by name (None without LoRA)."""

    routers: dict[int, torch.Tensor]
    adapter: dict[str, torch.Tensor] | None


def write_artifacts(trainer: RouterTrainer, folder: Path, trained: TrainedWeights, checkpoint: bool) -> None:
    """Routers always; the LoRA adapter if trained; all weights for full fine-tuning.

    Full fine-tuning checkpoints keep the router weights inside ``model.safetensors`` too (so the
    stock resume loads everything at once); the final output leaves them out, so the folder loads
    as a plain model and the routers load with ``load_routers``.
    """
    routed = trainer.routed_model
    save_routers(routed, folder, weights=trained.routers)
    if trainer.lora:
        # PEFT writes the tensors it finds under the model's own (routed) module names: given the
        # plain names it silently dropped every routed sub-layer's LoRA. So it saves the routed
        # names, and the final adapter is then renamed to the plain model's module names, so that
        # it loads without routers; checkpoints keep the routed names (resume loads them into the
        # routed model).
        trainer.model.save_pretrained(str(folder), state_dict=trained.adapter)
        if not checkpoint:
            rename_to_plain_names(routed, folder / ADAPTER_WEIGHTS)
    if not trainer.router_only:
        state = routed.state_dict()
        if not checkpoint:
            router_ids = {id(p) for p in router_parameters(routed)}
            names = {n for n, p in routed.named_parameters() if id(p) in router_ids}
            state = plain_parameter_names(routed, {k: v for k, v in state.items() if k not in names})
        routed.save_pretrained(str(folder), state_dict=state)
        if trainer.tokenizer is not None:
            trainer.tokenizer.save_pretrained(str(folder))


def rename_to_plain_names(routed: nn.Module, weights: Path) -> None:
    """Rewrites a saved adapter's tensor names to the plain model's (atomically)."""
    from safetensors.torch import load_file, save_file

    from routertune.io_utils import atomic_path

    tensors = plain_parameter_names(routed, load_file(str(weights)))
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_lora_adapter(peft_model: nn.Module, folder: Path) -> None:
    """Loads a LoRA adapter saved by ``save_pretrained`` into an existing PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {folder} holds no LoRA adapter to resume from")
    result = set_peft_model_state_dict(peft_model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(
            f"LoRA adapter in {folder} does not match the model: unexpected keys {unexpected[:5]}"
        )


class RouterProgressCallback(ProgressCallback):
    """The stock progress bar, with compact log lines: loss terms, then capacity per layer."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" not in logs:
            super().on_log(args, state, control, logs=logs, **kwargs)
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, label in (
            ("loss", "loss"),
            ("lm_loss", "lm"),
            ("distill_loss", "distill"),
            ("capacity_loss", "reg"),
            ("capacity", "capacity"),
            ("learning_rate", "lr"),
        ):
            if key in logs:
                parts.append(f"{label} {logs[key]:.4g}")
        self.training_bar.set_postfix_str(
            f"loss {logs['loss']:.4g} cap {logs.get('capacity', float('nan')):.2f}"
        )
        per_layer = [
            f"{k.split('_')[-1]}:{v:.2f}" for k, v in logs.items() if k.startswith("capacity/layer_")
        ]
        line = " | ".join(parts)
        if per_layer:
            line += "\n  kept per layer " + " ".join(per_layer)
        self.training_bar.write(line)
