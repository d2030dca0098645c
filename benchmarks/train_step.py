"""One router-only training step vs one full fine-tuning step, same model, same batch.

Also a router-only step with every routed unit skipped (threshold 2): training computes skipped
units anyway (their routers need a gradient), so it should cost what a step at capacity 1 costs.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --repeats 5
    python benchmarks/train_step.py --model ./my-llama --batch_size 4 --max_seq_length 512

Each measurement runs in a fresh process (so freed memory of one mode cannot inflate the other's
resident size), and the two modes alternate: router, full, router, full, ... Within a process the
model is built exactly as ``routertune train`` builds it (``build_model``: routers attached,
frozen by structure) and a ``RouterTrainer`` runs ``training_step`` (forward, loss, backward)
then ``optimizer.step()``: one warm-up step (it allocates the optimizer state), then the timed
steps. Peak memory is the process's peak resident set during a timed step (VmHWM, reset before
the step through /proc/self/clear_refs), so it includes the weights, gradients and optimizer
state the mode keeps, plus the step's activations. The machine's load (``uptime``) is recorded
because other jobs share the CPU; compare the ratios, which are measured under the same load.

Results go to benchmarks/results/train_step.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "train_step.json"
MODES = ("router", "full", "router_skip_all")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(args: argparse.Namespace) -> dict:
    """Runs in a child process: build, one warm-up step, ``--steps`` timed steps of one mode."""
    import torch

    from routertune.data import PaddingCollator, builtin_messages, encode_examples
    from routertune.training.arguments import parse_args
    from routertune.training.run import build_model
    from routertune.training.trainer import RouterTrainer

    torch.manual_seed(0)
    argv = [
        "--model_name_or_path", args.model,
        "--router_only", str(args.mode != "full"),
        "--threshold", "2.0" if args.mode == "router_skip_all" else "0.5",
        "--granularity", args.granularity,
        "--output_dir", "/tmp/routertune-bench-train-step",
        "--per_device_train_batch_size", str(args.batch_size),
        "--use_cpu",
        "--disable_tqdm", "True",
        "--report_to", "none",
        "--save_strategy", "no",
    ]  # fmt: skip
    config = parse_args(argv)
    model, routed, tokenizer = build_model(config, progress=False)
    encoded = encode_examples(builtin_messages(args.batch_size * 4), tokenizer, args.max_seq_length).examples
    batch = PaddingCollator.from_tokenizer(tokenizer)(encoded[: args.batch_size])
    trainer = RouterTrainer(
        model=model, args=config.training, routed_model=routed, router_only=config.training.router_only
    )
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    def step() -> float:
        start = time.perf_counter()
        trainer.training_step(model, dict(batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers, as a training loop does
        return time.perf_counter() - start

    step()  # warm-up: allocates gradients and optimizer state
    times, peaks, before = [], [], []
    for _ in range(args.steps):
        before.append(_rss_kb("VmRSS"))
        _reset_peak()
        times.append(step())
        peaks.append(_rss_kb("VmHWM"))
    return {
        "mode": args.mode,
        "optimizer": type(optimizer).__name__,
        "last_loss": float(trainer.training_step(model, dict(batch))),
        "step_s": times,
        "peak_rss_mb": [p / 1024 for p in peaks],
        "rss_before_step_mb": [b / 1024 for b in before],
        "trainable_parameters": trainable,
        "optimizer_state_tensors": sum(len(s) for s in optimizer.state.values()),
        "batch_shape": list(batch["input_ids"].shape),
        "tokens": int(batch["attention_mask"].sum()),
        "torch_threads": torch.get_num_threads(),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--granularity", default="attn_sequence")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="processes per mode, alternating")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.mode = args.worker
        args.result.write_text(json.dumps(worker(args)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load_before = uptime()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            result = args.out.with_suffix(f".{mode}.{r}.tmp.json")
            cmd = [sys.executable, __file__, "--worker", mode, "--result", str(result)]
            cmd += [
                "--model",
                args.model,
                "--granularity",
                args.granularity,
                "--batch_size",
                str(args.batch_size),
            ]
            cmd += ["--max_seq_length", str(args.max_seq_length), "--steps", str(args.steps)]
            subprocess.run(cmd, check=True)
            runs[mode].append(json.loads(result.read_text()))
            result.unlink()
            last = runs[mode][-1]
            print(f"repeat {r} {mode}: step {statistics.median(last['step_s']):.3f} s, "
                  f"peak RSS {max(last['peak_rss_mb']):.0f} MB", file=sys.stderr)  # fmt: skip
    load_after = uptime()

    summary = {}
    for mode, rs in runs.items():
        times = [t for r in rs for t in r["step_s"]]
        peaks = [p for r in rs for p in r["peak_rss_mb"]]
        summary[mode] = {
            "median_step_s": statistics.median(times),
            "min_step_s": min(times),
            "median_peak_rss_mb": statistics.median(peaks),
            "optimizer": rs[0]["optimizer"],
            "loss_after_timed_steps": rs[0]["last_loss"],
            "trainable_parameters": rs[0]["trainable_parameters"],
            "optimizer_state_tensors": rs[0]["optimizer_state_tensors"],
            "step_s": times,
            "peak_rss_mb": peaks,
        }
    report = {
        "benchmark": "one training step (forward + loss + backward + AdamW step), same batch",
        "model": args.model,
        "granularity": args.granularity,
        "batch_shape": runs["router"][0]["batch_shape"],
        "tokens": runs["router"][0]["tokens"],
        "repeats": args.repeats,
        "timed_steps_per_process": args.steps,
        "OMP_NUM_THREADS": threads,
        "torch_threads": runs["router"][0]["torch_threads"],
        "load_before": load_before,
        "load_after": load_after,
        "router_only": summary["router"],
        "full_finetuning": summary["full"],
        "router_only_every_unit_skipped": summary["router_skip_all"],
        "ratios": {
            "time_router_skip_all_over_router_only": summary["router_skip_all"]["median_step_s"]
            / summary["router"]["median_step_s"],
            "time_full_over_router_only": summary["full"]["median_step_s"]
            / summary["router"]["median_step_s"],
            "peak_memory_full_over_router_only": summary["full"]["median_peak_rss_mb"]
            / summary["router"]["median_peak_rss_mb"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from routertune.io_utils import atomic_write_text

    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratios", "load_before", "load_after")}, indent=2))


if __name__ == "__main__":
    main()
