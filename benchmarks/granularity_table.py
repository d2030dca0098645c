"""The paper's main table on the default model: six granularities, each against dense and against
the static drop of the same compute.

    # 1. train each granularity with the default recipe (the 1,000-example command of
    #    docs/training.md); routers recorded in results/routers-smollm2-<granularity>/
    OMP_NUM_THREADS=2 python benchmarks/granularity_table.py train --granularities mlp_sequence,block_sequence
    # 2. evaluate each routed model on the limit-400 sample (3,432 documents), then the drop of its
    #    unit with the same compute (each point ~25 min on one thread; two processes share 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/granularity_table.py eval --granularities mlp_sequence &
    OMP_NUM_THREADS=1 python benchmarks/granularity_table.py eval --granularities block_sequence &
    # 3. prefill / decode speed at 512 and 2048 tokens (alone, on a quiet machine)
    OMP_NUM_THREADS=2 python benchmarks/granularity_table.py speed --threads 2
    # 4. results/granularity_table.{json,md}
    python benchmarks/granularity_table.py report
    # another training seed of a row: name it <granularity>-seed<N> in train / eval / speed;
    # the report adds a row for every such run whose routers are recorded
    OMP_NUM_THREADS=2 python benchmarks/granularity_table.py train --granularities attn_token-seed7

Every step skips what is already recorded, so the table fills in as cells are run; the report
says "not run" for the rest.

Method.
* Routers: ``routertune train`` with the flags of ``TRAIN_FLAGS``, ``--max_train_samples 1000``
  and ``--granularity G``, one
  seed (42). The attn_sequence routers are the recorded default run
  (results/routers-smollm2-attn_sequence, trained by the same command).
* Evaluation: the nine offline tasks, the first 400 documents of each (8 per MMLU subject),
  per-document scores, routed on the request context (``--route_on prompt``), through
  ``capacity_curve.evaluate_point``; points already in results/capacity_curve_400/ (dense,
  the attn_sequence routers, attention drops) are the same evaluation and are reused.
* Same compute: a ``*_sequence`` model that keeps a share C of its 16 routed units is set
  against the drop of ``round((1 - C) x 16)`` units of the same kind (attention, MLP or block;
  the least important ones by ``1 - cos`` on 64 calibration examples, routertune.baselines); a
  ``*_token`` model against the drop whose FLOP ideal (prefill, 512 tokens) is nearest its own
  (a token that skips attention still computes its keys/values, so its share of token-units
  kept overstates the compute it saves). Differences are paired over the same
  documents, +- one standard error.
* Speed: ``run_benchmark`` at batch 1, 32 decode steps, dense and routed interleaved, medians
  of repeats. ``*_sequence``: the deepest ``round((1 - C) x 16)`` routed units skip on every input
  (any N units of one kind cost the same, so this is also the speed of the drop); ``*_token``:
  the routers' own decisions on the benchmark's random-token prompt, at the capacity they take
  there (reported beside it). FLOP-ideal speedups at the evaluation's own per-layer capacities
  are given for every row.
* Paper: Router-Tuning / MindSkip (EMNLP 2025) on Llama-3-8B (32 layers, 16 routed), lm-eval
  average over eight tasks (ARC-C, BoolQ, HellaSwag, MMLU, OBQA, PIQA, RTE, WinoGrande; ours adds
  ARC-Easy), its speedup measurement not stated; the paper gives mlp_* and block_* as "about".
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import capacity_curve as curve  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GRANULARITIES = ("attn_sequence", "attn_token", "mlp_sequence", "mlp_token", "block_sequence", "block_token")
DROP_PREFIX = {
    unit: kind for kind, unit in curve.DROP_KINDS.items()
}  # attn -> "drop", mlp -> "drop-mlp", ...
# Points recorded by capacity_curve.py under another name.
CURVE_ALIASES = {"routed-attn_sequence:native": "routed:native"}
TRAIN_FLAGS = [
    "--data_type", "builtin", "--validation_samples", "100",
    "--max_seq_length", "512", "--per_device_train_batch_size", "8", "--optim", "sgd",
    "--learning_rate", "0.1", "--target_capacity", "0", "--gradient_scale", "0.02", "--loss", "lm",
    "--train_sampling_strategy", "group_by_length", "--logging_steps", "5", "--save_steps", "25", "--use_cpu",
]  # fmt: skip
ROUTER_FILES = ("router_config.json", "routers.safetensors", "train_results.json")
PAPER = {
    "model": "Llama-3-8B (32 layers, 16 routed)",
    "dense": 69.7,
    "rows": {
        "attn_sequence": {"average": 69.4, "speedup": 1.21},
        "attn_token": {"average": 68.7, "speedup": 1.18},
        "mlp_sequence": {"average": 62.0, "speedup": 1.05, "about": True},
        "mlp_token": {"average": 62.0, "speedup": 1.05, "about": True},
        "block_sequence": {"average": 61.0, "speedup": 1.25, "about": True},
        "block_token": {"average": 61.0, "speedup": 1.25, "about": True},
    },
}


def _split(name: str) -> tuple[str, int | None]:
    """A run's granularity and seed: ``attn_token`` is the recipe's seed (42),
    ``attn_token-seed7`` the same recipe with ``--seed 7``."""
    granularity, _, seed = name.partition("-seed")
    return granularity, (int(seed) if seed.isdigit() else None)


def _is_run_name(name: str) -> bool:
    granularity, seed = _split(name)
    return granularity in GRANULARITIES and (name == granularity or seed is not None)


def _granularities(text: str) -> list[str]:
    """Run names: a granularity, optionally with ``-seed<N>`` (another training seed)."""
    names = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in names if not _is_run_name(g)]
    if unknown or not names:
        raise SystemExit(
            f"unknown granularities {unknown or text!r}: {', '.join(GRANULARITIES)}, each optionally with -seed<N>"
        )
    return names


def _seed_runs(args: argparse.Namespace, granularity: str) -> list[str]:
    """The other-seed runs of ``granularity`` whose routers are recorded."""
    pattern = _routers(args, f"{granularity}-seed*")
    prefix = pattern.name[: -len("*")]
    tails = [path.name[len(prefix) :] for path in pattern.parent.glob(pattern.name)]
    return [f"{granularity}-seed{seed}" for seed in sorted(int(t) for t in tails if t.isdigit())]


def _routers(args: argparse.Namespace, granularity: str) -> Path:
    return Path(args.routers.format(granularity=granularity))


def _routed_label(granularity: str) -> str:
    return f"routed-{granularity}:native"


def _drop_label(granularity: str, n_drop: int) -> str:
    return f"{DROP_PREFIX[granularity.split('_')[0]]}:{n_drop}"


def _find(args: argparse.Namespace, label: str) -> dict[str, Any] | None:
    """The record of point ``label``: in the table's own folder, else in the capacity curve's."""
    for directory, name in (
        (Path(args.points_dir), label),
        (Path(args.curve_dir), CURVE_ALIASES.get(label, label)),
    ):
        path = curve.point_file(directory, name)
        if path.exists():
            record = json.loads(path.read_text())
            record["eval"] = curve._expand(record["eval"])
            record["file"] = str(path)
            return record
    return None


def _capacity(record: dict[str, Any]) -> float:
    cap = record["eval"]["capacity"]
    return cap["overall"] if cap else 1.0


def _n_drop(record: dict[str, Any], config_of: Callable[[], Any] | None = None) -> int:
    """Units a drop removes for the compute of this routed point.

    ``*_sequence``: ``round((1 - C) x units)``, every unit costing the same. ``*_token``: the
    drop whose FLOP ideal (prefill, 512 tokens) is nearest the routed point's, from the model
    config ``config_of()`` returns (called for token points only): a token that skips attention
    still computes its keys/values, so a share of token-units skipped saves less than the same
    share of whole attentions."""
    from routertune.baselines import n_drop_for_capacity

    per_layer = record["eval"]["capacity"]["per_layer"]
    granularity = (record.get("setup") or {}).get("granularity", "")
    if not granularity.endswith("_token"):
        return n_drop_for_capacity(_capacity(record), len(per_layer))
    if config_of is None:
        raise SystemExit(
            f"{record['point']}: the drop of a token point is matched by FLOPs: needs the config"
        )
    config, unit = config_of(), granularity.split("_")[0]
    target = record["ideal_speedup_512"]["prefill"]
    layers = sorted(per_layer, key=int)

    def drop_ideal(n: int) -> float:
        caps = {layer: (0.0 if k < n else 1.0) for k, layer in enumerate(layers)}  # any n units cost the same
        return curve._ideal(config, caps, 512, f"{unit}_sequence")["prefill"]

    return min(range(len(layers) + 1), key=lambda n: abs(drop_ideal(n) - target))


def _model_config(args: argparse.Namespace) -> Any:
    from transformers import AutoConfig

    from routertune.loading.resolve import resolve_model

    return AutoConfig.from_pretrained(resolve_model(args.model, progress=False))


def train_into(model: str, flags: list[str], run: Path, folder: Path, label: str) -> None:
    """Trains with ``routertune train <flags>`` into ``run`` (unless it holds a result) and
    records the routers (and a LoRA adapter, if trained) in ``folder``."""
    from routertune.io_utils import atomic_dir
    from routertune.routing.router_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    if not (run / "routers.safetensors").exists():
        command = [sys.executable, "-m", "routertune.train", "--model_name_or_path", model, *flags,
                   "--output_dir", str(run)]  # fmt: skip
        print(f"{label}: training ({' '.join(command[2:])})", flush=True)
        start = time.time()
        subprocess.run(command, check=True)
        print(f"{label}: trained in {time.time() - start:.0f} s", flush=True)
    names = [*ROUTER_FILES, *((ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (run / ADAPTER_CONFIG).exists() else ())]
    with atomic_dir(folder) as tmp:
        for name in names:
            shutil.copy2(run / name, tmp / name)
    print(f"{label}: recorded in {folder}")


def cmd_train(args: argparse.Namespace) -> None:
    for g in _granularities(args.granularities):
        folder = _routers(args, g)
        if (folder / "routers.safetensors").exists():
            print(f"{g}: {folder} exists, skipped")
            continue
        granularity, seed = _split(g)
        flags = [*TRAIN_FLAGS, "--max_train_samples", str(args.max_train_samples)]
        flags += ["--granularity", granularity]
        flags += ["--seed", str(seed)] if seed is not None else []
        train_into(args.model, flags, Path(args.run_dir) / g, folder, g)


class PointEvaluator:
    """Evaluates points on the table's documents, each once: a point already recorded (in the
    table's folder or the capacity curve's) is read back instead."""

    def __init__(self, args: argparse.Namespace) -> None:
        from routertune.loading import load_model_and_tokenizer

        torch.set_num_threads(args.threads)
        self.args = args
        Path(args.points_dir).mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = load_model_and_tokenizer(args.model, progress=False)
        self.tasks = args.tasks.split(",") if args.tasks else None

    def ensure(self, label: str, point: str, routers: Path) -> dict[str, Any]:
        """The record of ``label``; evaluates ``point`` (with ``routers``) if there is none."""
        from routertune.io_utils import atomic_write_text

        args = self.args
        found = _find(args, label)
        if found is not None:
            print(f"{label}: recorded in {found['file']}")
            return found
        record = curve.evaluate_point(
            self.model, self.tokenizer, point, routers, limit=args.limit, mmlu_limit=args.mmlu_limit,
            batch_size=args.batch_size, tasks=self.tasks, threads=args.threads,
        )  # fmt: skip
        record["point"] = label
        atomic_write_text(curve.point_file(Path(args.points_dir), label), json.dumps(record, indent=1) + "\n")
        print(
            f"{label}: average {record['eval']['average']['value']:.4f} ({record['seconds']} s)", flush=True
        )
        return _find(args, label)


def cmd_eval(args: argparse.Namespace) -> None:
    evaluator = PointEvaluator(args)
    ensure = evaluator.ensure
    ensure("dense", "dense", Path())
    for g in _granularities(args.granularities):
        folder = _routers(args, g)
        if not (folder / "routers.safetensors").exists():
            print(f"{g}: no routers in {folder} (run `train` first), skipped")
            continue
        routed = ensure(_routed_label(g), "routed:native", folder)
        n_drop = _n_drop(routed, lambda: evaluator.model.config)
        if n_drop == 0:
            print(
                f"{g}: capacity {_capacity(routed):.3f} rounds to no dropped unit: its drop is the dense model"
            )
            continue
        ensure(_drop_label(g, n_drop), _drop_label(g, n_drop), Path())


def speed_record(model, routers: Path, routed: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Times ``model`` with the routers of ``routers`` against dense (see the module docstring
    for which skips), for a routed point evaluated as ``routed``; detaches them after."""
    from routertune import detach_routers, load_routers
    from routertune.benchmark import BenchSettings, run_benchmark
    from routertune.routing.attach import get_router_config

    load_routers(model, routers)
    granularity = get_router_config(model).granularity
    n_units = len(routed["eval"]["capacity"]["per_layer"])
    n_drop = _n_drop(routed, lambda: model.config)
    skip_ratio = n_drop / n_units if granularity.endswith("sequence") else None
    settings = BenchSettings(
        contexts=tuple(int(c) for c in args.contexts.split(",")), batches=(1,), new_tokens=args.new_tokens,
        repeats=args.repeats, variants=("dense", "routed"), skip_ratio=skip_ratio,
    )  # fmt: skip
    try:
        report = run_benchmark(model, settings, name=args.model, routers=str(routers))
    finally:
        detach_routers(model)
    cells = [
        {
            "context": cell["context"],
            "capacity": cell["capacity_overall"],
            "speedup": cell["speedup"],
            "kv_cache_bytes": cell["kv_cache_bytes"],
        }
        for cell in report["results"]
    ]
    for cell in cells:
        sp = cell["speedup"]
        print(f"{routers.name} ctx {cell['context']}: prefill {sp['prefill']['measured']:.3f} (ideal "
              f"{sp['prefill']['ideal']:.3f}) decode {sp['decode']['measured']:.3f} (ideal {sp['decode']['ideal']:.3f})",
              flush=True)  # fmt: skip
    return {
        "granularity": granularity,
        "skip": report["skip"],
        "skipped_units": n_drop if skip_ratio is not None else None,
        "cells": cells,
        "settings": report["settings"],
        "environment": report["environment"],
        "threads": args.threads,
    }


def cmd_speed(args: argparse.Namespace) -> None:
    from routertune.io_utils import atomic_write_text
    from routertune.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, progress=False)
    for g in _granularities(args.granularities):
        out = Path(args.points_dir) / f"speed-{g}.json"
        routed = _find(args, _routed_label(g))
        if out.exists() and not args.force:
            print(f"{g}: {out} exists, skipped")
            continue
        if routed is None:
            print(f"{g}: not evaluated yet (its capacity sets the skipped share), skipped")
            continue
        record = speed_record(model, _routers(args, g), routed, args)
        atomic_write_text(out, json.dumps(record, indent=1) + "\n")


def _difference(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float]:
    from routertune.evaluation import paired_difference

    diff = paired_difference(first["eval"], second["eval"])
    return {"difference": diff["difference"], "stderr": diff["stderr"]}


def cmd_report(args: argparse.Namespace) -> None:

    dense = _find(args, "dense")
    if dense is None:
        raise SystemExit("no dense point yet: run `eval` first")
    config_of = functools.cache(lambda: _model_config(args))  # read only if a token row needs it
    rows = []
    runs = [name for granularity in GRANULARITIES for name in (granularity, *_seed_runs(args, granularity))]
    for g in runs:
        row: dict[str, Any] = {"granularity": g, "paper": PAPER["rows"][_split(g)[0]]}
        routers = _routers(args, g)
        if (routers / "train_results.json").exists():
            trained = json.loads((routers / "train_results.json").read_text())
            validation = trained.get("validation") or {}
            row["train"] = {
                "steps": trained.get("steps"),
                "wall_time_s": trained.get("wall_time_s"),
                "heldout_loss": (validation.get("routed") or {}).get("loss"),
                "heldout_capacity": ((validation.get("routed") or {}).get("capacity") or {}).get("overall"),
                "heldout_dense_loss": (validation.get("dense") or {}).get("loss"),
            }
        routed = _find(args, _routed_label(g))
        if routed is not None:
            n_drop = _n_drop(routed, config_of)
            per_layer = routed["eval"]["capacity"]["per_layer"]
            row["routed"] = {
                "point": routed["point"],
                "capacity": _capacity(routed),
                "average": routed["eval"]["average"]["value"],
                "vs_dense": _difference(dense, routed),
                "ideal_512": routed["ideal_speedup_512"],
            }
            drop = dense if n_drop == 0 else _find(args, _drop_label(g, n_drop))
            row["drop"] = {"point": _drop_label(g, n_drop) if n_drop else "dense", "n_drop": n_drop,
                           "capacity": 1 - n_drop / len(per_layer)}  # fmt: skip
            if drop is not None:
                row["drop"]["average"] = drop["eval"]["average"]["value"]
                row["drop"]["vs_dense"] = _difference(dense, drop)
                row["routed"]["vs_drop"] = _difference(drop, routed)
        speed_path = Path(args.points_dir) / f"speed-{g}.json"
        if speed_path.exists():
            speed = json.loads(speed_path.read_text())
            row["speed"] = {
                str(cell["context"]): {
                    phase: {k: cell["speedup"][phase][k] for k in ("measured", "ideal")}
                    for phase in ("prefill", "decode")
                }
                for cell in speed["cells"]
            }
            row["speed_rule"] = speed["skip"]["rule"]
            row["speed_threads"] = speed["threads"]
            row["speed_load"] = [
                speed["environment"].get("load_average_start"),
                speed["environment"].get("load_average_end"),
            ]
        rows.append(row)
    data = {
        "schema": "routertune.granularity_table/1",
        "model": args.model,
        "documents": sum(t["samples"] for t in dense["eval"]["tasks"].values()),
        "tasks": list(dense["eval"]["tasks"]),
        "settings": dense["eval"]["settings"],
        "dense_average": dense["eval"]["average"]["value"],
        "paper": {"model": PAPER["model"], "dense": PAPER["dense"]},
        "rows": rows,
    }
    write_table(Path(args.output), data, markdown)


def write_table(out: Path, data: dict[str, Any], render) -> None:
    """``out``.json and ``out``.md (``render(data)``), each written atomically; the table printed."""
    from routertune.io_utils import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), render(data))
    print(render(data))


def _loss(data: dict[str, Any]) -> str:
    losses = {f"{(r.get('train') or {}).get('heldout_dense_loss'):.3f}" for r in data["rows"]
              if (r.get("train") or {}).get("heldout_dense_loss") is not None}  # fmt: skip
    return ", ".join(sorted(losses)) or "not run"


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def _diff(d: dict[str, float] | None) -> str:
    return f"{100 * d['difference']:+.2f} +- {100 * d['stderr']:.2f}" if d else "not run"


def _speed(row: dict[str, Any], context: str, phase: str) -> str:
    cell = row.get("speed", {}).get(context)
    return f"{cell[phase]['measured']:.3f}x ({cell[phase]['ideal']:.3f}x)" if cell else "not run"


def markdown(data: dict[str, Any]) -> str:
    """The table: one row per granularity; every number is one of ``data``'s (tests check it)."""
    contexts = sorted({c for r in data["rows"] for c in r.get("speed", {})}, key=int) or ["512", "2048"]
    speed_heads = " | ".join(f"{phase} {c}" for c in contexts for phase in ("prefill", "decode"))
    settings = data["settings"]
    limits = (settings.get("task_limits") or {}).get("mmlu", settings["limit"])
    lines = [
        f"# Six granularities: {data['model']}",
        "",
        "Written by `benchmarks/granularity_table.py report`; the method and the commands are in that",
        "script's docstring.",
        "",
        f"{data['documents']} documents ({len(data['tasks'])} tasks: {', '.join(data['tasks'])}; the first "
        f"{settings['limit']} of each, {limits} per MMLU subject); dense average "
        f"{_points(data['dense_average'])}. Averages and paired differences in points, +- one standard error; "
        '"drop" is the static drop of the same unit with the same compute; speed: measured (FLOP ideal of '
        "the benchmarked skips), batch 1.",
        "",
        f"| granularity | capacity | average | vs dense | drop | drop average | routed - drop | {speed_heads} "
        f"| FLOP ideal 512 (prefill/decode) | held-out loss (capacity) | paper: average (dense "
        f"{data['paper']['dense']}) | paper: speedup |",
        "|---" * (11 + 2 * len(contexts)) + "|",
    ]
    for row in data["rows"]:
        paper = row["paper"]
        about = "about " if paper.get("about") else ""
        paper_cells = f"{about}{paper['average']:.1f} | {paper['speedup']:.2f}x"
        routed, drop = row.get("routed"), row.get("drop")
        if routed is None:
            cells = ["not run"] * 7
        else:
            drop_avg = _points(drop["average"]) if "average" in drop else "not run"
            cells = [
                f"{routed['capacity']:.3f}",
                _points(routed["average"]),
                _diff(routed["vs_dense"]),
                f"{drop['point']} ({drop['capacity']:.3f})",
                drop_avg,
                _diff(routed.get("vs_drop")),
            ]
            ideal = routed["ideal_512"]
            cells.append(f"{ideal['prefill']:.3f}x / {ideal['decode']:.3f}x")
        speeds = [_speed(row, c, p) for c in contexts for p in ("prefill", "decode")]
        train = row.get("train") or {}
        heldout = (
            f"{train['heldout_loss']:.3f} ({train['heldout_capacity']:.3f})"
            if train.get("heldout_loss") is not None
            else "not run"
        )
        cells = [row["granularity"], *cells[:6], *speeds, cells[6], heldout, paper_cells]
        lines.append("| " + " | ".join(cells) + " |")
    speed_notes = [
        f"{r['granularity']}: {r['speed_rule']} ({r['speed_threads']} threads, load {r['speed_load']})"
        for r in data["rows"]
        if "speed" in r
    ]
    lines += [
        "",
        f"Paper: {data['paper']['model']}, eight-task lm-eval average (no ARC-Easy); its speedup measurement is "
        "not stated. Held-out loss: the routed model's LM loss on the 99 held-out builtin examples of its "
        f"training run, at the capacity it took there (dense {_loss(data)}).",
        "",
        "Speed rows: " + ("; ".join(speed_notes) if speed_notes else "none run") + ".",
        "",
    ]
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", default=curve.MODEL)
    parser.add_argument("--routers", default=str(RESULTS / "routers-smollm2-{granularity}"),
                        help="router folder of each row ({granularity} is replaced by its name)")  # fmt: skip
    parser.add_argument("--points_dir", default=str(RESULTS / name))
    parser.add_argument("--curve_dir", default=str(RESULTS / "capacity_curve_400"),
                        help="points of benchmarks/capacity_curve.py on the same documents, reused")  # fmt: skip


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--mmlu_limit", type=int, default=8)
    parser.add_argument("--tasks", default=None, help="comma-separated (default: the nine offline tasks)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "granularity_table")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--granularities", default=",".join(GRANULARITIES))
    tr.add_argument("--run_dir", default="runs/granularity_table", help="training output folders")
    tr.add_argument("--max_train_samples", type=int, default=1000)
    ev = sub.add_parser("eval")
    ev.add_argument("--granularities", default=",".join(GRANULARITIES))
    add_eval_arguments(ev)
    sp = sub.add_parser("speed")
    sp.add_argument("--granularities", default=",".join(GRANULARITIES))
    add_speed_arguments(sp)
    rp = sub.add_parser("report")
    rp.add_argument("--output", default=str(RESULTS / "granularity_table"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    {"train": cmd_train, "eval": cmd_eval, "speed": cmd_speed, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
