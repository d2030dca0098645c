"""The speed/quality dial: average accuracy and speedup at several capacities, routed vs attention drop.

    # evaluate points (each writes results/capacity_curve/<point>.json; two processes share 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/capacity_curve.py eval --points dense,routed:native,routed:0.75,routed:0.5 &
    OMP_NUM_THREADS=1 python benchmarks/capacity_curve.py eval --points drop:2,drop:4,drop:6,drop:8 &
    # time skipping the same shares of attention (alone, on a quiet machine)
    OMP_NUM_THREADS=1 python benchmarks/capacity_curve.py speed --skips 0,2,4,6,8
    # merge into results/capacity_curve.{json,md,png}
    python benchmarks/capacity_curve.py report
    # the points near dense on 4x the documents (results/capacity_curve_400.*)
    CAPACITY_CURVE_DIR=benchmarks/results/capacity_curve_400 OMP_NUM_THREADS=1 \
        python benchmarks/capacity_curve.py eval --limit 400 --mmlu_limit 8 --points dense,drop:2,drop:4,routed:native,routed-prompt:native
    # ... and the later points (each ~15 min on one thread)
    CAPACITY_CURVE_DIR=benchmarks/results/capacity_curve_400 OMP_NUM_THREADS=1 python benchmarks/capacity_curve.py \
        eval --limit 400 --mmlu_limit 8 --points routed-prompt-distill:native,routed-prompt-distill:0.875
    ... --points routed-prompt-distill-seed7:native,routed-prompt-distill-gs04:native,drop:6
    ... --points routed:0.625 --calibrate_on all
    CAPACITY_CURVE_DIR=benchmarks/results/capacity_curve_400 python benchmarks/capacity_curve.py report

Points:
  dense          the model without routers.
  routed:native  the trained routers at their own threshold (0.5).
  routed-NAME:native / routed-NAME:C  the same for another recorded router set (ROUTER_SETS):
                 ``prompt`` (trained with ``--route_on prompt``), ``prompt-distill`` (``--route_on
                 prompt --loss lm+distill``), ``prompt-distill-seed7`` (the same, ``--seed 7``),
                 ``prompt-distill-gs04`` (the same, ``--gradient_scale 0.04``: skips more);
                 ``attn_token``, ``mlp_sequence``, ... (the default recipe at that granularity).
  routed:C       the same routers, thresholds calibrated (``global``) so that C of the routed
                 attention units are kept on the calibration data (the last 64 builtin
                 examples; none of them trained on, none of them evaluation data), routing on
                 their prompts as the evaluation routes on contexts (``--calibrate_on prompt``,
                 the default; the 914-document curve's points were calibrated on whole
                 conversations, ``all``, and kept 0.06-0.08 less than C in evaluation).
  fixed:A+B+..   the attention of exactly layers A, B, ... removed for every input (e.g. the
                 least-KL set of benchmarks/headroom.py).
  drop:N         attention drop: the N least important of the 16 candidate layers (the routed
                 ones) removed (importance = 1 - cos(h, h + attn) on the same calibration
                 examples); its capacity is exactly 1 - N/16 on every input.
  drop-mlp:N, drop-block:N  the same for the MLP or the whole block (the baselines of mlp_* and
                 block_* routers; importance in routertune.baselines).

Every point is evaluated on the same documents (the first ``--limit`` of each offline task,
``--mmlu_limit`` per MMLU subject) with per-document scores, so the report gives paired
differences and their standard errors (documents both models score the same add no variance).
The routed model's capacity is the one measured during its own evaluation.

Speed: ``run_benchmark`` with ``skip_ratio = N/16`` (the deepest N routed attention layers skip
on every input), dense vs routed interleaved, medians of repeats. Skipping N attention layers
costs the same whichever N they are, so the row for N is the speed of attention drop N and of a
routed model at capacity 1 - N/16; the FLOP-ideal speedup at each routed point's measured
per-layer capacity is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
POINTS_DIR = Path(os.environ.get("CAPACITY_CURVE_DIR", RESULTS / "capacity_curve"))
DEFAULT_ROUTERS = RESULTS / "routers-smollm2-attn_sequence"
# Point kind "routed-NAME" evaluates these recorded router sets (training commands: docs/evaluation.md).
ROUTER_SETS = {
    "prompt": RESULTS / "routers-smollm2-attn_sequence-prompt",  # --route_on prompt
    "prompt-distill": RESULTS / "routers-smollm2-attn_sequence-prompt-distill",  # + --loss lm+distill
    "prompt-distill-seed7": RESULTS / "routers-smollm2-attn_sequence-prompt-distill-seed7",  # + --seed 7
    "prompt-distill-gs04": RESULTS / "routers-smollm2-attn_sequence-prompt-distill-gs04",  # + --gradient_scale 0.04
    # The default recipe at each other granularity (benchmarks/granularity_table.py trains them).
    **{g: RESULTS / f"routers-smollm2-{g}" for g in ("attn_token", "mlp_sequence", "mlp_token", "block_sequence", "block_token")},
}
# Point kinds of the static drops: the unit each removes (drop = attention).
DROP_KINDS = {"drop": "attn", "drop-mlp": "mlp", "drop-block": "block"}
MODEL = "smollm2-135m-instruct"


def _load_model():
    from routertune.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(MODEL)


def _calibration_examples() -> list[dict]:
    from routertune.calibrate import calibration_split

    fit, _ = calibration_split("builtin")
    return fit


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """Per-document 0/1 scores as strings ("0110..."): a point file stays small and diffable."""
    for entry in result["tasks"].values():
        if "per_doc" in entry:
            entry["per_doc"] = {m: "".join(str(int(v)) for v in xs) for m, xs in entry["per_doc"].items()}
    return result


def _expand(result: dict[str, Any]) -> dict[str, Any]:
    for entry in result["tasks"].values():
        if "per_doc" in entry:
            entry["per_doc"] = {m: [float(c) for c in xs] for m, xs in entry["per_doc"].items()}
    return result


def _prepare(model, tokenizer, point: str, routers: Path, calibrate_on: str = "prompt") -> dict[str, Any]:
    """Puts ``model`` (plain on entry) into the state ``point`` names; returns what was done."""
    from routertune import load_routers
    from routertune.baselines import apply_drop, candidate_layers, drop_layers, sublayer_importance
    from routertune.calibrate import calibrate_thresholds, make_batches
    from routertune.routing.attach import get_router_config

    kind, _, arg = point.partition(":")
    if kind == "dense":
        return {}
    if kind.startswith("routed-"):
        name = kind[len("routed-") :]
        if name not in ROUTER_SETS:
            raise SystemExit(f"unknown router set {name!r} in {point!r}: {', '.join(ROUTER_SETS)}")
        kind, routers = "routed", ROUTER_SETS[name]
    if kind == "routed":
        load_routers(model, routers)
        granularity = get_router_config(model).granularity
        if arg == "native":
            return {"routers": str(routers), "granularity": granularity, "thresholds": "as trained"}
        batches = make_batches(tokenizer, _calibration_examples(), route_on=calibrate_on)
        result = calibrate_thresholds(model, batches, float(arg), method="global")
        return {
            "routers": str(routers),
            "granularity": granularity,
            "calibrate_on": calibrate_on,
            "calibration": result.to_dict(),
        }
    if kind in DROP_KINDS:
        unit = DROP_KINDS[kind]
        candidates = candidate_layers(model, unit=unit)
        importance = sublayer_importance(model, tokenizer, _calibration_examples(), unit, layers=candidates)
        dropped = apply_drop(model, importance, n_drop=int(arg), candidates=candidates, unit=unit)
        return {
            "unit": unit,
            "candidates": candidates,
            "dropped": dropped,
            "importance": {str(k): v for k, v in importance.items()},
        }
    if kind == "fixed":
        candidates = candidate_layers(model)
        dropped = sorted(int(x) for x in arg.split("+"))
        drop_layers(model, dropped, candidates)
        return {"candidates": candidates, "dropped": dropped, "chosen_by": "given on the command line"}
    raise SystemExit(
        f"unknown point {point!r}: dense, routed[-NAME]:native, routed[-NAME]:<capacity>, "
        "drop[-mlp|-block]:<layers>, fixed:<layer>+<layer>..."
    )


def evaluate_point(
    model,
    tokenizer,
    point: str,
    routers: Path,
    *,
    limit: int,
    mmlu_limit: int,
    batch_size: int = 8,
    route_on: str = "prompt",
    calibrate_on: str = "prompt",
    tasks: list[str] | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Puts ``model`` (routers detached first) into ``point``'s state, evaluates it with
    per-document scores, and returns the point's record (as a point file holds it)."""
    from routertune import detach_routers
    from routertune.evaluation import evaluate
    from routertune.routing.attach import get_router_config

    if get_router_config(model) is not None:
        detach_routers(model)
    start = time.time()
    setup = _prepare(model, tokenizer, point, routers, calibrate_on)
    result = evaluate(
        model,
        tokenizer,
        **({"tasks": tasks} if tasks else {}),
        limit=limit,
        task_limits={"mmlu": mmlu_limit} if not tasks or "mmlu" in tasks else None,
        batch_size=batch_size,
        per_doc=True,
        route_on=route_on,
    )
    record = {
        "point": point if route_on == "prompt" or not point.startswith("routed") else f"{point}@all",
        "route_on": route_on,
        "setup": setup,
        "eval": _compact(result),
        "seconds": round(time.time() - start, 1),
        "threads": threads,
        "load_average": os.getloadavg(),
    }
    if result["capacity"]:
        granularity = get_router_config(model).granularity
        record["ideal_speedup_512"] = _ideal(model.config, result["capacity"]["per_layer"], 512, granularity)
    return record


def point_file(directory: Path, label: str) -> Path:
    return directory / f"{label.replace(':', '-').replace('@', '-')}.json"


def cmd_eval(args: argparse.Namespace) -> None:
    from routertune.io_utils import atomic_write_text

    torch.set_num_threads(args.threads)
    POINTS_DIR.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_model()
    for point in args.points.split(","):
        label = point if args.route_on == "prompt" or not point.startswith("routed") else f"{point}@all"
        out = point_file(POINTS_DIR, label)
        if out.exists() and not args.force:
            print(f"{point}: {out} exists, skipped")
            continue
        record = evaluate_point(
            model,
            tokenizer,
            point,
            Path(args.routers),
            limit=args.limit,
            mmlu_limit=args.mmlu_limit,
            batch_size=args.batch_size,
            route_on=args.route_on,
            calibrate_on=args.calibrate_on,
            threads=args.threads,
        )
        atomic_write_text(out, json.dumps(record, indent=1) + "\n")
        ev = record["eval"]
        cap = ev["capacity"]["overall"] if ev["capacity"] else 1.0
        print(f"{label}: average {ev['average']['value']:.4f} capacity {cap:.3f} ({record['seconds']} s)", flush=True)


def cmd_speed(args: argparse.Namespace) -> None:
    from routertune import RouterConfig, attach_routers
    from routertune.benchmark import BenchSettings, run_benchmark
    from routertune.routing.attach import routed_layers

    torch.set_num_threads(args.threads)
    model, _ = _load_model()
    attach_routers(model, RouterConfig(granularity="attn_sequence"))
    n_routed = len(routed_layers(model))
    rows = []
    for skip in (int(s) for s in args.skips.split(",")):
        settings = BenchSettings(
            contexts=tuple(int(c) for c in args.contexts.split(",")),
            batches=(1,),
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            variants=("dense", "routed"),
            skip_ratio=skip / n_routed,
        )
        report = run_benchmark(model, settings, name=MODEL)
        for cell in report["results"]:
            rows.append(
                {
                    "skipped_layers": skip,
                    "capacity": 1 - skip / n_routed,
                    "context": cell["context"],
                    "batch": cell["batch"],
                    "speedup": cell["speedup"],
                    "kv_cache_bytes": {v: cell["variants"][v].get("kv_cache_bytes") for v in ("dense", "routed")},
                }
            )
            sp = cell["speedup"]
            print(
                f"skip {skip}: ctx {cell['context']} prefill {sp['prefill']['measured']:.3f} "
                f"(ideal {sp['prefill']['ideal']:.3f}) decode {sp['decode']['measured']:.3f} "
                f"(ideal {sp['decode']['ideal']:.3f})",
                flush=True,
            )
    from routertune.io_utils import atomic_write_text

    POINTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        POINTS_DIR / "speed.json",
        json.dumps({"rows": rows, "environment": report["environment"], "threads": args.threads}, indent=1) + "\n",
    )


def _points() -> dict[str, dict[str, Any]]:
    points = {}
    for path in sorted(POINTS_DIR.glob("*.json")):
        if path.name != "speed.json":
            record = json.loads(path.read_text())
            record["eval"] = _expand(record["eval"])
            points[record["point"]] = record
    return points


def _without_boolq(tasks: Any) -> list[str]:
    """The tasks other than BoolQ. BoolQ alone can move the average by 3 points: the dense model
    answers "no" to most questions (32% at 100 documents, majority class 62%), so anything that
    shifts its yes/no bias swings it; averages without it are reported beside the full ones."""
    return [t for t in tasks if t != "boolq"]


def _ideal(
    config: Any, per_layer: dict[str, float], context: int, granularity: str = "attn_sequence"
) -> dict[str, float]:
    """FLOP-ideal speedup of prefilling ``context`` tokens and decoding 32, at these capacities."""
    from routertune.benchmark.flops import ModelShape, ideal_speedup

    shape = ModelShape.from_config(config)
    caps = {int(k): v for k, v in per_layer.items()}
    return {
        phase: ideal_speedup(shape, granularity, caps, phase, context, 1, 32 if phase == "decode" else 1)
        for phase in ("prefill", "decode")
    }


def cmd_report(args: argparse.Namespace) -> None:
    from routertune.evaluation import paired_difference
    from routertune.io_utils import atomic_write_text

    points = _points()
    if "dense" not in points:
        raise SystemExit("no dense point yet: run `eval --points dense` first")
    dense = points["dense"]["eval"]
    speed_path = POINTS_DIR / "speed.json"
    speed = json.loads(speed_path.read_text())["rows"] if speed_path.exists() else []

    def speed_at(skip: int, context: int) -> dict[str, Any] | None:
        return next((r for r in speed if r["skipped_layers"] == skip and r["context"] == context), None)

    summary = []
    for name, record in points.items():
        ev = record["eval"]
        cap = ev["capacity"]["overall"] if ev["capacity"] else 1.0
        row: dict[str, Any] = {
            "point": name,
            "capacity": cap,
            "average": ev["average"]["value"],
            "per_task": {t: e.get(ev["average"]["metric_per_task"].get(t, "acc")) for t, e in ev["tasks"].items()},
            "documents": sum(e["samples"] for e in ev["tasks"].values()),
            "eval_seconds": record["seconds"],
        }
        rest = _without_boolq(ev["tasks"])
        row["average_without_boolq"] = sum(row["per_task"][t] for t in rest) / len(rest)
        if name != "dense":
            row["vs_dense"] = {k: v for k, v in paired_difference(dense, ev).items() if k != "tasks"}
            row["vs_dense_without_boolq"] = {
                k: v for k, v in paired_difference(dense, ev, rest).items() if k != "tasks"
            }
        if "ideal_speedup_512" in record:
            row["ideal_speedup_512"] = record["ideal_speedup_512"]
        # The speed row skipping the whole number of routed layers nearest to this share.
        skip = round((1 - cap) * len(ev["capacity"]["per_layer"])) if ev["capacity"] else 0
        for context in (512, 2048):
            measured = speed_at(skip, context)
            if measured is not None:
                row[f"speed_{context}"] = {
                    "skipped_layers": skip,
                    "prefill": measured["speedup"]["prefill"]["measured"],
                    "decode": measured["speedup"]["decode"]["measured"],
                    "prefill_ideal": measured["speedup"]["prefill"]["ideal"],
                    "decode_ideal": measured["speedup"]["decode"]["ideal"],
                }
        summary.append(row)
    summary.sort(key=lambda r: (r["point"] != "dense", -r["capacity"], r["point"]))

    # Routed vs attention drop: against the drop with the nearest compute at or above the routed
    # point's (routed winning there wins outright) and the nearest at or below it.
    comparisons = []
    drops = {n: p for n, p in points.items() if n.startswith(("drop:", "fixed:"))}
    drop_cap = {n: 1 - len(p["setup"]["dropped"]) / len(p["setup"]["candidates"]) for n, p in drops.items()}
    for name, record in points.items():
        # Other units' routers have their own baselines (benchmarks/granularity_table.py).
        if not name.startswith("routed") or not record["setup"].get("granularity", "attn_sequence").startswith("attn"):
            continue
        cap = record["eval"]["capacity"]["overall"]
        above = [n for n in drops if drop_cap[n] >= cap]
        below = [n for n in drops if drop_cap[n] <= cap]
        chosen = {
            "more compute": min(above, key=drop_cap.get, default=None),
            "less compute": max(below, key=drop_cap.get, default=None),
        }
        rest = _without_boolq(record["eval"]["tasks"])
        for side, drop in chosen.items():
            if drop is None:
                continue
            diff = paired_difference(drops[drop]["eval"], record["eval"])
            diff_rest = paired_difference(drops[drop]["eval"], record["eval"], rest)
            comparisons.append(
                {
                    "routed": name,
                    "routed_capacity": cap,
                    "drop": drop,
                    "drop_capacity": drop_cap[drop],
                    "drop_has": side,
                    "routed_minus_drop": diff["difference"],
                    "stderr": diff["stderr"],
                    "routed_minus_drop_without_boolq": diff_rest["difference"],
                    "stderr_without_boolq": diff_rest["stderr"],
                }
            )

    data = {
        "schema": "routertune.capacity_curve/1",
        "model": MODEL,
        "settings": dense["settings"],
        "points": summary,
        "routed_vs_drop": comparisons,
        "speed": speed,
    }
    atomic_write_text(POINTS_DIR.parent / f"{POINTS_DIR.name}.json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(POINTS_DIR.parent / f"{POINTS_DIR.name}.md", _markdown(data))
    _plot(data, POINTS_DIR.parent / f"{POINTS_DIR.name}.png")
    print(_markdown(data))


def _plot(data: dict[str, Any], path: Path) -> None:
    """Average accuracy against capacity, one line per method, over all nine tasks and without
    BoolQ; the speedup of skipping that share on a second x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "routed (route on context)": lambda p: p.startswith("routed:") and not p.endswith("@all"),
        "routed (route on context + answer)": lambda p: p.startswith("routed:") and p.endswith("@all"),
        "routed, trained on prompts": lambda p: p.startswith("routed-prompt:"),
        "routed, prompts + distillation": lambda p: p.startswith("routed-prompt-distill:"),
        "routed, prompts + distillation, seed 7": lambda p: p.startswith("routed-prompt-distill-seed7:"),
        "routed, prompts + distillation, gradient_scale 0.04": lambda p: p.startswith("routed-prompt-distill-gs04:"),
        "attention drop": lambda p: p.startswith("drop:"),
        "fixed drop (given layers)": lambda p: p.startswith("fixed:"),
    }
    panels = {
        "average, 9 tasks": ("average", "vs_dense"),
        "average without BoolQ, 8 tasks": ("average_without_boolq", "vs_dense_without_boolq"),
    }
    # The top axis shows the FLOP-ideal speedup of skipping that share: single measured cells of
    # this CPU run scatter by +-15% around it (see the table), while the implementation's
    # measured/ideal ratio is established by the longer runs of benchmarks/bench_skipping.py.
    speeds = {r["capacity"]: r["speedup"]["prefill"]["ideal"] for r in data["speed"] if r["context"] == 512}
    dense = next(r for r in data["points"] if r["point"] == "dense")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, (title, (key, err_key)) in zip(axes, panels.items(), strict=True):
        ax.axhline(100 * dense[key], color="black", lw=1, ls="--", label="dense")
        for label, chosen in series.items():
            rows = sorted((r for r in data["points"] if chosen(r["point"])), key=lambda r: r["capacity"])
            if rows:
                ax.errorbar(
                    [r["capacity"] for r in rows],
                    [100 * r[key] for r in rows],
                    yerr=[100 * r[err_key]["stderr"] for r in rows],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set_xlabel("capacity (share of routed attention computed, measured in the evaluation)", fontsize=8)
        ax.set_ylabel(f"{title} (points)")
        ax.grid(alpha=0.3)
        if speeds:
            top = ax.secondary_xaxis("top")
            ticks = sorted(speeds)
            top.set_ticks(ticks)
            top.set_xticklabels([f"{speeds[c]:.2f}x" for c in ticks], fontsize=7)
            top.set_xlabel("FLOP-ideal prefill speedup of skipping that share, 512 tokens", fontsize=8)
    axes[0].invert_xaxis()
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{data['model']}: error bars = paired standard error of the difference to dense", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(data: dict[str, Any]) -> str:
    pts = data["points"]
    tasks = list(pts[0]["per_task"])
    lines = [
        f"# Capacity curve: {data['model']}",
        "",
        "Written by `benchmarks/capacity_curve.py report`; the method and the commands are in that",
        "script's docstring, the discussion in docs/evaluation.md.",
        "",
        f"Documents per point: {pts[0]['documents']} (limit {data['settings']['limit']} per task, "
        f"{data['settings']['task_limits']} per MMLU subject). Average = mean of each task's primary "
        "metric (acc_norm for ARC, HellaSwag, OpenBookQA, PIQA; acc otherwise), in points (x100). "
        "Differences vs dense are paired over the same documents; +- is one standard error.",
        "",
        "Without BoolQ: the same over the other eight tasks (why: `_without_boolq` in the script).",
        "",
        "| point | capacity | average | vs dense | without BoolQ | vs dense | prefill 512 | decode 512 "
        "| FLOP ideal 512 (prefill/decode) | prefill 2048 | decode 2048 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pm(d: dict[str, float] | None) -> str:
        return f"{100 * d['difference']:+.2f} +- {100 * d['stderr']:.2f}" if d else ""

    for r in pts:
        vs_s = pm(r.get("vs_dense")) + f" | {100 * r['average_without_boolq']:.2f} | " + pm(r.get("vs_dense_without_boolq"))
        s512, s2048 = r.get("speed_512"), r.get("speed_2048")
        ideal = r.get("ideal_speedup_512")
        lines.append(
            f"| {r['point']} | {r['capacity']:.3f} | {100 * r['average']:.2f} | {vs_s} | "
            + (f"{s512['prefill']:.3f}x | {s512['decode']:.3f}x | " if s512 else "| | ")
            + (f"{ideal['prefill']:.3f}x / {ideal['decode']:.3f}x | " if ideal else "1 / 1 | ")
            + (f"{s2048['prefill']:.3f}x | {s2048['decode']:.3f}x |" if s2048 else " | |")
        )
    lines += [
        "",
        "Measured speedups are for skipping round((1 - capacity) x 16) routed attention layers on every",
        "input (batch 1, 32 decode steps, median of repeats, dense and skipping interleaved); FLOP ideal",
        "is at the point's own measured per-layer capacity. The dense row's speeds are routers attached",
        "but keeping everything (their overhead). Single cells scatter by up to +-15% around the ideal",
        "(3 repeats on a shared 2-core VM; CPU-time ratios agree with wall-clock, so it is not core",
        "contention); benchmarks/results/bench_skipping.md has the longer measured/ideal runs.",
        "",
        "## Routed vs attention drop",
        "",
        "Each routed point against the attention drop with the nearest compute at or above its own",
        "(routed ahead there: better at less compute) and at or below it.",
        "",
        "| routed | capacity | drop | capacity | drop has | routed - drop (points) | without BoolQ |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in data["routed_vs_drop"]:
        lines.append(
            f"| {c['routed']} | {c['routed_capacity']:.3f} | {c['drop']} | {c['drop_capacity']:.3f} | "
            f"{c['drop_has']} | {100 * c['routed_minus_drop']:+.2f} +- {100 * c['stderr']:.2f} | "
            f"{100 * c['routed_minus_drop_without_boolq']:+.2f} +- {100 * c['stderr_without_boolq']:.2f} |"
        )
    lines += ["", "## Per task", "", "| point | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for r in pts:
        lines.append(f"| {r['point']} | " + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval")
    ev.add_argument("--points", required=True)
    ev.add_argument("--routers", default=str(DEFAULT_ROUTERS))
    ev.add_argument("--limit", type=int, default=100)
    ev.add_argument("--mmlu_limit", type=int, default=2)
    ev.add_argument("--batch_size", type=int, default=8)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--force", action="store_true", help="re-evaluate points that already have a file")
    ev.add_argument(
        "--calibrate_on",
        choices=("prompt", "all"),
        default="prompt",
        help="tokens the routers decide on while calibrating routed:<C> points (the 914-document curve used 'all')",
    )
    ev.add_argument(
        "--route_on",
        default="prompt",
        choices=("prompt", "all"),
        help="what sequence routers decide on in lm-eval requests; 'all' points are labelled <point>@all",
    )
    sp = sub.add_parser("speed")
    sp.add_argument("--skips", default="0,2,4,6,8")
    sp.add_argument("--contexts", default="512,2048")
    sp.add_argument("--new_tokens", type=int, default=32)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = parser.parse_args(argv)
    {"eval": cmd_eval, "speed": cmd_speed, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
