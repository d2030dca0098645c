"""Headroom of per-input routing: an oracle that knows each example's cheapest attention layers
against the best static drop of the same compute, on held-out instruction examples.

    OMP_NUM_THREADS=2 python benchmarks/headroom.py                 # about 40 min on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/headroom.py --no_greedy     # the additive choices only
    -> benchmarks/results/headroom.{json,md}

If even an oracle that chooses per example cannot beat one fixed set of skipped layers, no
learned router can (a router sees less: the prompt, not the answer). The measurement:

1. Units: the attention sub-layers a default ``attn_sequence`` router set routes (the deepest
   16 layers but the last; SmolLM2-135M: layers 13-28). Capacity C skips k = round((1 - C) x 16)
   of them: 2, 4, 6 at 0.875, 0.75, 0.625.
2. Examples: built-in instruction examples that neither training (which takes the mix from
   its start) nor calibration (the last 96) uses: a *fit* split (static choices are made on
   it) and a *test* split (everything is compared on it), each example rendered as in training
   and cut to ``--max_length`` tokens.
3. Cost of a route for one example: KL(dense || routed) of the next-token distributions, mean
   over the example's assistant tokens (precise: no sampling noise), and the assistant-token
   loss (nats). Skipped units are really skipped: per-row forced routes
   (``routertune.routing.attach.forced_routes``), the code path a router's decision takes.
4. Single-unit costs: every example x every unit, that unit alone skipped.
5. Choices at each k, all evaluated with their real (not summed) cost on the test split:
   - ``drop``: routertune's attention drop (least ``1 - cos(h, h + attn)`` on the fit split).
   - ``static``: the k units of least mean single-unit KL on the fit split.
   - ``static_greedy``: units added one at a time, each the one whose addition gives the least
     mean real KL on the fit split (the best static set a search can find), trying the
     ``--greedy_width`` units of least mean single-unit KL at each step.
   - ``static_hindsight``: as ``static`` but on the test split's own costs (a static choice
     that has seen the test examples: the fairest upper bound of any static drop).
   - ``oracle``: per example, its own k units of least single-unit KL.
   - ``oracle_greedy``: per example, units added one at a time by that example's real KL (of
     its ``--greedy_width`` cheapest single units; at k = width it is ``oracle``).
   Headroom = the best static choice's cost minus the best oracle's, paired over examples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
CAPACITIES = (0.875, 0.75, 0.625)
CALIBRATION_TAIL = 96  # routertune calibrate's default 64 examples + their 32 held out


class Split:
    """Left-padded batches of one split, and each example's dense log-probabilities at its
    assistant positions (computed once; every route is compared with them)."""

    def __init__(self, name: str, batches: list[dict[str, torch.Tensor]]) -> None:
        self.name = name
        self.batches = batches
        self.dense_logp: list[torch.Tensor] = []  # per batch: (N, V) at the chosen positions
        self.single: torch.Tensor | None = None  # (examples, units): KL with that unit alone skipped

    @property
    def sizes(self) -> list[int]:
        return [b["input_ids"].shape[0] for b in self.batches]

    def __len__(self) -> int:
        return sum(self.sizes)


def _answer_logp(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities at the positions that predict an assistant token, their targets, and
    the row of each."""
    from routertune.baselines import labelled_logits

    logits, targets, chosen = labelled_logits(model, batch)
    rows = torch.arange(chosen.shape[0]).view(-1, 1).expand_as(chosen)[chosen]
    return F.log_softmax(logits.float(), dim=-1), targets, rows


def _per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    total = torch.zeros(n_rows).index_add_(0, rows, values)
    count = torch.zeros(n_rows).index_add_(0, rows, torch.ones_like(values))
    return total / count


def route_costs(
    model, split: Split, skipped: list[list[set[int]]], units: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (KL to dense, assistant loss) when example ``(b, r)`` skips ``skipped[b][r]``."""
    from routertune.routing.attach import forced_routes

    kls, losses = [], []
    for b, batch in enumerate(split.batches):
        B = batch["input_ids"].shape[0]
        keep = {u: torch.tensor([u not in skipped[b][r] for r in range(B)]) for u in units}
        with torch.no_grad(), forced_routes(model, keep):
            logp, targets, rows = _answer_logp(model, batch)
        dense = split.dense_logp[b]
        kl = (dense.exp() * (dense - logp)).sum(-1)
        nll = -logp.gather(1, targets.view(-1, 1)).squeeze(1)
        kls.append(_per_row(kl, rows, B))
        losses.append(_per_row(nll, rows, B))
    return torch.cat(kls), torch.cat(losses)


def _same_for_all(split: Split, units: set[int]) -> list[list[set[int]]]:
    return [[set(units)] * n for n in split.sizes]


def _per_example(split: Split, sets: list[set[int]]) -> list[list[set[int]]]:
    out, start = [], 0
    for n in split.sizes:
        out.append(sets[start : start + n])
        start += n
    return out


def prepare(model, split: Split) -> torch.Tensor:
    """Keeps the dense log-probs of every batch on ``split``; returns the dense loss per example."""
    from routertune.routing.attach import all_units_kept

    losses = []
    for batch in split.batches:
        with torch.no_grad(), all_units_kept(model):
            logp, targets, rows = _answer_logp(model, batch)
        split.dense_logp.append(logp)
        nll = -logp.gather(1, targets.view(-1, 1)).squeeze(1)
        losses.append(_per_row(nll, rows, batch["input_ids"].shape[0]))
    return torch.cat(losses)


def single_costs(model, split: Split, units: list[int]) -> torch.Tensor:
    """(examples, units): KL to dense with only that unit skipped."""
    return torch.stack([route_costs(model, split, _same_for_all(split, {u}), units)[0] for u in units], dim=1)


def greedy_static(model, split: Split, units: list[int], k_max: int, width: int, log) -> list[list[int]]:
    """Nested static sets of size 1..k_max, each step adding, of the ``width`` units of least
    mean single-unit KL, the one whose addition gives the least mean real KL."""
    pool = [units[int(j)] for j in split.single.mean(0).argsort()[:width]]
    chosen: list[int] = []
    sets = []
    for step in range(k_max):
        best = None
        for u in pool:
            if u in chosen:
                continue
            kl = route_costs(model, split, _same_for_all(split, set(chosen) | {u}), units)[0].mean().item()
            if best is None or kl < best[0]:
                best = (kl, u)
        chosen.append(best[1])
        sets.append(sorted(chosen))
        log(f"static greedy: step {step + 1}: + layer {best[1]} (fit KL {best[0]:.4f})")
    return sets


def greedy_oracle(model, split: Split, units: list[int], k_max: int, width: int, log) -> list[list[set[int]]]:
    """Per example, nested sets of size 1..k_max, each step adding, of that example's ``width``
    units of least single-unit KL, the one that gives it the least real KL. Returns, for each
    size, every example's set."""
    n = len(split)
    pools = [[units[int(j)] for j in row.argsort()[:width]] for row in split.single]
    chosen: list[set[int]] = [set() for _ in range(n)]
    out = []
    for step in range(k_max):
        trial = torch.full((n, width), math.inf)
        for j in range(width):
            sets = [c | {p[j]} for c, p in zip(chosen, pools, strict=True)]
            kl = route_costs(model, split, _per_example(split, sets), units)[0]
            fresh = torch.tensor([p[j] not in c for c, p in zip(chosen, pools, strict=True)])
            trial[:, j] = torch.where(fresh, kl, torch.full_like(kl, math.inf))
        picks = trial.argmin(dim=1)
        for i in range(n):
            chosen[i].add(pools[i][int(picks[i])])
        out.append([set(c) for c in chosen])
        log(f"oracle greedy: step {step + 1}: mean KL {trial.min(dim=1).values.mean().item():.4f}")
    return out


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of a - b over examples, its standard error, and the share of examples where a > b."""
    d = (a - b).double()
    return {
        "mean": _sig(d.mean().item()),
        "stderr": _sig((d.std(unbiased=True) / math.sqrt(len(d))).item()),
        "share_positive": round((d > 0).double().mean().item(), 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from routertune import RouterConfig, attach_routers
    from routertune.baselines import (
        attention_importance,
        candidate_layers,
        choose_dropped,
        n_drop_for_capacity,
    )
    from routertune.benchmark.environment import environment, load_average
    from routertune.calibrate import make_batches
    from routertune.data import builtin_messages, encode_example
    from routertune.loading import load_model_and_tokenizer

    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.0f}s] {msg}", file=sys.stderr, flush=True)

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    env = environment(next(model.parameters()).device, model)
    attach_routers(model, RouterConfig(granularity="attn_sequence", threshold=0.0))
    units = candidate_layers(model)
    examples = builtin_messages()
    end = len(examples) - CALIBRATION_TAIL
    pool = examples[end - args.n_fit - args.n_test : end]
    fit_examples, test_examples = pool[: args.n_fit], pool[args.n_fit :]

    def answered(item) -> bool:  # an assistant token within the first max_length tokens
        encoded = encode_example(item, tokenizer)
        return encoded is not None and any(t != -100 for t in encoded["labels"][1 : args.max_length])

    def split(name, data):
        data = [item for item in data if answered(item)]
        return Split(
            name, make_batches(tokenizer, data, batch_size=args.batch_size, max_length=args.max_length)
        )

    fit, test = split("fit", fit_examples), split("test", test_examples)
    log(f"units {units}; fit {len(fit)} / test {len(test)} examples, max_length {args.max_length}")
    dense_loss = {s.name: prepare(model, s) for s in (fit, test)}
    log("dense done")
    for s in (fit, test):
        s.single = single_costs(model, s, units)
    costs = {s.name: s.single for s in (fit, test)}
    log("single-unit costs done")
    importance = attention_importance(
        model, tokenizer, fit_examples, layers=units, max_length=args.max_length
    )

    ks = {c: n_drop_for_capacity(c, len(units)) for c in CAPACITIES}
    k_max = max(ks.values())
    greedy_sets = greedy_static(model, fit, units, k_max, args.greedy_width, log) if args.greedy else None
    greedy_per_example = (
        greedy_oracle(model, test, units, k_max, args.greedy_width, log) if args.greedy else None
    )

    def ranked(values: torch.Tensor, k: int) -> set[int]:
        return {units[int(j)] for j in values.argsort()[:k]}

    results: dict[str, Any] = {"capacities": {}}
    for capacity, k in ks.items():
        choices: dict[str, list[list[set[int]]]] = {
            "drop": _same_for_all(test, set(choose_dropped(importance, units, k))),
            "static": _same_for_all(test, ranked(costs["fit"].mean(0), k)),
            "static_hindsight": _same_for_all(test, ranked(costs["test"].mean(0), k)),
            "oracle": _per_example(test, [ranked(row, k) for row in costs["test"]]),
        }
        if greedy_sets is not None:
            # nested sets: the first k of the greedy order (none when k is 0)
            choices["static_greedy"] = _same_for_all(test, set(greedy_sets[k - 1]) if k else set())
            choices["oracle_greedy"] = _per_example(
                test, greedy_per_example[k - 1] if k else [set() for _ in range(len(test))]
            )
        measured = {name: route_costs(model, test, sets, units) for name, sets in choices.items()}
        statics = [n for n in measured if not n.startswith("oracle")]
        oracles = [n for n in measured if n.startswith("oracle")]
        best_static = min(statics, key=lambda n: measured[n][0].mean().item())
        best_oracle = min(oracles, key=lambda n: measured[n][0].mean().item())
        entry = {
            "skipped_units": k,
            "choices": {
                name: {
                    "kl": _sig(kl.mean().item()),
                    "loss": _sig(loss.mean().item()),
                    "loss_vs_dense": _paired(loss, dense_loss["test"]),
                    "sets": sorted(sorted(s) for s in {frozenset(x) for b in choices[name] for x in b})[:8],
                    "distinct_sets": len({frozenset(x) for b in choices[name] for x in b}),
                }
                for name, (kl, loss) in measured.items()
            },
            "best_static": best_static,
            "best_oracle": best_oracle,
            "headroom_kl": _paired(measured[best_static][0], measured[best_oracle][0]),
            "headroom_loss": _paired(measured[best_static][1], measured[best_oracle][1]),
            "oracle_vs_static_fit_kl": _paired(measured["static"][0], measured["oracle"][0]),
        }
        results["capacities"][str(capacity)] = entry
        log(f"capacity {capacity}: best static {best_static} KL {entry['choices'][best_static]['kl']}, "
            f"best oracle {best_oracle} KL {entry['choices'][best_oracle]['kl']}")  # fmt: skip

    spread = costs["test"]
    results.update(
        {
            "model": args.model,
            "units": units,
            "examples": {
                "fit": len(fit),
                "test": len(test),
                "max_length": args.max_length,
                "builtin_slice": [end - args.n_fit - args.n_test, end],
            },  # fmt: skip
            "dense_loss_test": round(dense_loss["test"].mean().item(), 5),
            "single_unit_kl": {
                "fit_mean": {
                    u: round(v, 5) for u, v in zip(units, costs["fit"].mean(0).tolist(), strict=True)
                },
                "test_mean": {
                    u: round(v, 5) for u, v in zip(units, costs["test"].mean(0).tolist(), strict=True)
                },
                # how much an example's ranking of units differs from the average ranking
                "rank_agreement_test": _rank_agreement(spread),
            },
            "importance_1_minus_cos": {u: round(v, 6) for u, v in importance.items()},
            "greedy_static_sets": greedy_sets,
            "environment": {
                **env,
                "load_average_end": load_average(),
                "seconds": round(time.time() - started),
            },
            "command": " ".join(sys.argv),
        }
    )
    return results


def _rank_agreement(costs: torch.Tensor) -> dict[str, float]:
    """Spearman correlation of each example's unit ranking with the mean ranking (median, p10)."""
    mean_rank = costs.mean(0).argsort().argsort().double()
    per = []
    for row in costs:
        rank = row.argsort().argsort().double()
        per.append(torch.corrcoef(torch.stack([rank, mean_rank]))[0, 1].item())
    t = torch.tensor(per)
    return {"median": round(t.median().item(), 3), "p10": round(t.quantile(0.1).item(), 3)}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    lines = [
        f"# Headroom of per-input routing: {results['model']}",
        "",
        "Written by `benchmarks/headroom.py` (method in its docstring). "
        f"{results['examples']['test']} held-out test examples ({results['examples']['fit']} more to fit "
        f"static choices on), up to {results['examples']['max_length']} tokens, KL(dense || routed) and "
        "loss (nats) over their assistant tokens; units: the attention of layers "
        f"{results['units'][0]}-{results['units'][-1]}. Dense loss {results['dense_loss_test']:.4f}.",
        f"Machine: {env['cpu']}, {env['threads']} threads, load {env['load_average_start']} -> "
        f"{env['load_average_end']}, {env['seconds']} s.",
        "",
        "| capacity | skipped | choice | KL | loss | loss vs dense | distinct sets |",
        "|---|---|---|---|---|---|---|",
    ]
    for capacity, entry in results["capacities"].items():
        for name, c in entry["choices"].items():
            d = c["loss_vs_dense"]
            lines.append(
                f"| {capacity} | {entry['skipped_units']} | {name} | {c['kl']:.4f} | {c['loss']:.4f} | "
                f"{d['mean']:+.4f} +- {d['stderr']:.4f} | {c['distinct_sets']} |"
            )
    lines += [
        "",
        "Headroom: best static choice minus best oracle, paired over the test examples (+- one standard error; "
        "share = examples the oracle serves better).",
        "",
        "| capacity | best static | best oracle | KL headroom | loss headroom | share |",
        "|---|---|---|---|---|---|",
    ]
    for capacity, entry in results["capacities"].items():
        h, hl = entry["headroom_kl"], entry["headroom_loss"]
        lines.append(
            f"| {capacity} | {entry['best_static']} | {entry['best_oracle']} | {h['mean']:.4f} +- {h['stderr']:.4f} | "
            f"{hl['mean']:.4f} +- {hl['stderr']:.4f} | {hl['share_positive']:.2f} |"
        )
    agree = results["single_unit_kl"]["rank_agreement_test"]
    lines += [
        "",
        f"Per-example ranking of the units by single-unit KL vs the mean ranking: Spearman median "
        f"{agree['median']}, 10th percentile {agree['p10']}.",
        "",
        "Single-unit KL (test mean) per layer: "
        + ", ".join(f"{u}: {v:.4f}" for u, v in results["single_unit_kl"]["test_mean"].items()),
        "",
    ]
    from routertune.io_utils import atomic_write_text

    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--n_fit", type=int, default=48)
    parser.add_argument("--n_test", type=int, default=48)
    parser.add_argument("--max_length", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_greedy", dest="greedy", action="store_false")
    parser.add_argument(
        "--greedy_width", type=int, default=8, help="units a greedy step tries (least single-unit KL)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "headroom")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results = run(args)
    from routertune.io_utils import atomic_write_text

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.output.with_suffix(".md"))
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
