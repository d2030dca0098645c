"""The quickstart as a recipe over library parts: train, evaluate three models, time them, report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routertune.io_utils import atomic_write_text

CALIBRATION_EXAMPLES = 64  # attention-importance data for the attention-drop baseline


@dataclass
class QuickstartSettings:
    """Knobs of the quickstart; defaults keep the whole run near 20 minutes on 2 CPU cores."""

    model: str | None = None  # None: the built-in default model
    output_dir: str = "reports/quickstart"
    granularity: str = "attn_sequence"
    router_layers: int = 16
    # Router-only SGD at lr 0.1 on 256 short examples: the recipe that moved SmolLM2's routers
    # while keeping its held-out loss near dense in docs/training.md; the seed's AdamW at 1e-5
    # barely moves routers in the few steps a CPU run affords.
    train_samples: int = 256
    validation_samples: int = 64
    max_seq_length: int = 256
    optim: str = "sgd"
    learning_rate: float = 0.1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    loss: str = "lm"
    tasks: tuple[str, ...] = ()  # empty: the nine default offline tasks
    limit: int = 40
    mmlu_limit: int = 1  # documents per MMLU subject (57 subjects)
    eval_batch_size: int = 8
    bench_context: int = 512
    bench_batch: int = 1
    bench_new_tokens: int = 32
    bench_repeats: int = 3
    threads: int | None = None  # None: torch's default
    seed: int = 0
    # More training flags by name, e.g. {"loss": "lm+distill"} (routertune train --help lists them).
    extra_train_flags: dict[str, Any] = field(default_factory=dict)


class Quickstart:
    """Runs the steps in order, printing progress, and keeps every intermediate result."""

    def __init__(self, settings: QuickstartSettings) -> None:
        from rich.console import Console

        self.s = settings
        self.out = Path(settings.output_dir)
        self.console = Console(stderr=True)
        self.results: dict[str, Any] = {"settings": asdict(settings)}
        self.started = time.time()
        self.timings: dict[str, float] = {}

    # ---- helpers -----------------------------------------------------------------------------
    def step(self, index: int, total: int, title: str) -> None:
        elapsed = time.time() - self.started
        self.console.rule(f"[bold]{index}/{total} {title}[/bold]  ({elapsed / 60:.1f} min elapsed)")

    def _timed(self, key: str, fn, *args, **kwargs):
        start = time.time()
        value = fn(*args, **kwargs)
        self.timings[key] = round(time.time() - start, 1)
        return value

    def save_results(self) -> None:
        self.results["timings_s"] = self.timings
        self.results["wall_time_s"] = round(time.time() - self.started, 1)
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=str) + "\n")

    # ---- the job -----------------------------------------------------------------------------
    def run(self) -> Path:
        import torch

        from routertune.loading import DEFAULT_MODEL

        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        model_name = self.s.model or DEFAULT_MODEL
        self.out.mkdir(parents=True, exist_ok=True)
        total = 6
        self.step(1, total, f"Router-tuning {model_name} on the builtin mix")
        self._timed("train", self.train, model_name)
        self.save_results()

        self.step(2, total, "Loading the model once for evaluation and benchmarks")
        from routertune.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_name)
        self.step(3, total, "Evaluating the dense model")
        self.results["eval_dense"] = self._timed("eval_dense", self.evaluate, model, tokenizer)
        self.save_results()

        self.step(4, total, "Evaluating the routed model")
        from routertune import detach_routers, load_routers

        load_routers(model, self.routers_dir)
        self.results["eval_routed"] = self._timed("eval_routed", self.evaluate, model, tokenizer)
        self.save_results()
        self.results["bench_routed"] = self._timed("bench_routed", self.bench, model, tokenizer)
        self.save_results()

        self.step(5, total, "Attention drop at the routed model's compute")
        detach_routers(model)
        capacity = self.results["eval_routed"]["capacity"]["overall"]
        self.results["attention_drop"] = self._timed("drop", self.attention_drop, model, tokenizer, capacity)
        self.results["eval_drop"] = self._timed("eval_drop", self.evaluate, model, tokenizer)
        self.results["bench_drop"] = self._timed("bench_drop", self.bench, model, tokenizer)
        self.save_results()

        self.step(6, total, "Writing the report")
        from routertune.quickstart.report import write_report

        report = write_report(self.results, self.out)
        self.save_results()
        self.console.print(f"[green]Report:[/green] {report}  ({(time.time() - self.started) / 60:.1f} min)")
        return report

    @property
    def routers_dir(self) -> Path:
        return self.out / "routers"

    def train(self, model_name: str) -> None:
        from routertune.training.arguments import config_from_flags
        from routertune.training.run import run

        s = self.s
        flags = {
            "model_name_or_path": model_name,
            "data_type": "builtin",
            "max_train_samples": s.train_samples,
            "validation_samples": s.validation_samples,
            "max_seq_length": s.max_seq_length,
            "granularity": s.granularity,
            "router_layers": s.router_layers,
            "learning_rate": s.learning_rate,
            "per_device_train_batch_size": s.per_device_train_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "loss": s.loss,
            "optim": s.optim,
            "train_sampling_strategy": "group_by_length",
            "num_train_epochs": 1,
            "output_dir": str(self.routers_dir),
            "overwrite_output_dir": True,
            "seed": s.seed,
            "save_strategy": "no",
            "report_to": "none",
            **s.extra_train_flags,
        }
        self.results["train"] = run(config_from_flags(flags))

    def evaluate(self, model, tokenizer) -> dict[str, Any]:
        from routertune.evaluation import evaluate
        from routertune.tasks import DEFAULT_TASKS

        tasks = list(self.s.tasks or DEFAULT_TASKS)
        task_limits = {"mmlu": self.s.mmlu_limit} if "mmlu" in tasks else None
        return evaluate(
            model,
            tokenizer,
            tasks=tasks,
            limit=self.s.limit,
            task_limits=task_limits,
            batch_size=self.s.eval_batch_size,
        )

    def attention_drop(self, model, tokenizer, capacity: float) -> dict[str, Any]:
        from routertune.baselines import (
            apply_attention_drop,
            attention_importance,
            candidate_layers,
            drop_report,
        )
        from routertune.data.builtin import builtin_messages

        # Calibrate on builtin examples used neither for training (the first train_samples)
        # nor for the held-out loss (the last validation_samples).
        s = self.s
        pool = builtin_messages()
        calibration = pool[-(s.validation_samples + CALIBRATION_EXAMPLES) : len(pool) - s.validation_samples]
        if len(pool) - s.validation_samples - CALIBRATION_EXAMPLES < s.train_samples:
            raise ValueError(
                f"the builtin mix has {len(pool)} examples: too few for {s.train_samples} training, "
                f"{CALIBRATION_EXAMPLES} calibration and {s.validation_samples} held-out examples"
            )
        candidates = candidate_layers(model, s.router_layers)
        importance = attention_importance(model, tokenizer, calibration, layers=candidates)
        dropped = apply_attention_drop(model, importance, capacity=capacity, candidates=candidates)
        return drop_report(
            importance, candidates, dropped, data="builtin (held out)", n_examples=len(calibration)
        )

    def bench(self, model, tokenizer) -> dict[str, Any]:
        from routertune.benchmark import BenchSettings, run_benchmark

        settings = BenchSettings(
            contexts=(self.s.bench_context,),
            batches=(self.s.bench_batch,),
            new_tokens=self.s.bench_new_tokens,
            repeats=self.s.bench_repeats,
            variants=("dense", "routed"),
            seed=self.s.seed,
        )
        return run_benchmark(model, settings, progress=lambda line: self.console.print(f"  {line}"))


def run_quickstart(settings: QuickstartSettings) -> Path:
    """Runs the whole job; returns the path of ``report.md``."""
    return Quickstart(settings).run()
