"""Runs vLLM engines for tests/test_serve_vllm.py, inside the serving environment.

    .venv-serve/bin/python tests/vllm_runner.py SPEC.json RESULT.json

SPEC: {"engines": [{"model": FOLDER, "routed": bool, "compile": bool, "engine_args": {...},
                    "batches": {NAME: [{"prompt": [ids], "max_tokens": n, "extra_args": {...}}]}}]}
Each batch is one ``generate`` call (its requests share steps). RESULT, per engine: for each batch
the greedy tokens and (routed engines) each request's routes, plus the tokens each routed layer
attended over the engine's life.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def run_engine(engine: dict) -> dict:
    from vllm import LLM, SamplingParams

    from routertune.serving.offline import engine_kwargs, routes_of

    kwargs = dict(
        model=engine["model"],
        dtype="float32",
        max_model_len=engine.get("max_model_len", 256),
        seed=0,
        skip_tokenizer_init=True,
        enforce_eager=not engine.get("compile", False),
        **engine.get("engine_args", {}),
    )
    routed = engine.get("routed", True)
    llm = LLM(**(engine_kwargs(**kwargs) if routed else kwargs))
    out: dict = {"batches": {}}
    for name, batch in engine["batches"].items():
        params = [
            SamplingParams(
                max_tokens=r["max_tokens"],
                temperature=0.0,
                ignore_eos=True,
                detokenize=False,
                extra_args=r.get("extra_args"),
            )
            for r in batch
        ]
        outputs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in batch], params, use_tqdm=False)
        entry = {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}
        if routed:
            routes = routes_of(llm, outputs)
            entry["routes"] = [routes[o.request_id] for o in outputs]
        out["batches"][name] = entry
    if routed:
        out["tokens_attended"] = llm.collective_rpc("routertune_stats")[0]["tokens_attended"]
    del llm
    gc.collect()
    return out


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    results = []
    for e in spec["engines"]:
        start = time.perf_counter()
        results.append(run_engine(e))
        print(
            f"engine {e['model']} compile={e.get('compile', False)}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
