"""Dense vs routed speed in one process, against the ideal set by the work actually skipped.

    from routertune.benchmark import BenchSettings, load_bench_model, run_benchmark
    model, name = load_bench_model("random:llama-1b")
    report = run_benchmark(model, BenchSettings(contexts=(512,), batches=(1,), skip_ratio=0.5), name=name)

One model object is timed in up to four variants, interleaved within every repeat (the order
rotates from one repeat to the next so none always runs first):

* ``dense``: routers detached, the plain transformers model (the baseline of every speedup);
* ``all_kept``: routers attached, every unit kept at threshold 0 (the routing overhead);
* ``routed``: the routers' own decisions (or the ones forced by ``skip_ratio``);
* ``oracle``: routers detached and the sub-layers the routed run skipped DELETED (replaced by a
  module that returns zeros and stores no KV): the physical limit of skipping them. Defined
  when every routed layer kept all or none of its units (always the case with ``skip_ratio``).

Prefill is one forward over ``context`` random tokens into a fresh ``DynamicCache``, keeping only
the last position's logits (as ``generate`` does); decode is ``new_tokens`` greedy single-token
forwards on that cache in a plain loop. The loop, not ``generate()``, so the clock sees the model
and not generate's per-step bookkeeping (logits processors, stopping checks that synchronise),
which is the same for every variant and would only dilute the ratios. Per-layer capacity is read
with ``track_capacity`` in a separate untimed probe run (observers force scoring and would tax the
timed runs). The ideal speedup is ``FLOPs(dense) / FLOPs(routed)`` from :mod:`routertune.flops`
with those capacities.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from routertune.flops import ModelShape, deleted_works, phase_flops, routed_works
from routertune.kv_cache import kv_cache_bytes
from routertune.routing.arch import decoder_layers
from routertune.routing.attach import (
    all_units_kept,
    attach_routers,
    detach_routers,
    get_router_config,
    routed_layers,
    set_thresholds,
)
from routertune.routing.config import RouterConfig
from routertune.routing.observe import track_capacity

SCHEMA = "routertune.bench/1"
VARIANTS = ("dense", "all_kept", "routed", "oracle")
RANDOM_PREFIX = "random:"
# A threshold above 1 skips every unit of a layer, 0 keeps every unit; both decide without scoring.
SKIP_THRESHOLD = 2.0
KEEP_THRESHOLD = 0.0
PREFILL_METHOD = "one forward over `context` random token ids into a fresh DynamicCache, logits_to_keep=1"
DECODE_METHOD = "plain loop of `new_tokens` greedy single-token forwards (argmax on device) on the prefill cache"


class BenchError(ValueError):
    """A benchmark argument or model name is invalid."""


# --------------------------------------------------------------------------------------------
# Random models of real shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A model shape built with random weights (``--model random:<name>``)."""

    arch: str  # llama, mistral or qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    note: str
    head_dim: int | None = None
    sliding_window: int | None = None

    def num_parameters(self) -> int:
        d = self.head_dim or self.hidden // self.heads
        attn = self.hidden * d * (2 * self.heads + 2 * self.kv_heads)
        if self.arch == "qwen2":  # q/k/v biases
            attn += d * (self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden


PRESETS: dict[str, Preset] = {
    "llama-tiny": Preset("llama", 64, 4, 4, 2, 128, 256, False, "4-layer toy for tests (milliseconds)"),
    "smollm2-135m": Preset(
        "llama", 576, 30, 9, 3, 1536, 49152, True, "SmolLM2-135M shape (the default model's shape)", head_dim=64
    ),
    "qwen2-0.5b": Preset("qwen2", 896, 24, 14, 2, 4864, 151936, True, "Qwen2.5-0.5B shape"),
    "llama-1b": Preset("llama", 2048, 16, 32, 8, 8192, 128256, True, "Llama-3.2-1B shape (5 GB in float32)"),
    "tinyllama-1.1b": Preset("llama", 2048, 22, 32, 4, 5632, 32000, False, "TinyLlama-1.1B shape (4.4 GB fp32)"),
    "mistral-7b": Preset(
        "mistral", 4096, 32, 32, 8, 14336, 32000, False, "Mistral-7B shape (GPU: 14.5 GB bf16)", sliding_window=4096
    ),
    "llama-3-8b": Preset("llama", 4096, 32, 32, 8, 14336, 128256, False, "Llama-3-8B shape (GPU: 16 GB bf16)"),
}


def preset_config(preset: Preset) -> Any:
    """The transformers config of a preset (sdpa attention)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        vocab_size=preset.vocab,
        tie_word_embeddings=preset.tie,
        max_position_embeddings=32768,
        attn_implementation="sdpa",
    )
    if preset.arch == "llama":
        return LlamaConfig(head_dim=preset.head_dim or preset.hidden // preset.heads, **common)
    if preset.arch == "mistral":
        return MistralConfig(sliding_window=preset.sliding_window, **common)
    if preset.arch == "qwen2":
        return Qwen2Config(**common)
    raise BenchError(f"preset architecture {preset.arch!r} is not buildable")


def build_random_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A model of preset ``name`` (with or without the ``random:`` prefix) with random weights.

    Raises:
        BenchError: unknown preset, or (on CPU) not enough free memory for its weights.
    """
    from transformers import AutoModelForCausalLM

    key = name.removeprefix(RANDOM_PREFIX)
    if key not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; presets: {', '.join(RANDOM_PREFIX + k for k in PRESETS)}")
    preset = PRESETS[key]
    need = preset.num_parameters() * torch.empty((), dtype=dtype).element_size()
    free = available_memory_bytes()
    if torch.device(device).type == "cpu" and free is not None and need > 0.85 * free:
        raise BenchError(
            f"preset {key!r} needs about {need / 2**30:.1f} GiB for its {str(dtype).removeprefix('torch.')} weights; "
            f"this machine has {free / 2**30:.1f} GiB available (try a smaller preset, or --dtype bf16)"
        )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(preset_config(preset), dtype=dtype)
    model.config._name_or_path = RANDOM_PREFIX + key
    return model.eval()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_bench_model(name: str, device: str = "cpu", dtype: str | torch.dtype | None = None, seed: int = 0):
    """``random:<preset>`` or anything ``routertune.loading`` resolves; returns ``(model, display name)``."""
    from routertune.loading import load_model_and_tokenizer, parse_dtype

    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name.startswith(RANDOM_PREFIX):
        return build_random_model(name, device, torch_dtype, seed), name
    model, _ = load_model_and_tokenizer(name, dtype=torch_dtype, device=device, progress=False)
    return model, model.config._name_or_path


# --------------------------------------------------------------------------------------------
# Forced skipping
# --------------------------------------------------------------------------------------------
def forced_skip_layers(routed: Sequence[int], ratio: float) -> list[int]:
    """The deepest ``round(ratio * len(routed))`` routed layers (rounding halves up).

    Deepest first because trained attention routers mostly skip deep layers, and deep attention
    layers are the most redundant ones (He et al., "What matters in transformers?").
    """
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise BenchError(f"skip_ratio must be in [0, 1]; got {ratio}")
    count = math.floor(ratio * len(routed) + 0.5)
    return sorted(routed)[len(routed) - count :] if count else []


def force_skip(model: nn.Module, ratio: float) -> list[int]:
    """Sets per-layer thresholds: the chosen layers skip every unit, the others keep all."""
    layers = sorted(routed_layers(model))
    skip = forced_skip_layers(layers, ratio)
    set_thresholds(model, {i: (SKIP_THRESHOLD if i in skip else KEEP_THRESHOLD) for i in layers})
    return skip


# --------------------------------------------------------------------------------------------
# Variants of one model object
# --------------------------------------------------------------------------------------------
class ZeroAttention(nn.Module):
    """A deleted attention sub-layer: adds nothing and stores no KV."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """A deleted MLP sub-layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@contextlib.contextmanager
def routers_detached(model: nn.Module) -> Iterator[nn.Module]:
    """The plain model for the duration of the block; routers (weights, thresholds) come back after."""
    config = get_router_config(model)
    layers = routed_layers(model)
    weights = {i: layer.router.proj.weight.detach().clone() for i, layer in layers.items()}
    thresholds = {i: layer.router.threshold for i, layer in layers.items()}
    snapshot = RouterConfig.from_dict({**config.to_dict(), "layers": sorted(layers)})
    detach_routers(model)
    try:
        yield model
    finally:
        attach_routers(model, snapshot, probe=False)  # the same layers passed the probe when first attached
        with torch.no_grad():
            for i, layer in routed_layers(model).items():
                layer.router.proj.weight.copy_(weights[i])
                layer.router.threshold = thresholds[i]


@contextlib.contextmanager
def sublayers_deleted(model: nn.Module, layers: Sequence[int], target: str) -> Iterator[nn.Module]:
    """The plain model with the ``target`` sub-layers of ``layers`` deleted, for the block."""
    with routers_detached(model):
        saved: dict[int, tuple[nn.Module, nn.Module]] = {}
        blocks = decoder_layers(model)
        for i in layers:
            saved[i] = (blocks[i].self_attn, blocks[i].mlp)
            if target in ("attn", "block"):
                blocks[i].self_attn = ZeroAttention()
            if target in ("mlp", "block"):
                blocks[i].mlp = ZeroMLP()
        try:
            yield model
        finally:
            for i, (attn, mlp) in saved.items():
                blocks[i].self_attn, blocks[i].mlp = attn, mlp


def variant(model: nn.Module, name: str, deleted: Sequence[int] = ()) -> contextlib.AbstractContextManager:
    """Context manager that puts ``model`` into one of ``VARIANTS`` for the block."""
    if name == "dense":
        return routers_detached(model)
    if name == "all_kept":
        return all_units_kept(model)
    if name == "routed":
        return contextlib.nullcontext(model)
    if name == "oracle":
        return sublayers_deleted(model, deleted, get_router_config(model).target)
    raise BenchError(f"unknown variant {name!r}; variants: {', '.join(VARIANTS)}")


# --------------------------------------------------------------------------------------------
# One generation, timed
# --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """Wall-clock seconds (the result) and this process's CPU seconds (robust to a shared machine)."""

    prefill_s: float
    decode_s: float
    kv_cache_bytes: int
    prefill_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    capacity_prefill: Any = None  # CapacityStats of the probe run
    capacity_decode: Any = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    observe: bool = False,
    cache_factory: Callable[[], Any] | None = None,
) -> RunResult:
    """Prefill ``ids`` (B, T) into a fresh cache, then ``new_tokens`` greedy decode steps.

    Args:
        observe: count per-layer capacity with ``track_capacity`` (slower; for the probe run).
        cache_factory: builds the cache (default: ``DynamicCache(config=model.config)``).
    """
    from transformers import DynamicCache

    device = ids.device
    stats = [None, None]
    with torch.inference_mode():
        cache = cache_factory() if cache_factory is not None else DynamicCache(config=model.config)
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with track_capacity(model) if observe else contextlib.nullcontext() as stats[0]:
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
            next_ids = logits[:, -1:].argmax(-1)  # (B, 1)
        synchronize(device)
        prefilled, prefilled_cpu = time.perf_counter(), time.process_time()
        with track_capacity(model) if observe else contextlib.nullcontext() as stats[1]:
            for _ in range(new_tokens):
                logits = model(input_ids=next_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
                next_ids = logits[:, -1:].argmax(-1)
        synchronize(device)
        done, done_cpu = time.perf_counter(), time.process_time()
    return RunResult(
        prefill_s=prefilled - start,
        decode_s=done - prefilled,
        kv_cache_bytes=kv_cache_bytes(cache),
        prefill_cpu_s=prefilled_cpu - start_cpu,
        decode_cpu_s=done_cpu - prefilled_cpu,
        capacity_prefill=stats[0],
        capacity_decode=stats[1],
    )


def interleaved_runs(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
    repeats: int,
    warmup: int = 1,
    cache_factory: Callable[[], Any] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Times each variant ``repeats`` times, interleaved, the order rotating every repeat.

    Warm-up runs use the first 64 tokens and 2 decode steps (allocator and kernel warm-up; at
    the long contexts a full-size warm-up would cost as much as a repeat).

    Args:
        variants: name -> factory of a context manager that puts the model in that variant.
        cache_factory: builds each run's cache (default: a fresh ``DynamicCache``).

    Returns:
        ``({name: {"prefill_s": [...], "decode_s": [...], "prefill_cpu_s": [...], "decode_cpu_s":
        [...]}}, {name: KV-cache bytes})``.
    """
    names = list(variants)
    for _ in range(warmup):
        for v in names:
            with variants[v]():
                timed_generation(model, ids[:, : min(ids.shape[1], 64)], 2, cache_factory=cache_factory)
    keys = ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s")
    times: dict[str, dict[str, list[float]]] = {v: {k: [] for k in keys} for v in names}
    kv: dict[str, int] = {}
    for r in range(repeats):
        shift = r % len(names)
        for v in names[shift:] + names[:shift]:
            with variants[v]():
                run = timed_generation(model, ids, new_tokens, cache_factory=cache_factory)
            for k in keys:
                times[v][k].append(getattr(run, k))
            kv[v] = run.kv_cache_bytes
    return times, kv


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    """What to time. ``skip_ratio`` None = the routers' own decisions."""

    contexts: Sequence[int] = (512, 2048)
    batches: Sequence[int] = (1, 8)
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    skip_ratio: float | None = None
    variants: Sequence[str] = VARIANTS
    seed: int = 0

    def __post_init__(self) -> None:
        for label, values in (("context", self.contexts), ("batch", self.batches)):
            if not values or any(int(v) < 1 for v in values):
                raise BenchError(f"{label} sizes must be positive integers; got {list(values)}")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise BenchError("new_tokens and repeats must be >= 1 and warmup >= 0")
        if self.skip_ratio is not None and (math.isnan(self.skip_ratio) or not 0.0 <= self.skip_ratio <= 1.0):
            raise BenchError(f"skip_ratio must be in [0, 1]; got {self.skip_ratio}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or "dense" not in self.variants or "routed" not in self.variants:
            raise BenchError(f"variants must include dense and routed, from {', '.join(VARIANTS)}; got {self.variants}")


def _capacities(stats: Any) -> dict[int, float]:
    return {int(i): float(c) for i, c in stats.per_layer.items()} if stats is not None else {}


def run_benchmark(
    model: nn.Module,
    settings: BenchSettings,
    name: str | None = None,
    routers: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Times every (context, batch) cell in every variant; returns the JSON-able report.

    ``model`` must carry routers (``attach_routers`` / ``load_routers``). With
    ``settings.skip_ratio`` its thresholds are overwritten (see :func:`force_skip`).

    Args:
        progress: optional callable taking one line of text per finished cell.
    """
    config = get_router_config(model)
    if config is None:
        raise BenchError("the model has no routers; attach or load them first")
    device = next(model.parameters()).device
    shape = ModelShape.from_config(model.config)
    skipped_forced = force_skip(model, settings.skip_ratio) if settings.skip_ratio is not None else None
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": name or getattr(model.config, "_name_or_path", None),
        "model_shape": shape.to_dict(),
        "granularity": config.granularity,
        "router_config": config.to_dict(),
        "routed_layers": sorted(routed_layers(model)),
        "routers": routers,
        "skip": {
            "ratio": settings.skip_ratio,
            "rule": "deepest routed layers first; threshold 2.0 skips a layer, 0.0 keeps it"
            if skipped_forced is not None
            else "the routers' own decisions",
            "layers": skipped_forced,
        },
        "settings": {**asdict(settings), "prefill": PREFILL_METHOD, "decode": DECODE_METHOD},
        "environment": environment(device, model),
        "results": [],
    }
    generator = torch.Generator().manual_seed(settings.seed)
    for context in settings.contexts:
        for batch in settings.batches:
            ids = torch.randint(0, shape.vocab, (batch, context), generator=generator).to(device)
            cell = _bench_cell(model, ids, settings, shape, config.granularity)
            report["results"].append(cell)
            if progress is not None:
                progress(_cell_line(cell))
    report["environment"]["load_average_end"] = _load_average()
    return report


def _bench_cell(model, ids, settings: BenchSettings, shape: ModelShape, granularity: str) -> dict[str, Any]:
    batch, context = ids.shape
    n = settings.new_tokens
    load_start = _load_average()
    probe = timed_generation(model, ids, n, observe=True)
    cap_prefill = _capacities(probe.capacity_prefill)
    # Sequence routes are decided at prefill and reused by every decode step.
    cap_decode = _capacities(probe.capacity_decode) if granularity.endswith("token") else cap_prefill
    deleted, oracle_reason = _oracle_layers(cap_prefill, cap_decode)
    names = [v for v in settings.variants if v != "oracle" or oracle_reason is None]

    contexts = {v: (lambda v=v: variant(model, v, deleted)) for v in names}
    times, kv = interleaved_runs(model, ids, n, contexts, settings.repeats, settings.warmup)

    target = granularity.split("_", 1)[0]
    works = {"dense": None, "deleted": deleted_works(target, deleted or [])}
    # Thresholds of 0 or above 1 fix the decision without running the router.
    scored = {i for i, layer in routed_layers(model).items() if 0.0 < layer.router.threshold <= 1.0}
    flops = {}
    for phase, caps in (("prefill", cap_prefill), ("decode", cap_decode)):
        kw = dict(context=context, batch=batch, new_tokens=n)
        flops[phase] = {
            "dense": phase_flops(shape, phase, works=None, **kw).to_dict(),
            "routed": phase_flops(shape, phase, works=routed_works(granularity, caps, scored), **kw).to_dict(),
            "deleted": phase_flops(shape, phase, works=works["deleted"], **kw).to_dict()
            if oracle_reason is None
            else None,
        }

    variants_out = {}
    for v in VARIANTS:
        if v not in times:
            variants_out[v] = None
            continue
        t = times[v]
        pre, dec = statistics.median(t["prefill_s"]), statistics.median(t["decode_s"])
        variants_out[v] = {
            **t,
            "prefill_s_median": pre,
            "decode_s_median": dec,
            "prefill_tokens_per_s": batch * context / pre,
            "decode_tokens_per_s": batch * n / dec,
            "kv_cache_bytes": kv[v],
        }
    return {
        "context": context,
        "batch": batch,
        "new_tokens": n,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "capacity": {"prefill": cap_prefill, "decode": cap_decode},
        "capacity_overall": {
            "prefill": _overall(probe.capacity_prefill),
            "decode": _overall(probe.capacity_decode if granularity.endswith("token") else probe.capacity_prefill),
        },
        "oracle_layers": deleted,
        "oracle_note": oracle_reason,
        "variants": variants_out,
        "flops": flops,
        "speedup": {phase: _speedups(times, flops[phase], phase) for phase in ("prefill", "decode")},
        "kv_cache_bytes": {v: kv.get(v) for v in VARIANTS},
        "load_average": {"start": load_start, "end": _load_average()},
    }


def _oracle_layers(cap_prefill: dict[int, float], cap_decode: dict[int, float]) -> tuple[list[int] | None, str | None]:
    """Layers to delete for the oracle, or None and the reason there is no such model."""
    mixed = sorted(i for caps in (cap_prefill, cap_decode) for i, c in caps.items() if 0.0 < c < 1.0)
    if mixed:
        return None, (
            f"routed layers {sorted(set(mixed))} keep some but not all of their units; no model with "
            "deleted sub-layers computes the same thing"
        )
    skipped = sorted(i for i, c in cap_prefill.items() if c == 0.0)
    if skipped != sorted(i for i, c in cap_decode.items() if c == 0.0):
        return None, "prefill and decode skip different layers"
    if not skipped:
        return None, "nothing is skipped: the oracle is the dense model"
    return skipped, None


def _paired_median(num: list[float], den: list[float]) -> float:
    """Median of the per-repeat ratios num[r] / den[r] (the two ran side by side in repeat r)."""
    return statistics.median(a / max(b, 1e-9) for a, b in zip(num, den, strict=True))


def _speedups(times: dict[str, dict[str, list[float]]], flops: dict[str, Any], phase: str) -> dict[str, Any]:
    key, cpu_key = f"{phase}_s", f"{phase}_cpu_s"
    dense = times["dense"][key]
    measured = _paired_median(dense, times["routed"][key])
    ideal = flops["dense"]["total"] / flops["routed"]["total"]
    measured_cpu = _paired_median(times["dense"][cpu_key], times["routed"][cpu_key])
    out: dict[str, Any] = {
        "measured": measured,
        "ideal": ideal,
        "measured_over_ideal": measured / ideal,
        "measured_cpu": measured_cpu,
        "measured_cpu_over_ideal": measured_cpu / ideal,
        "all_kept_overhead": _paired_median(times["all_kept"][key], dense) - 1.0 if "all_kept" in times else None,
        "all_kept_overhead_cpu": _paired_median(times["all_kept"][cpu_key], times["dense"][cpu_key]) - 1.0
        if "all_kept" in times
        else None,
        "oracle_measured": None,
        "oracle_ideal": None,
        "routed_over_oracle": None,
    }
    if "oracle" in times and flops["deleted"] is not None:
        out["oracle_measured"] = _paired_median(dense, times["oracle"][key])
        out["oracle_ideal"] = flops["dense"]["total"] / flops["deleted"]["total"]
        out["routed_over_oracle"] = _paired_median(times["oracle"][key], times["routed"][key])
    return out


def _overall(stats: Any) -> float | None:
    if stats is None or not stats.counts:
        return None
    value = stats.overall
    return None if math.isnan(value) else value


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, model: nn.Module) -> dict[str, Any]:
    """Where the numbers were measured."""
    import transformers

    from routertune import __version__

    env: dict[str, Any] = {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "routertune": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _cell_line(cell: dict[str, Any]) -> str:
    s = cell["speedup"]
    return (
        f"context {cell['context']} batch {cell['batch']}: prefill {s['prefill']['measured']:.3f}x "
        f"(ideal {s['prefill']['ideal']:.3f}x), decode {s['decode']['measured']:.3f}x "
        f"(ideal {s['decode']['ideal']:.3f}x)"
    )


def results_table(report: dict[str, Any]) -> str:
    """A Markdown table of one report: per cell and phase, speeds, speedups and KV bytes."""
    head = (
        "| context | batch | phase | dense tok/s | routed tok/s | speedup | ideal | measured/ideal "
        "| CPU-time speedup | oracle speedup | all-kept overhead | KV dense MiB | KV routed MiB |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for cell in report["results"]:
        v = cell["variants"]
        for phase in ("prefill", "decode"):
            s = cell["speedup"][phase]
            overhead = s["all_kept_overhead"]
            rows.append(
                f"| {cell['context']} | {cell['batch']} | {phase} "
                f"| {v['dense'][f'{phase}_tokens_per_s']:.1f} | {v['routed'][f'{phase}_tokens_per_s']:.1f} "
                f"| {s['measured']:.3f} | {s['ideal']:.3f} | {s['measured_over_ideal']:.3f} "
                f"| {s['measured_cpu']:.3f} | {_fmt(s['oracle_measured'], '.3f')} "
                f"| {_fmt(None if overhead is None else 100 * overhead, '+.1f', '%')} "
                f"| {cell['kv_cache_bytes']['dense'] / 2**20:.1f} | {cell['kv_cache_bytes']['routed'] / 2**20:.1f} |"
            )
    return head + "\n".join(rows) + "\n"


def parse_sizes(text: str, label: str) -> list[int]:
    """``"512,2048"`` -> ``[512, 2048]``, with a clear error naming ``label``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--{label} must be comma-separated positive integers; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"--{label} must be comma-separated positive integers; got {text!r}")
    return values


__all__ = [
    "PRESETS",
    "SCHEMA",
    "VARIANTS",
    "BenchError",
    "BenchSettings",
    "Preset",
    "RunResult",
    "build_random_model",
    "force_skip",
    "forced_skip_layers",
    "interleaved_runs",
    "load_bench_model",
    "parse_sizes",
    "results_table",
    "routers_detached",
    "run_benchmark",
    "sublayers_deleted",
    "timed_generation",
    "variant",
]
