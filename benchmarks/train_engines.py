"""Peak memory per process and step time of the training engines, on the default model.

    .venv/bin/python benchmarks/train_engines.py                 # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/train_engines.py --engines zero2,zero3 --steps 4

Each engine trains the same routers (SmolLM2-135M-Instruct, builtin data, the same seed, a global
batch of 8) with 2 processes on this machine's CPU over gloo; one process with 2 accumulation
steps is the reference the routers are compared with. Every run is its own `accelerate launch`
(an engine cannot be switched inside one process), one after the other, so the step times carry
the machine's drift between runs: read them as rough, the memory as exact. Peak memory is each
process's resident-set high-water mark (VmHWM: the frozen weights, the routers, activations, the
Python and torch runtime) and the parameter storage it holds (its ZeRO-3 partition, else whole
parameters), as routertune train records them in train_results.json.

Results: benchmarks/results/train_engines.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = {
    "ddp": ("cpu_2proc.yaml", ["--use_cpu"]),
    "zero2": ("deepspeed_zero2.yaml", ["--ddp_backend", "gloo"]),
    "zero3": ("deepspeed_zero3.yaml", ["--ddp_backend", "gloo"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(engine: str, out: Path, steps: int, samples: int, seq: int) -> dict:
    args = [
        "-m", "routertune.train", "--model_name_or_path", "smollm2-135m-instruct", "--data_type", "builtin",
        "--max_train_samples", str(samples), "--max_seq_length", str(seq), "--per_device_train_batch_size", "4",
        "--max_steps", str(steps), "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "True",
        "--output_dir", str(out), "--overwrite_output_dir", "True", "--save_strategy", "no",
    ]  # fmt: skip
    if engine == "single":
        cmd = [sys.executable, *args, "--use_cpu", "--gradient_accumulation_steps", "2"]
    else:
        config, extra = CONFIGS[engine]
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "configs" / "accelerate" / config), "--num_processes", "2",
               "--main_process_port", str(free_port()), *args, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-4000:]}")
    results = json.loads((out / "train_results.json").read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="ddp,zero2,zero3")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--work", default="/tmp/routertune-train-engines")
    a = parser.parse_args()
    from safetensors.torch import load_file

    work = Path(a.work)
    runs = {}
    for engine in ["single", *a.engines.split(",")]:
        print(f"training with {engine} ...", file=sys.stderr, flush=True)
        load_start = os.getloadavg()
        r = train(engine, work / engine, a.steps, a.samples, a.max_seq_length)
        weights = load_file(str(work / engine / "routers.safetensors"))
        runs[engine] = {
            "processes": r["processes"],
            "peak_memory_mib_per_process": [round(b / 2**20, 1) for b in r["peak_memory_bytes_per_process"]],
            "parameter_mib_per_process": [round(b / 2**20, 1) for b in r["parameter_bytes_per_process"]],
            "train_runtime_s": r["train_metrics"]["train_runtime"],
            "s_per_step": r["train_metrics"]["train_runtime"] / r["steps"],
            "launch_to_exit_s": round(r["wall_s"], 1),
            "train_loss": r["train_metrics"]["train_loss"],
            "load_average": [list(load_start), list(os.getloadavg())],
            "weights": weights,
        }
    reference = runs["single"]["weights"]
    for run in runs.values():
        w = run.pop("weights")
        run["router_max_abs_diff_vs_single"] = max(float((w[k] - reference[k]).abs().max()) for k in w)
    report = {
        "model": "smollm2-135m-instruct (float32, 134.5M parameters, 538 MB of weights)",
        "settings": {"steps": a.steps, "samples": a.samples, "max_seq_length": a.max_seq_length,
                     "global_batch": 8, "threads_per_process": 1, "cpu_count": os.cpu_count()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_engines.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| engine | processes | parameters held, MiB per process | peak RSS, MiB per process | s / step "
        "| train loss | routers vs one process |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['processes']} | {' / '.join(map(str, run['parameter_mib_per_process']))} "
            f"| {' / '.join(map(str, run['peak_memory_mib_per_process']))} "
            f"| {run['s_per_step']:.2f} | {run['train_loss']:.4f} | {run['router_max_abs_diff_vs_single']:.1e} |"
        )
    (RESULTS / "train_engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
