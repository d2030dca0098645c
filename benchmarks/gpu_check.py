"""The prepared GPU check (run by benchmarks/gpu_check.sh): exactness, eager and compiled speed,
training step, on a random Llama-3-8B shape in bf16 (a 1B shape for training).

    python benchmarks/gpu_check.py                     # CUDA, the real shapes (budget: under 8 minutes)
    python benchmarks/gpu_check.py --tiny --device cpu # the same code path at a toy shape (CPU test)

Sections, each recorded in the JSON as soon as it finishes (a timeout keeps what is done):

1. exact: greedy tokens of the dense model, routers on at threshold 0 (must equal dense), the
   deepest half of the routed layers forced to skip, and the model with those attention
   sub-layers deleted (must equal the skipping one); bf16, batch 2, left padding.
2. kernels: per attention kernel (sdpa, eager, flex_attention, flash_attention_2 where
   flash-attn is installed), on the 1B shape: routers on = dense tokens, skipping = deleted, and
   a left-padded batch whose rows take different routes = each row alone (``kernels``).
3. eager: ``run_benchmark`` (dense, routed, oracle): prefill and decode tok/s, KV bytes.
4. train: one router-only vs one full fine-tuning step (forward, backward, AdamW step) on the
   1B shape, time and peak GPU memory.
5. compiled (last: compiling is the slow part): ``run_compiled_benchmark`` at 2048 tokens,
   batch 1 and 8: dense eager/compiled, routed compiled (forced route: deleted sub-layers in the
   graph), the same route scored (ops in the graph), oracle compiled.

Writes ``benchmarks/results/gpu_check.json`` (``--out``) and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from routertune import RouterConfig, attach_routers
from routertune.benchmark import BenchSettings, build_random_model
from routertune.benchmark.compiled import compiled_results_table, run_compiled_benchmark
from routertune.benchmark.environment import environment
from routertune.benchmark.suite import run_benchmark
from routertune.benchmark.tables import results_table
from routertune.benchmark.variants import deleted_copy, force_skip
from routertune.io_utils import atomic_write_text
from routertune.routing.attach import detach_routers, router_parameters, set_thresholds

RESULTS = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model, ids, mask, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :].cpu()


def exactness(model, device: torch.device, n: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # left padding
    ids, mask = ids.to(device), mask.to(device)
    plain = detach_routers(copy.deepcopy(model))
    dense = _greedy(plain, ids, mask, n)
    set_thresholds(model, 0.0)
    routers_on = _greedy(model, ids, mask, n)
    skipped = force_skip(model, 0.5)
    skipping = _greedy(model, ids, mask, n)
    deleted = _greedy(deleted_copy(plain, skipped, "attn"), ids, mask, n)
    return {
        "routers_on_equals_dense": bool(torch.equal(routers_on, dense)),
        "skipping_equals_deleted": bool(torch.equal(skipping, deleted)),
        "skipped_layers": skipped,
        "new_tokens": n,
    }


KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def kernels(
    preset: str, device: torch.device, dtype: torch.dtype, names: tuple[str, ...] = KERNELS, n: int = 8
) -> dict[str, Any]:
    """Per attention kernel a user can pick, on ``preset``: routers on (threshold 0) give the
    dense greedy tokens; the deepest half skipped gives the tokens of the model with those
    attentions deleted; and in a left-padded batch whose two rows take different forced routes
    (every routed layer: one row keeps, the other skips), each row's tokens equal that row run
    alone with its route (the mixed layers run their attention on the kept row only). A kernel
    that cannot be set here (flash-attn not installed, ...) is recorded with the reason."""
    from routertune.routing.attach import forced_routes, routed_layers

    g = torch.Generator().manual_seed(2)
    out: dict[str, Any] = {}
    for kernel in names:
        model = build_random_model(preset, device=device, dtype=dtype, seed=0)
        try:
            model.set_attn_implementation(kernel)
        except (ImportError, ValueError) as e:
            out[kernel] = {"unavailable": str(e).splitlines()[0][:300]}
            continue
        attach_routers(
            model,
            RouterConfig(granularity="attn_sequence", router_layers=model.config.num_hidden_layers // 2),
        )
        ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        ids[1, :6], mask[1, :6] = 0, 0  # left padding
        ids, mask = ids.to(device), mask.to(device)
        plain = detach_routers(copy.deepcopy(model))
        result: dict[str, Any] = {}
        try:
            set_thresholds(model, 0.0)
            result["routers_on_equals_dense"] = bool(
                torch.equal(_greedy(model, ids, mask, n), _greedy(plain, ids, mask, n))
            )
            skipped = force_skip(model, 0.5)
            deleted = deleted_copy(plain, skipped, "attn")
            result["skipping_equals_deleted"] = bool(
                torch.equal(_greedy(model, ids, mask, n), _greedy(deleted, ids, mask, n))
            )
            set_thresholds(model, 0.5)  # scored, but every decision forced below
            layers = sorted(routed_layers(model))
            routes = {i: torch.tensor([i % 2 == 0, i % 2 == 1], device=device) for i in layers}
            with forced_routes(model, routes):
                batch = _greedy(model, ids, mask, n)
            alone = []
            for row in range(2):
                real = mask[row].bool()
                with forced_routes(model, {i: r[row : row + 1] for i, r in routes.items()}):
                    alone.append(_greedy(model, ids[row : row + 1, real], mask[row : row + 1, real], n))
            result["mixed_rows_equal_rows_alone"] = [
                bool(torch.equal(batch[r], alone[r][0])) for r in range(2)
            ]
        except Exception as e:  # noqa: BLE001 - a kernel that breaks is a finding, not the end of the check
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out[kernel] = result
        del model, plain
    return out


def train_step(preset: str, device: torch.device, dtype: torch.dtype, seq: int, batch: int) -> dict[str, Any]:
    out = {}
    for mode in ("router", "full"):
        model = build_random_model(preset, device=device, dtype=dtype, seed=0)
        attach_routers(model, RouterConfig(granularity="attn_sequence"))
        model.train()
        params = router_parameters(model) if mode == "router" else list(model.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optim = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(3):  # the first allocates the optimizer state
            _sync(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            _sync(device)
            if step:
                times.append(time.perf_counter() - start)
        out[mode] = {
            "step_s": sorted(times)[len(times) // 2],
            "trainable_parameters": sum(p.numel() for p in params),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        del model, optim, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["full_over_router_time"] = out["full"]["step_s"] / out["router"]["step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="toy shapes (a CPU test of this script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="exact,kernels,eager,compiled,train")
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help="attention kernels of the kernels section"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--compile_backend", default="inductor")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --tiny --device cpu to test the script)")
    dtype = torch.bfloat16
    preset, train_preset = ("llama-tiny", "llama-tiny") if args.tiny else ("llama-3-8b", "llama-1b")
    contexts, batches = ((16, 32), (1, 2)) if args.tiny else ((512, 2048, 8192), (1, 8))
    sections = args.only.split(",")

    model = build_random_model(preset, device=device, dtype=dtype, seed=0)
    attach_routers(model, RouterConfig(granularity="attn_sequence", router_layers=2 if args.tiny else 16))
    report: dict[str, Any] = {"preset": preset, "environment": environment(device, model), "sections": {}}

    def record(name: str, value: Any, seconds: float) -> None:
        report["sections"][name] = {"seconds": round(seconds, 1), **value}
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"gpu_check: {name} done in {seconds:.0f} s", flush=True)

    if "exact" in sections:
        t = time.perf_counter()
        record("exact", exactness(model, device), time.perf_counter() - t)
    if "kernels" in sections:
        t = time.perf_counter()
        preset_k = "llama-tiny" if args.tiny else "llama-1b"
        record(
            "kernels",
            kernels(preset_k, device, dtype, tuple(args.kernels.split(","))),
            time.perf_counter() - t,
        )
    if "eager" in sections:
        t = time.perf_counter()
        settings = BenchSettings(
            contexts=contexts,
            batches=batches,
            new_tokens=16,
            repeats=3,
            skip_ratio=0.5,
            variants=("dense", "routed", "oracle"),
        )
        eager = run_benchmark(model, settings, name=f"random:{preset}")
        print(results_table(eager))
        record("eager", {"report": eager}, time.perf_counter() - t)
    if "train" in sections:  # before the compiled section, the slowest (about a minute per graph)
        t = time.perf_counter()
        seq, batch = (16, 2) if args.tiny else (512, 4)
        record("train", train_step(train_preset, device, dtype, seq, batch), time.perf_counter() - t)
    if "compiled" in sections:
        # one context, one cell per call (each recorded when done: the time budget may end first)
        for batch in batches:
            t = time.perf_counter()
            settings = BenchSettings(
                contexts=contexts[1:2], batches=(batch,), new_tokens=16, repeats=3, skip_ratio=0.5
            )
            compiled = run_compiled_benchmark(
                model, settings, name=f"random:{preset}", progress=print, backend=args.compile_backend
            )
            print(compiled_results_table(compiled))
            record(f"compiled_batch{batch}", {"report": compiled}, time.perf_counter() - t)
    print(
        json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "report"} for k, v in report["sections"].items()},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
