"""Headroom on the tasks: would choosing each document's skipped attention layers beat the static
drop of the same compute in accuracy?

benchmarks/headroom.py measured the headroom of per-input routing in KL on instruction examples
(a per-example oracle 22-26% closer to dense than the best fixed set) and found that a KL gain
need not show on the tasks. This script measures the headroom where issue 13's 0.5-point goal
is set: on the 3,432 task documents, in accuracy, against the drop of the same compute.

    # 1. dense and one pass per candidate unit skipped alone (each ~15 min on one thread; two
    #    processes share 2 cores: give each its own --candidates)
    OMP_NUM_THREADS=1 python benchmarks/task_headroom.py singles
    # 2. the per-document oracle and the best static set at k skipped units (k = 2, 4)
    OMP_NUM_THREADS=1 python benchmarks/task_headroom.py --k 2,4 sets
    # 3. results/task_headroom.{json,md}
    python benchmarks/task_headroom.py report

Method.
* Documents: the capacity curve's sample (the first 400 of each of the nine tasks, 8 per MMLU
  subject), routed on the request context (``--route_on prompt``): every answer choice of a
  document is scored by one sub-network, as a deployed routed model would score it.
* Candidates: the 8 attention units (of the 16 routed, layers 13-28) with the least mean
  single-unit KL on the fit split of results/headroom.json (instruction examples, not the
  tasks): 25, 28, 26, 22, 27, 17, 14, 21. They include the attention drop's choices at k = 2
  (25, 26) and k = 4 (25-28); a unit outside them costs more on average.
* Skip cost of unit u for document d: ``KL(p_dense || p_u)``, where ``p`` is the softmax over
  the document's answer choices of the scores its task's primary metric ranks (the summed
  log-likelihood for ``acc``, divided by the continuation's length in characters for
  ``acc_norm``). The cost is label-free: it says how much skipping u moves the model's answer
  distribution, not whether the answer is right, so a router that sees the prompt could in
  principle learn it.
* Oracle at k: each document skips its own k cheapest candidates (ties broken by mean cost).
  Documents that share a request context (winogrande's pairs score the same partial sentences,
  piqa repeats a few goals) must share a route, so such a group skips the k candidates of least
  summed cost over its documents.
  Best static at k: the k candidates of least mean cost over all documents (chosen in hindsight
  on these documents). Drop k: routertune's attention drop (least ``1 - cos``), recorded in
  results/capacity_curve_400. All three compute the same (k of 16 routed attentions skipped per
  document) and each is evaluated for real, the oracle through
  ``routertune.evaluation.evaluate(request_routes=...)`` (a forced route per document).
* Differences are paired over the same documents, +- one standard error.

Point files: results/task_headroom/<label>.json (per-document 0/1 scores and answer-choice
log-likelihoods, 4 decimals). Every step skips points already recorded.
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

sys.path.insert(0, str(Path(__file__).parent))
import capacity_curve as curve  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CANDIDATES = "25,28,26,22,27,17,14,21"


class Run:
    """Where a run reads and writes, and what it evaluates (the command line's options)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.points = Path(args.points_dir)
        self.curve = Path(args.curve_dir)
        self.candidates = tuple(int(u) for u in args.candidates.split(","))
        self.tasks = args.tasks.split(",") if args.tasks else None

    def model(self):
        from routertune import RouterConfig, attach_routers
        from routertune.loading import load_model_and_tokenizer

        torch.set_num_threads(self.args.threads)
        model, tokenizer = load_model_and_tokenizer(self.args.model, progress=False)
        attach_routers(
            model, RouterConfig(granularity="attn_sequence", router_layers=self.args.router_layers)
        )
        return model, tokenizer

    def evaluate(self, model, tokenizer, label: str, setup: dict[str, Any], request_routes=None) -> None:
        """Evaluates ``model`` as it stands and records point ``label`` (the per-document answer
        log-likelihoods at 4 decimals; the context keys in the dense point only)."""
        from routertune.evaluation import evaluate
        from routertune.io_utils import atomic_write_text

        start = time.time()
        result = evaluate(
            model,
            tokenizer,
            **({"tasks": self.tasks} if self.tasks else {}),
            limit=self.args.limit,
            task_limits={"mmlu": self.args.mmlu_limit} if not self.tasks or "mmlu" in self.tasks else None,
            batch_size=8,
            choices=True,
            route_on="prompt",
            request_routes=request_routes,
        )
        for entry in result["tasks"].values():
            for doc in entry["per_doc_choices"]:
                doc["logliks"] = [round(v, 4) for v in doc["logliks"]]
                if label != "dense":
                    del doc["contexts"]
        record = {
            "point": label,
            "setup": setup,
            "eval": curve._compact(result),
            "seconds": round(time.time() - start, 1),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        }
        self.points.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.points / f"{label}.json", json.dumps(record) + "\n")
        print(f"{label}: average {result['average']['value']:.4f} ({record['seconds']} s)", flush=True)

    def recorded(self, label: str) -> bool:
        return (self.points / f"{label}.json").exists()

    def load(self, label: str) -> dict[str, Any]:
        path = self.points / f"{label}.json"
        if not path.exists():
            raise SystemExit(f"{path} is not recorded yet (run the step that makes it first)")
        return json.loads(path.read_text())

    def record_drop(self, k: int) -> None:
        """Evaluates the attention drop of k units (as the capacity curve does) into this run."""
        from routertune.io_utils import atomic_write_text
        from routertune.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(self.args.model, progress=False)
        record = curve.evaluate_point(
            model, tokenizer, f"drop:{k}", Path(), limit=self.args.limit, mmlu_limit=self.args.mmlu_limit,
            tasks=self.tasks, threads=self.args.threads,
        )  # fmt: skip
        self.points.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.points / f"drop-{k}.json", json.dumps(record) + "\n")

    def drop(self, k: int) -> dict[str, Any]:
        """The attention drop of k units: the capacity curve's point, else this run's own."""
        recorded = self.curve / f"drop-{k}.json"
        return json.loads(recorded.read_text()) if recorded.exists() else self.load(f"drop-{k}")


def _thresholds(model, skipped: set[int]) -> None:
    from routertune.routing.attach import routed_layers, set_thresholds

    set_thresholds(model, {i: (2.0 if i in skipped else 0.0) for i in routed_layers(model)})


def cmd_singles(run: Run) -> None:
    model, tokenizer = run.model()
    for unit in ["dense", *run.candidates]:
        label = "dense" if unit == "dense" else f"skip-{unit}"
        if run.recorded(label):
            print(f"{label}: recorded, skipped")
            continue
        skipped = set() if unit == "dense" else {unit}
        _thresholds(model, skipped)
        run.evaluate(model, tokenizer, label, {"skipped": sorted(skipped)})


def _docs(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(task, document) of a point, in the order of its per-document scores."""
    return [(task, d) for task, entry in record["eval"]["tasks"].items() for d in entry["per_doc_choices"]]


def _log_choice_distribution(doc: dict[str, Any], metric: str) -> torch.Tensor:
    scores = torch.tensor(doc["logliks"], dtype=torch.float64)
    if metric == "acc_norm":
        scores = scores / torch.tensor(doc["lengths"], dtype=torch.float64).clamp(min=1)
    return torch.log_softmax(scores, dim=0)


def choice_shifts(dense: dict[str, Any], point: dict[str, Any]) -> list[tuple[float, bool]]:
    """Per document of the dense point: the KL of ``point``'s answer-choice distribution to
    dense's, and whether its chosen answer differs from dense's."""
    from routertune.tasks import primary_metric

    docs, other = _docs(dense), _docs(point)
    if [(t, d["doc_id"]) for t, d in other] != [(t, d["doc_id"]) for t, d in docs]:
        raise SystemExit(f"{point['point']} was evaluated on other documents than dense")
    metric = {task: primary_metric(task, entry) for task, entry in dense["eval"]["tasks"].items()}
    shifts = []
    for (task, d), (_, e) in zip(docs, other, strict=True):
        p, q = _log_choice_distribution(d, metric[task]), _log_choice_distribution(e, metric[task])
        shifts.append((float((p.exp() * (p - q)).sum()), int(p.argmax()) != int(q.argmax())))
    return shifts


def skip_costs(run: Run) -> tuple[list[tuple[str, dict[str, Any]]], dict[int, list[float]]]:
    """The documents (of the dense point) and, per candidate, each document's skip cost."""
    dense = run.load("dense")
    costs = {
        unit: [kl for kl, _ in choice_shifts(dense, run.load(f"skip-{unit}"))] for unit in run.candidates
    }
    return _docs(dense), costs


def context_groups(docs: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """Per document, the index of its group: documents that share a request context (winogrande's
    pairs score the same partial sentences; piqa repeats a few goals) are one group, since a
    request's route is chosen from its context and so must be the same for all of them."""
    parent = list(range(len(docs)))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first_of: dict[str, int] = {}
    for n, (_, doc) in enumerate(docs):
        for key in doc["contexts"]:
            parent[root(n)] = root(first_of.setdefault(key, n))
    return [root(n) for n in range(len(docs))]


def choose_sets(
    costs: dict[int, list[float]], k: int, groups: list[int]
) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Per document, the oracle's k cheapest candidates (summed over the document's context group);
    and the best static k (least mean cost)."""
    mean = {u: sum(c) / len(c) for u, c in costs.items()}
    static = tuple(sorted(sorted(costs, key=lambda u: mean[u])[:k]))
    group_cost = {u: {} for u in costs}
    for u, c in costs.items():
        for n, g in enumerate(groups):
            group_cost[u][g] = group_cost[u].get(g, 0.0) + c[n]
    oracle = [
        tuple(sorted(sorted(costs, key=lambda u: (group_cost[u][g], mean[u]))[:k])) for g in groups
    ]
    return oracle, static


def cmd_sets(run: Run) -> None:
    from routertune.evaluation.scores import context_key

    model, tokenizer = run.model()
    docs, costs = skip_costs(run)
    groups = context_groups(docs)
    for k in (int(v) for v in run.args.k.split(",")):
        oracle, static = choose_sets(costs, k, groups)
        route_of: dict[str, tuple[int, ...]] = {}
        for (_, doc), chosen in zip(docs, oracle, strict=True):
            for key in doc["contexts"]:
                if route_of.setdefault(key, chosen) != chosen:  # context_groups rules this out
                    raise AssertionError(f"two documents share a context (key {key}) but not a route")
        if not (run.curve / f"drop-{k}.json").exists() and not run.recorded(f"drop-{k}"):
            run.record_drop(k)
        if not run.recorded(f"static-{k}"):
            _thresholds(model, set(static))
            run.evaluate(
                model, tokenizer, f"static-{k}", {"skipped": list(static), "rule": "least mean skip cost"}
            )
        if not run.recorded(f"oracle-{k}"):
            _thresholds(model, set())  # every request's route is forced below
            run.evaluate(
                model, tokenizer, f"oracle-{k}",
                {
                    "rule": "each document's k cheapest candidates (documents sharing a context: summed)",
                    "distinct_sets": len(set(oracle)),
                    "context_groups": len(set(groups)),
                },
                request_routes=lambda context, routes=route_of: routes[context_key(context)],
            )  # fmt: skip


def _paired(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float]:
    from routertune.evaluation import paired_difference

    a, b = (curve._expand(json.loads(json.dumps(p["eval"]))) for p in (first, second))
    d = paired_difference(a, b)
    return {"difference": d["difference"], "stderr": d["stderr"]}


def measured_cost(dense: dict[str, Any], point: dict[str, Any]) -> dict[str, float] | None:
    """What a recorded set really did to the documents (None for a point recorded without the
    answer-choice log-likelihoods): the mean KL of its answer-choice distribution to dense (the
    interactions of the units included) and the share of documents whose answer changed."""
    if "per_doc_choices" not in next(iter(point["eval"]["tasks"].values())):
        return None
    shifts = choice_shifts(dense, point)
    return {
        "kl": sum(kl for kl, _ in shifts) / len(shifts),
        "answers_changed": sum(changed for _, changed in shifts) / len(shifts),
    }


def _mean_cost(costs: dict[int, list[float]], sets: list[tuple[int, ...]]) -> float:
    """The additive skip cost (sum of the single-unit costs) of each document's set, averaged."""
    return sum(sum(costs[u][n] for u in s) for n, s in enumerate(sets)) / len(sets)


def cmd_report(run: Run) -> None:
    from routertune.io_utils import atomic_write_text

    dense = run.load("dense")
    docs, costs = skip_costs(run)
    groups = context_groups(docs)
    rows = []
    for k in (int(v) for v in run.args.k.split(",")):
        points = {"drop": run.drop(k), "static": run.load(f"static-{k}"), "oracle": run.load(f"oracle-{k}")}
        oracle_sets, static_set = choose_sets(costs, k, groups)
        drop_set = tuple(sorted(points["drop"]["setup"]["dropped"]))
        rows.append(
            {
                "k": k,
                "capacity": 1 - k / run.args.router_layers,
                "drop_set": list(drop_set),
                "static_set": list(static_set),
                "oracle_distinct_sets": len(set(oracle_sets)),
                "oracle_docs_on_static_set": sum(s == static_set for s in oracle_sets) / len(oracle_sets),
                "average": {name: p["eval"]["average"]["value"] for name, p in points.items()},
                "vs_dense": {name: _paired(dense, p) for name, p in points.items()},
                "oracle_vs_drop": _paired(points["drop"], points["oracle"]),
                "oracle_vs_static": _paired(points["static"], points["oracle"]),
                "static_vs_drop": _paired(points["drop"], points["static"]),
                "additive_cost": {
                    "drop": _mean_cost(costs, [drop_set] * len(docs))
                    if set(drop_set) <= set(costs)
                    else None,
                    "static": _mean_cost(costs, [static_set] * len(docs)),
                    "oracle": _mean_cost(costs, oracle_sets),
                },
                "measured_cost": {name: measured_cost(dense, p) for name, p in points.items()},
            }
        )
    data = {
        "model": run.args.model,
        "documents": len(docs),
        "context_groups": len(set(groups)),
        "dense_average": dense["eval"]["average"]["value"],
        "candidates": list(run.candidates),
        "mean_single_cost": {str(u): sum(c) / len(c) for u, c in costs.items()},
        "rows": rows,
        "seconds": {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(run.points.glob("*.json"))},
    }
    out = Path(run.args.output)
    atomic_write_text(out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), _markdown(data))
    print(_markdown(data))


def _markdown(data: dict[str, Any]) -> str:
    def pm(d: dict[str, float]) -> str:
        return f"{100 * d['difference']:+.2f} +- {100 * d['stderr']:.2f}"

    def cost(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [
        f"# Headroom on the tasks: {data['model']}",
        "",
        "Written by `benchmarks/task_headroom.py report`; the method is in that script's docstring.",
        "",
        f"{data['documents']} documents, dense average {100 * data['dense_average']:.2f}. Candidate attention "
        f"units: {', '.join(map(str, data['candidates']))}; mean skip cost of each alone on these documents "
        "(KL of the answer-choice distribution to dense, nats): "
        + ", ".join(f"{u}: {c:.4f}" for u, c in data["mean_single_cost"].items())
        + ".",
        "",
        "| k skipped (capacity) | drop (1 - cos) | best static (hindsight) | per-document oracle | oracle - drop | "
        "oracle - static | static - drop | additive cost: drop / static / oracle | "
        "measured cost: drop / static / oracle | answers changed: drop / static / oracle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        a, v, c = r["average"], r["vs_dense"], r["additive_cost"]
        lines.append(
            f"| {r['k']} ({r['capacity']:.3f}) | {100 * a['drop']:.2f} ({pm(v['drop'])}; {r['drop_set']}) | "
            f"{100 * a['static']:.2f} ({pm(v['static'])}; {r['static_set']}) | {100 * a['oracle']:.2f} "
            f"({pm(v['oracle'])}; {r['oracle_distinct_sets']} sets, {100 * r['oracle_docs_on_static_set']:.0f}% "
            f"of documents on the static one) | {pm(r['oracle_vs_drop'])} | {pm(r['oracle_vs_static'])} | "
            f"{pm(r['static_vs_drop'])} | {cost(c['drop'])} / {cost(c['static'])} / {cost(c['oracle'])} | "
            + " / ".join(cost(m and m["kl"]) for m in r["measured_cost"].values())
            + " | "
            + " / ".join("-" if m is None else f"{100 * m['answers_changed']:.1f}%" for m in r["measured_cost"].values())
            + " |"
        )
    lines += [
        "",
        "Averages in points; in brackets the paired difference to dense (+- one standard error) and "
        "the set skipped. Additive cost: the sum of the set's single-unit costs, averaged over documents "
        "(what the oracle minimises). Measured cost: the mean KL to dense of the answer-choice distributions "
        "the set really produced (its units' interactions included; '-' where the point was recorded "
        "without them); answers changed: the share of documents whose chosen answer differs from dense's.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=curve.MODEL)
    parser.add_argument("--router_layers", type=int, default=16)
    parser.add_argument(
        "--candidates", default=CANDIDATES, help="attention units (layer indices) to choose from"
    )
    parser.add_argument("--tasks", default=None, help="default: the nine offline tasks")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--mmlu_limit", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", default="2,4", help="units skipped per document")
    parser.add_argument("--points_dir", default=str(RESULTS / "task_headroom"))
    parser.add_argument(
        "--curve_dir", default=str(RESULTS / "capacity_curve_400"), help="recorded drop-k points"
    )
    parser.add_argument("--output", default=str(RESULTS / "task_headroom"))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("singles", "sets", "report"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    {"singles": cmd_singles, "sets": cmd_sets, "report": cmd_report}[args.command](Run(args))


if __name__ == "__main__":
    sys.exit(main())
