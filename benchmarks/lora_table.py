"""The LoRA table: routers alone, LoRA alone and LoRA + routers on the default model, with the
same data and the same steps.

    # 1. train the two LoRA rows (routers alone is the recorded default run)
    OMP_NUM_THREADS=2 python benchmarks/lora_table.py train
    # 2. evaluate each on the limit-400 sample (3,432 documents; ~25 min per point on one thread),
    #    and the attention drop of LoRA + routers' compute
    OMP_NUM_THREADS=1 python benchmarks/lora_table.py eval
    # 3. speed of LoRA + routers at 512 and 2048 tokens (alone, on a quiet machine)
    OMP_NUM_THREADS=2 python benchmarks/lora_table.py speed --threads 2
    # 4. results/lora_table.{json,md}
    python benchmarks/lora_table.py report

Rows (each: the first 1,000 builtin examples, 512 tokens, batch 8, one epoch of 124 steps, seed
42; the flags of granularity_table.TRAIN_FLAGS, attn_sequence):
* ``routers``: the default router-only run (results/routers-smollm2-attn_sequence; SGD 0.1);
* ``lora``: ``--use_lora --threshold 0``: LoRA alone. The routers are fixed to keep every unit:
  their straight-through gate's forward value is exactly 1, so the LoRA sees the gradients it
  would see without routers, and at inference the routers are never scored (the model is the
  plain model with the LoRA merged);
* ``lora-routers``: ``--use_lora``: LoRA + routers, trained together.
Both LoRA rows use ``--use_lora``'s defaults (AdamW 2e-4 for everything trained, r 8, alpha 16,
dropout 0.05, all seven projections). ``load_routers`` merges a row's adapter into the weights
before attaching its routers, so evaluation and speed run the model that was trained.

Evaluation and speed as in benchmarks/granularity_table.py (same documents, paired differences;
the points of results/capacity_curve_400/ are reused). LoRA alone runs at dense speed by
construction (merged weights, no routing); LoRA + routers is timed by skipping its share.

Paper (Router-Tuning / MindSkip, EMNLP 2025, Llama-3-8B): LoRA alone 71.0 at 1.00x, LoRA +
routers 70.9 at 1.21x (dense 69.7).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import granularity_table as table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Router-only's optimizer flags; the LoRA rows take --use_lora's defaults instead.
ROUTER_ONLY_OPTIMIZER = ("--optim", "sgd", "--learning_rate", "0.1")
ROWS = {
    "routers": {"label": "routed-attn_sequence:native", "flags": None},
    "lora": {"label": "routed-lora:native", "flags": ["--use_lora", "--threshold", "0"]},
    "lora-routers": {"label": "routed-lora-routers:native", "flags": ["--use_lora"]},
}
PAPER = {"model": "Llama-3-8B", "dense": 69.7, "rows": {"lora": (71.0, 1.00), "lora-routers": (70.9, 1.21)}}


def _lora_flags(extra: list[str], max_train_samples: int) -> list[str]:
    flags = list(table.TRAIN_FLAGS)
    for name in ROUTER_ONLY_OPTIMIZER[::2]:
        i = flags.index(name)
        del flags[i : i + 2]
    return [*flags, "--max_train_samples", str(max_train_samples), "--granularity", "attn_sequence", *extra]


def _folder(args: argparse.Namespace, row: str) -> Path:
    name = "attn_sequence" if row == "routers" else row
    return Path(args.routers.format(granularity=name))


def cmd_train(args: argparse.Namespace) -> None:
    for row, spec in ROWS.items():
        folder = _folder(args, row)
        if spec["flags"] is None or (folder / "routers.safetensors").exists():
            print(f"{row}: {folder} {'exists' if folder.exists() else 'is trained by granularity_table.py'}")
            continue
        flags = _lora_flags(spec["flags"], args.max_train_samples)
        table.train_into(args.model, flags, Path(args.run_dir) / row, folder, row)


def cmd_eval(args: argparse.Namespace) -> None:
    ensure = table.PointEvaluator(args).ensure
    ensure("dense", "dense", Path())
    for row, spec in ROWS.items():
        folder = _folder(args, row)
        if not (folder / "routers.safetensors").exists():
            print(f"{row}: no routers in {folder} (run `train` first), skipped")
            continue
        routed = ensure(spec["label"], "routed:native", folder)
        n_drop = table._n_drop(routed)
        if row == "lora-routers" and n_drop:
            ensure(
                table._drop_label("attn_sequence", n_drop), table._drop_label("attn_sequence", n_drop), Path()
            )


def cmd_speed(args: argparse.Namespace) -> None:
    from routertune.io_utils import atomic_write_text
    from routertune.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.points_dir) / "speed-lora-routers.json"
    routed = table._find(args, ROWS["lora-routers"]["label"])
    if out.exists() and not args.force:
        print(f"{out} exists, skipped")
        return
    if routed is None:
        raise SystemExit("LoRA + routers is not evaluated yet (its capacity sets the skipped share)")
    model, _ = load_model_and_tokenizer(args.model, progress=False)
    record = table.speed_record(model, _folder(args, "lora-routers"), routed, args)
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")


def _find(args: argparse.Namespace, label: str) -> dict[str, Any] | None:
    """A point of this table, of the capacity curve, or of the six-granularity table (whose
    attention drops and default router row this table shares)."""
    return table._find(args, label) or table._find(
        argparse.Namespace(points_dir=args.table_dir, curve_dir=args.curve_dir), label
    )


def cmd_report(args: argparse.Namespace) -> None:

    dense = table._find(args, "dense")
    if dense is None:
        raise SystemExit("no dense point yet: run `eval` first")
    records = {row: table._find(args, spec["label"]) for row, spec in ROWS.items()}
    rows = []
    for row, record in records.items():
        entry: dict[str, Any] = {"row": row, "paper": PAPER["rows"].get(row)}
        trained = _folder(args, row) / "train_results.json"
        if trained.exists():
            t = json.loads(trained.read_text())
            entry["train"] = {
                k: t.get(k) for k in ("steps", "optim", "learning_rate", "use_lora", "wall_time_s")
            }
        if record is not None:
            entry.update(
                capacity=table._capacity(record),
                average=record["eval"]["average"]["value"],
                vs_dense=table._difference(dense, record),
            )
            if row != "lora" and records["lora"] is not None:
                entry["vs_lora"] = table._difference(records["lora"], record)
            n_drop = table._n_drop(record)
            drop = dense if n_drop == 0 else _find(args, table._drop_label("attn_sequence", n_drop))
            entry["drop"] = table._drop_label("attn_sequence", n_drop) if n_drop else "dense"
            if drop is not None:
                entry["vs_drop"] = table._difference(drop, record)
        speed_path = {
            "lora-routers": Path(args.points_dir) / "speed-lora-routers.json",
            "routers": Path(args.table_dir) / "speed-attn_sequence.json",  # the table's default row
        }.get(row)
        if speed_path is not None and speed_path.exists():
            speed = json.loads(speed_path.read_text())
            entry["speed"] = {str(c["context"]): {p: c["speedup"][p]["measured"] for p in ("prefill", "decode")}
                              for c in speed["cells"]}  # fmt: skip
        rows.append(entry)
    data = {
        "schema": "routertune.lora_table/1",
        "model": args.model,
        "documents": sum(t["samples"] for t in dense["eval"]["tasks"].values()),
        "dense_average": dense["eval"]["average"]["value"],
        "paper": {"model": PAPER["model"], "dense": PAPER["dense"]},
        "rows": rows,
    }
    table.write_table(Path(args.output), data, markdown)


def markdown(data: dict[str, Any]) -> str:
    """One row per training recipe; every number is one of ``data``'s."""
    diff = table._diff
    contexts = sorted({c for r in data["rows"] for c in r.get("speed", {})}, key=int) or ["512", "2048"]
    lines = [
        f"# LoRA table: {data['model']}",
        "",
        "Written by `benchmarks/lora_table.py report`; method and commands in its docstring.",
        "",
        f"{data['documents']} documents; dense average {table._points(data['dense_average'])}. Points, paired "
        "differences +- one standard error; speed: measured, batch 1 (LoRA alone: dense by construction).",
        "",
        "| row | capacity | average | vs dense | vs LoRA alone | vs the attention drop of its compute | "
        + " | ".join(f"{p} {c}" for c in contexts for p in ("prefill", "decode"))
        + f" | paper: average (dense {data['paper']['dense']}) | paper: speedup |",
        "|---" * (8 + 2 * len(contexts)) + "|",
    ]
    for r in data["rows"]:
        paper = f"{r['paper'][0]:.1f} | {r['paper'][1]:.2f}x" if r["paper"] else "- | -"
        if "average" not in r:
            cells = ["not run"] * 5
        else:
            cells = [
                f"{r['capacity']:.3f}",
                table._points(r["average"]),
                diff(r["vs_dense"]),
                diff(r["vs_lora"]) if "vs_lora" in r else "-",
                f"{diff(r.get('vs_drop'))} ({r['drop']})",
            ]
        if r["row"] == "lora" and "average" in r:
            speeds = ["1.000x (dense)"] * (2 * len(contexts))
        else:
            speeds = [f"{r['speed'][c][p]:.3f}x" if c in r.get("speed", {}) else "not run"
                      for c in contexts for p in ("prefill", "decode")]  # fmt: skip
        lines.append("| " + " | ".join([r["row"], *cells, *speeds, paper]) + " |")
    lines += ["", f"Paper: {data['paper']['model']}, eight-task lm-eval average.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    table.add_common_arguments(parser, "lora_table")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--run_dir", default="runs/lora_table")
    tr.add_argument("--max_train_samples", type=int, default=1000)
    table.add_eval_arguments(sub.add_parser("eval"))
    table.add_speed_arguments(sub.add_parser("speed"))
    rp = sub.add_parser("report")
    rp.add_argument("--output", default=str(RESULTS / "lora_table"))
    rp.add_argument("--table_dir", default=str(RESULTS / "granularity_table"),
                    help="points and speed cells of benchmarks/granularity_table.py, reused")  # fmt: skip
    args = parser.parse_args(argv)
    {"train": cmd_train, "eval": cmd_eval, "speed": cmd_speed, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
