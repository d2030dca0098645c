"""vLLM serving benchmark: dense vs routed vs the deleted-layer oracle, in the serving environment.

    .venv-serve/bin/python benchmarks/bench_vllm.py                    # the recorded run
    .venv-serve/bin/python benchmarks/bench_vllm.py --quick            # a smoke run (minutes)

SmolLM2-135M (float32), 16 routed attention layers (13..28) of which the deepest 8 (21..28) are
skipped: routers with zero weights (score 0.5 for every request) and per-layer thresholds 0 (keep)
or 2 (skip), so every request takes the same route and the oracle is well defined: vLLM's own
model with those 8 attention sub-layers removed (an attention that returns zeros, nothing else).

Engines (each in its own process, all with vLLM's default compilation, chunked prefill and prefix
caching off so that every engine schedules alike):
  dense    vLLM's LlamaForCausalLM on the plain folder
  routed   routertune's served folder; requests take the router files' route ("routed"), are all
           dense ("routers_on": the routers' overhead), or half of them are dense ("mixed")
  oracle   the same 8 attention sub-layers deleted
Each cell (prompt length x batch) runs every variant once per repeat, in rotated order: time to
first token (a generate of 1 token for the whole batch) and the generate of --new_tokens; output
tokens/s = batch * new_tokens / time, decode tokens/s from the difference. Median of repeats.
Writes benchmarks/results/bench_vllm.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache" / "routertune" / "models" / "smollm2-135m-instruct"
ROUTED = list(range(13, 29))
SKIPPED = list(range(21, 29))
ORACLE_ARCH = "RoutertuneOracleLlamaForCausalLM"


# ---- folders ----------------------------------------------------------------------------


def write_routers(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"layers.{i}.weight": torch.zeros(1, hidden) for i in ROUTED}, str(folder / "routers.safetensors")
    )
    meta = {
        "router_config": {
            "granularity": "attn_sequence",
            "router_layers": len(ROUTED),
            "threshold": 0.5,
            "layer_thresholds": {str(i): (2.0 if i in SKIPPED else 0.0) for i in ROUTED},
        },
        "routed_layers": ROUTED,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "model_type": "llama",
    }
    (folder / "router_config.json").write_text(json.dumps(meta))
    return folder


def write_oracle_folder(model: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        if entry.name != "config.json":
            (out / entry.name).symlink_to(entry)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = [ORACLE_ARCH]
    config["routertune_oracle_deleted"] = SKIPPED
    (out / "config.json").write_text(json.dumps(config))
    return out


# ---- the oracle model (benchmark only) --------------------------------------------------------


def register_oracle() -> None:
    import torch
    from torch import nn
    from vllm import ModelRegistry
    from vllm.model_executor.models.llama import LlamaForCausalLM

    class DeletedAttention(nn.Module):
        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(hidden_states)

    class OracleLlamaForCausalLM(LlamaForCausalLM):
        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.deleted = list(vllm_config.model_config.hf_config.routertune_oracle_deleted)
            for i in self.deleted:
                self.model.layers[i].self_attn = DeletedAttention()

        def load_weights(self, weights):
            prefixes = tuple(f"model.layers.{i}.self_attn." for i in self.deleted)
            return super().load_weights((n, w) for n, w in weights if not n.startswith(prefixes))

    ModelRegistry.register_model(ORACLE_ARCH, OracleLlamaForCausalLM)


# ---- engine processes ---------------------------------------------------------------------------


def engine_main(conn, name: str, folder: str, kwargs: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = (
        "0"  # the engine in this process (the oracle is registered here)
    )
    from vllm import LLM, SamplingParams

    register_oracle()
    start = time.perf_counter()
    llm = LLM(model=folder, **kwargs)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    conn.send({"start_s": time.perf_counter() - start, "kv_blocks": blocks})
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        if cmd == "stats":  # routertune's counters (routed engine): time in the ops and in attention
            conn.send(llm.collective_rpc("routertune_stats")[0])
            continue
        params = []
        for extra in cmd["extra_args"]:
            params.append(
                SamplingParams(
                    max_tokens=cmd["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=extra
                )
            )
        prompts = [{"prompt_token_ids": p} for p in cmd["prompts"]]
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        conn.send(
            {
                "wall_s": wall,
                "cpu_s": time.process_time() - cpu0,
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
            }
        )


class Engine:
    def __init__(self, name: str, folder: str, kwargs: dict) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(child, name, folder, kwargs), daemon=True)
        self.proc.start()
        self.info = self.conn.recv()

    def generate(self, prompts, max_tokens: int, extra_args) -> dict:
        self.conn.send({"prompts": prompts, "max_tokens": max_tokens, "extra_args": extra_args})
        return self.conn.recv()

    def stats(self) -> dict:
        self.conn.send("stats")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


# ---- the run -----------------------------------------------------------------------------------


def variant_args(variant: str, batch: int) -> list:
    if variant == "routers_on":
        return [{"routertune_dense": True}] * batch
    if variant == "mixed":
        return [{"routertune_dense": True} if r % 2 else None for r in range(batch)]
    return [None] * batch


VARIANTS = {
    "dense": "dense",
    "routed": "routed",
    "routers_on": "routed",
    "mixed": "routed",
    "oracle": "oracle",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--cells", default="512x1,512x8,512x32,2048x1,2048x8")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    ap.add_argument("--quick", action="store_true", help="one small cell, one repeat, eager")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_vllm")
    args = ap.parse_args()
    if args.quick:
        args.cells, args.repeats, args.new_tokens, args.eager = "128x1,128x4", 1, 8, True
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

    import torch
    import vllm

    from routertune.serving.folder import prepare_served_folder, read_model_config

    config = read_model_config(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    routers = write_routers(work / "routers", config["hidden_size"], config["num_hidden_layers"])
    folders = {
        "dense": str(args.model),
        "routed": str(prepare_served_folder(args.model, routers, work / "served")),
        "oracle": str(write_oracle_folder(args.model, work / "oracle")),
    }
    longest = max(c for c, _ in cells) + args.new_tokens
    kwargs = dict(
        dtype="float32",
        max_model_len=longest,
        max_num_batched_tokens=max(longest, 16384),
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        enforce_eager=args.eager,
        seed=0,
    )
    load_before = os.getloadavg()
    engines = {}
    for name, folder in folders.items():
        extra = {"worker_cls": "routertune.serving.vllm_worker.RoutedWorker"} if name == "routed" else {}
        engines[name] = Engine(name, folder, {**kwargs, **extra})
        print(f"{name}: started in {engines[name].info['start_s']:.0f} s", file=sys.stderr, flush=True)

    g = torch.Generator().manual_seed(0)
    results = []
    try:
        for context, batch in cells:
            prompts = [
                torch.randint(3, config["vocab_size"], (context,), generator=g).tolist() for _ in range(batch)
            ]
            runs: dict[str, list] = {v: [] for v in VARIANTS}
            tokens: dict[str, list] = {}
            order = list(VARIANTS)
            for rep in range(args.repeats):
                for variant in order[rep % len(order) :] + order[: rep % len(order)]:
                    engine = engines[VARIANTS[variant]]
                    extra = variant_args(variant, batch)
                    first = engine.generate(prompts, 1, extra)
                    before = engine.stats() if VARIANTS[variant] == "routed" else None
                    full = engine.generate(prompts, args.new_tokens, extra)
                    routing = None
                    if before is not None:  # seconds routing (in the ops, outside vLLM's attention)
                        after = engine.stats()
                        routing = (after["op_seconds"] - after["attention_seconds"]) - (
                            before["op_seconds"] - before["attention_seconds"]
                        )
                    runs[variant].append((first["wall_s"], full["wall_s"], full["cpu_s"], routing))
                    tokens[variant] = full["tokens"]
            cell = {"context": context, "batch": batch, "new_tokens": args.new_tokens, "variants": {}}
            for variant, rs in runs.items():
                ttft = statistics.median(r[0] for r in rs)
                total = statistics.median(r[1] for r in rs)
                decode = statistics.median(batch * (args.new_tokens - 1) / max(r[1] - r[0], 1e-9) for r in rs)
                cell["variants"][variant] = {
                    "ttft_s": ttft,
                    "total_s": total,
                    "output_tok_s": batch * args.new_tokens / total,
                    "decode_tok_s": decode,
                    "cpu_s": statistics.median(r[2] for r in rs),
                    # Share of the generate's time spent routing (decisions, slicing, gather and
                    # scatter, op dispatch); routed-engine variants only.
                    "routing_share": None if rs[0][3] is None else statistics.median(r[3] / r[1] for r in rs),
                    "runs": rs,
                }
            cell["routed_tokens_equal_oracle"] = tokens["routed"] == tokens["oracle"]
            cell["routers_on_tokens_equal_dense"] = tokens["routers_on"] == tokens["dense"]
            results.append(cell)
            print(json.dumps({k: v for k, v in cell.items() if k != "variants"}), file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    record = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "threads_per_engine": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model": str(args.model),
        "routed_layers": ROUTED,
        "skipped_layers": SKIPPED,
        "compiled": not args.eager,
        "repeats": args.repeats,
        "engines": {k: e.info for k, e in engines.items()},
        "cells": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gain_share(v: dict, variant: str, key: str, ideal: float = 1.0) -> float:
    """Share of the oracle's gain over dense that ``variant`` reaches (``ideal`` scales the
    oracle's gain: 0.5 for the mixed batch, half of whose requests skip)."""
    dense, oracle, got = v["dense"][key], v["oracle"][key], v[variant][key]
    target = dense + ideal * (oracle - dense)
    return (got - dense) / (target - dense) if target != dense else float("nan")


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# vLLM serving: dense vs routed vs oracle (SmolLM2-135M, float32)",
        "",
        f"vLLM {record['vllm']}, torch {record['torch']}, {'compiled' if record['compiled'] else 'eager'}; "
        f"{m['processor']}, {m['cores']} cores, engine threads bound to {m['threads_per_engine']}; load "
        f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after; median of {record['repeats']}.",
        f"Attention of layers {record['skipped_layers'][0]}..{record['skipped_layers'][-1]} skipped (8 of the 16 "
        "routed, 8 of 30 layers); `mixed`: half of the requests dense. KV blocks allocated per engine: "
        + ", ".join(f"{k} {e['kv_blocks']}" for k, e in record["engines"].items())
        + ".",
        "",
        "| prompt x batch | dense out tok/s | routed / dense | oracle / dense | routed share of oracle gain "
        "| mixed share of its ideal | routers-on / dense | TTFT dense s | TTFT routed / oracle / dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in record["cells"]:
        v = c["variants"]
        d = v["dense"]["output_tok_s"]
        lines.append(
            f"| {c['context']} x {c['batch']} | {d:.1f} | {v['routed']['output_tok_s'] / d:.3f} | "
            f"{v['oracle']['output_tok_s'] / d:.3f} | {gain_share(v, 'routed', 'output_tok_s'):.2f} | "
            f"{gain_share(v, 'mixed', 'output_tok_s', 0.5):.2f} | {v['routers_on']['output_tok_s'] / d:.3f} | "
            f"{v['dense']['ttft_s']:.2f} | {v['routed']['ttft_s'] / v['dense']['ttft_s']:.3f} / "
            f"{v['oracle']['ttft_s'] / v['dense']['ttft_s']:.3f} |"
        )
    shares = [
        f"{c['context']} x {c['batch']}: routed {c['variants']['routed']['routing_share']:.3f}, mixed "
        f"{c['variants']['mixed']['routing_share']:.3f}, routers-on {c['variants']['routers_on']['routing_share']:.3f}"
        for c in record["cells"]
        if c["variants"]["routed"].get("routing_share") is not None
    ]
    if shares:
        lines += [
            "",
            "Share of the generate time spent routing (inside the ops, outside vLLM's attention): "
            + "; ".join(shares)
            + ".",
        ]
    lines += [
        "",
        "Routed tokens = oracle tokens in every cell: "
        + str(all(c["routed_tokens_equal_oracle"] for c in record["cells"]))
        + "; routers-on tokens = dense tokens: "
        + str(all(c["routers_on_tokens_equal_dense"] for c in record["cells"]))
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
