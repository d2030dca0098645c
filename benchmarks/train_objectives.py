"""Compare router-training objectives (LM loss vs distillation ...) on held-out data.

    python benchmarks/train_objectives.py --run lm=runs/lm --run distill=runs/distill \\
        --validation_samples 100 --max_seq_length 256 --capacity 0.9

Each ``--run NAME=DIR`` is the output folder of a ``routertune train`` run made with
``--data_type builtin --validation_samples N`` (so the held-out examples are the last N of the
builtin mix, never trained on). For every run this measures, on those held-out examples:

* the routed LM loss and capacity with the thresholds the run trained with (``as_trained``);
* the routed LM loss after moving one global threshold so that the run keeps exactly
  ``--capacity`` of its routed units (``matched``): runs that ended at different capacities
  are then compared at the same amount of skipped work, which is what ranks their routers.
  The threshold is calibrated (``routertune.calibrate``, method ``global``) on builtin examples
  that are neither trained on nor held out.

The dense model's loss on the same examples is measured once. Results go to
benchmarks/results/train_objectives.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=DIR of a routertune train output")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--validation_samples", type=int, default=100)
    parser.add_argument("--calibration_samples", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--capacity", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train_objectives.json")
    parser.add_argument("--merge", action="store_true", help="add these runs to an existing --out report")
    args = parser.parse_args()

    import torch

    from routertune import load_routers
    from routertune.calibrate import calibrate_thresholds, make_batches
    from routertune.data import PaddingCollator, builtin_messages
    from routertune.io_utils import atomic_write_text
    from routertune.loading import load_model_and_tokenizer
    from routertune.training.data import encode, lm_loss_and_capacity

    torch.manual_seed(0)
    examples = builtin_messages()
    held_out = examples[-args.validation_samples :]
    end = len(examples) - args.validation_samples
    calibration = examples[end - args.calibration_samples : end]

    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu", progress=False)
    tokenizer.padding_side = "right"
    dataset = encode(held_out, tokenizer, args.max_seq_length, "held-out")
    collator = PaddingCollator.from_tokenizer(tokenizer)
    calib_batches = make_batches(
        tokenizer, calibration, batch_size=len(calibration), max_length=args.max_seq_length
    )
    report: dict = {
        "model": args.model,
        "held_out": f"last {args.validation_samples} builtin examples ({len(dataset)} with labels, "
        f"{dataset.num_label_tokens()} label tokens, max {args.max_seq_length} tokens)",
        "calibration": f"builtin examples [{end - args.calibration_samples}:{end}], method global",
        "matched_capacity": args.capacity,
        "dense_loss": lm_loss_and_capacity(model, dataset, collator, args.batch_size)["loss"],
        "runs": {},
    }
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if (
            previous.get("held_out") != report["held_out"]
            or previous.get("matched_capacity") != args.capacity
        ):
            raise SystemExit(f"{args.out} was measured on other held-out data or capacity; not merging")
        report["runs"] = previous["runs"]
    for spec in args.run:
        name, _, folder = spec.partition("=")
        results_file = Path(folder) / "train_results.json"
        trained = json.loads(results_file.read_text()) if results_file.is_file() else {}
        load_routers(model, folder)
        as_trained = lm_loss_and_capacity(model, dataset, collator, args.batch_size, routed=True)
        calibrate_thresholds(model, calib_batches, args.capacity, method="global")
        matched = lm_loss_and_capacity(model, dataset, collator, args.batch_size, routed=True)
        report["runs"][name] = {
            "folder": str(folder),
            "loss": trained.get("loss"),
            "optim": trained.get("optim"),
            "learning_rate": trained.get("learning_rate"),
            "steps": trained.get("steps"),
            "router_config": trained.get("router_config"),
            "as_trained": {
                "loss": as_trained["loss"],
                "capacity": as_trained["capacity"]["overall"],
                "per_layer": as_trained["capacity"]["per_layer"],
            },  # fmt: skip
            "matched": {
                "loss": matched["loss"],
                "capacity": matched["capacity"]["overall"],
                "per_layer": matched["capacity"]["per_layer"],
            },  # fmt: skip
        }
        print(
            name, json.dumps(report["runs"][name]["as_trained"]), json.dumps(report["runs"][name]["matched"])
        )
        from routertune import detach_routers

        detach_routers(model)
    report["load"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"dense {report['dense_loss']:.4f}; written {args.out}")


if __name__ == "__main__":
    main()
