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
    """Knobs of the quickstart; defaults keep the whole run near 25 minutes on 2 CPU cores (25.5 measured)."""

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
    # The routed model is shown at its own capacity and recalibrated to each of these (thresholds
    # only, no retraining), each beside the attention drop of the same compute.
    calibrated_capacities: tuple[float, ...] = (0.75,)
    bench_contexts: tuple[int, ...] = (512, 2048)
    bench_batch: int = 1
    bench_new_tokens: int = 32
    bench_repeats: int = 3
    threads: int | None = None  # None: torch's default
    seed: int = 0
    # More training flags by name, e.g. {"loss": "lm+distill"} (routertune train --help lists them).
    extra_train_flags: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [c for c in self.calibrated_capacities if not 0.0 < float(c) < 1.0]
        if bad:
            raise ValueError(f"calibrated capacities must be in (0, 1); got {bad}")
        if not self.bench_contexts or any(int(c) < 1 for c in self.bench_contexts):
            raise ValueError(f"bench contexts must be positive token counts; got {list(self.bench_contexts)}")


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

    def save_results(self, clock: bool = True) -> None:
        if clock:
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
        self.results["points"] = []
        self.save_results()

        self.step(4, total, "The routed model: at its own capacity, then recalibrated")
        from routertune import detach_routers, load_routers

        load_routers(model, self.routers_dir)
        self.routed_point(model, tokenizer, "routed", None)
        for capacity in self.s.calibrated_capacities:
            self.routed_point(model, tokenizer, f"routed@{capacity:g}", capacity)

        self.step(5, total, "Attention drop at each routed point's compute")
        detach_routers(model)
        self.results["attention_drop"] = self._timed("importance", self.importance, model, tokenizer)
        for routed in [p for p in self.results["points"] if p["kind"] == "routed"]:
            self.drop_point(model, tokenizer, routed)

        self.step(6, total, "Writing the report")
        from routertune.quickstart.report import write_report

        self.save_results()
        report = write_report(self.results, self.out)  # adds results["summary"]
        self.save_results(clock=False)  # the times the report states
        self.console.print(f"[green]Report:[/green] {report}  ({(time.time() - self.started) / 60:.1f} min)")
        return report

    def routed_point(self, model, tokenizer, name: str, target: float | None) -> None:
        """Evaluates and times the routed model as it is (``target`` None) or with its thresholds
        calibrated to keep ``target`` of its routed units on held-out instruction prompts."""
        point: dict[str, Any] = {"name": name, "kind": "routed", "target_capacity": target}
        if target is not None:
            point["calibration"] = self._timed(f"calibrate {name}", self.calibrate, model, tokenizer, target)
        point["eval"] = self._timed(f"eval {name}", self.evaluate, model, tokenizer)
        point["capacity"] = point["eval"]["capacity"]["overall"]
        point["bench"] = self._timed(f"bench {name}", self.bench, model)
        self.results["points"].append(point)
        self.save_results()

    def drop_point(self, model, tokenizer, routed: dict[str, Any]) -> None:
        """The attention drop of the same compute as ``routed`` (its capacity measured during
        evaluation); evaluated once per number of dropped layers."""
        from routertune import detach_routers
        from routertune.baselines import apply_attention_drop, n_drop_for_capacity

        drop = self.results["attention_drop"]
        n_drop = n_drop_for_capacity(routed["capacity"], len(drop["candidates"]))
        name = f"drop {n_drop}" if n_drop else "dense"  # nothing to drop: dense is that compute
        routed["same_compute_drop"] = name
        if not n_drop or any(p["name"] == name for p in self.results["points"]):
            return
        importance = {int(k): v for k, v in drop["layer_importance"].items()}
        dropped = apply_attention_drop(model, importance, n_drop=n_drop, candidates=drop["candidates"])
        point: dict[str, Any] = {"name": name, "kind": "drop", "dropped": dropped}
        point["capacity"] = 1.0 - n_drop / len(drop["candidates"])
        point["eval"] = self._timed(f"eval {name}", self.evaluate, model, tokenizer)
        point["bench"] = self._timed(f"bench {name}", self.bench, model)
        detach_routers(model)
        self.results["points"].append(point)
        self.save_results()

    def held_out_examples(self) -> list[dict]:
        """Builtin examples used neither for training (the first train_samples) nor for the
        held-out loss (the last validation_samples): what calibration and importance run on."""
        from routertune.data.builtin import builtin_messages

        s = self.s
        pool = builtin_messages()
        if len(pool) - s.validation_samples - CALIBRATION_EXAMPLES < s.train_samples:
            raise ValueError(
                f"the builtin mix has {len(pool)} examples: too few for {s.train_samples} training, "
                f"{CALIBRATION_EXAMPLES} calibration and {s.validation_samples} held-out examples"
            )
        return pool[-(s.validation_samples + CALIBRATION_EXAMPLES) : len(pool) - s.validation_samples]

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
            per_doc=True,  # paired differences between the points
        )

    def calibrate(self, model, tokenizer, target: float) -> dict[str, Any]:
        from routertune.calibrate import calibrate_thresholds, make_batches

        # Routed on the prompts, as evaluation routes on each request's context.
        batches = make_batches(tokenizer, self.held_out_examples(), route_on="prompt")
        return calibrate_thresholds(model, batches, target_capacity=target).to_dict()

    def importance(self, model, tokenizer) -> dict[str, Any]:
        from routertune.baselines import attention_importance, candidate_layers, drop_report

        data = self.held_out_examples()
        candidates = candidate_layers(model, self.s.router_layers)
        importance = attention_importance(model, tokenizer, data, layers=candidates)
        report = drop_report(importance, candidates, [], data="builtin (held out)", n_examples=len(data))
        for key in ("dropped", "n_drop", "capacity"):  # per drop point, in results["points"]
            report.pop(key)
        return report

    def bench(self, model) -> dict[str, Any]:
        from routertune.benchmark import BenchSettings, run_benchmark

        settings = BenchSettings(
            contexts=tuple(self.s.bench_contexts),
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
