"""lm-eval's HFLM with the padding mask (and the prompt's routing mask) in its forwards.

lm-eval's HFLM right-pads a batch of log-likelihood requests and calls the model without an
attention mask. A plain causal model does not care (padding sits after every real token), but a
sequence-level router averages its input over the sequence, so padding would change its
decision and results would depend on which requests share a batch. ``MaskedHFLM`` passes the
padding mask, making every request's result independent of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from routertune.data.encode import ROUTE_ON
from routertune.evaluation.errors import EvaluationError
from routertune.routing.attach import ROUTING_MASK_ARG, forced_routes, get_router_config, routed_layers


def _has_sequence_routers(model: torch.nn.Module) -> bool:
    config = get_router_config(model)
    return config is not None and config.unit == "sequence"


class MaskedHFLM(HFLM):
    """lm-eval's HFLM whose log-likelihood forwards carry the padding mask.

    Only the causal log-likelihood path changes (``loglikelihood`` and
    ``loglikelihood_rolling`` both go through it); generation already passes a mask. Requests
    are batched as in HFLM (longest first, one forward per group of requests that share
    context + continuation[:-1]), and scored the same way: sum of the continuation tokens'
    log-probabilities and whether each is the greedy token. Logits are computed only at the
    positions that score continuations (``logits_to_keep``), when the model supports it.

    Sequence routers decide on the context alone (``route_on="prompt"``, the default), as in
    generation, where the prompt is prefilled and routed before any answer token exists: every
    answer choice of a question is then scored by the same sub-network, and the score is the
    one a deployed routed model would give. ``route_on="all"`` decides on context +
    continuation (the seed's evaluation).

    ``request_routes`` (analysis: per-document oracles) forces a route per request instead of
    the routers' decision: called with the request's context string, it returns the routed
    layers that request skips; every other routed layer keeps it. The choices of a document
    mostly share its context and so its route; where each choice has its own context
    (WinoGrande), the caller maps each of them to the document's route.
    """

    def __init__(
        self,
        *args: Any,
        route_on: str = "prompt",
        request_routes: Callable[[str], Collection[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        if route_on not in ROUTE_ON:
            raise EvaluationError(f"route_on must be one of {ROUTE_ON}; got {route_on!r}")
        super().__init__(*args, **kwargs)
        self.route_on = route_on
        self.request_routes = request_routes
        if request_routes is not None and not _has_sequence_routers(self.model):
            raise EvaluationError("request_routes needs *_sequence routers attached to the model")
        # HFLM sets up data parallelism only for a model it loads itself (and only on GPUs);
        # with a model object it expects the caller's: launched processes split the documents.
        accelerator = launched_accelerator()
        if accelerator is not None:
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        def longest_first(req: tuple[tuple[str, str], list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        reorder = Collator(
            requests,
            sort_fn=longest_first,
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda req: req[1] + req[2][:-1],
        )
        auto = self.batch_size == "auto"
        batch_size = (override_bs or 0) if auto else self.batch_size
        batch_fn = self._batch_scheduler if auto and not override_bs and len(reorder) > 0 else None
        if batch_fn is not None:
            self.batch_sizes = {}

        results: list[tuple[float, bool]] = []
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for chunk in reorder.get_batched(n=batch_size, batch_fn=batch_fn):
            windows = [self._window(context, continuation) for _, context, continuation in chunk]
            with self._forced_routes([request for request, _, _ in chunk]):
                cont_logprobs = self._continuation_logprobs(windows, [len(c) for _, _, c in chunk])
            for (request_str, context, continuation), logprobs in zip(chunk, cont_logprobs, strict=True):
                # One forward may serve several requests with the same context and one-token
                # continuations (lm-eval's logits cache); get_cache yields each of them.
                for req_str, cont_toks, lp in reorder.get_cache(
                    req_str=request_str,
                    cxt_toks=context,
                    cont_toks=continuation,
                    logits=logprobs.unsqueeze(0),
                ):
                    target = torch.tensor([cont_toks], dtype=torch.long, device=lp.device)  # (1, L)
                    lp = lp[:, -target.shape[1] :]  # (1, L, V)
                    greedy = bool((lp.argmax(dim=-1) == target).all())
                    answer = (float(lp.gather(2, target.unsqueeze(-1)).sum()), greedy)
                    results.append(answer)
                    if req_str is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
                    pbar.update(1)
        pbar.close()
        return reorder.get_original(results)

    def _forced_routes(self, requests: list[tuple[str, str] | None]):
        """``request_routes``' routes for one batch (a no-op without them)."""
        if self.request_routes is None:
            return contextlib.nullcontext()
        if any(r is None for r in requests):
            raise EvaluationError("request_routes needs each request's context (not rolling log-likelihoods)")
        skips = [set(self.request_routes(context)) for context, _ in requests]
        layers = routed_layers(self.model)
        unknown = set().union(*skips) - set(layers)
        if unknown:
            raise EvaluationError(f"request_routes named layers that are not routed: {sorted(unknown)}")
        keep = {
            i: torch.tensor([i not in skip for skip in skips], device=self.device)
            for i in layers
        }
        return forced_routes(self.model, keep)

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The tokens fed to the model: context + continuation minus its last token, left-truncated."""
        if not context or not continuation:
            raise EvaluationError("lm-eval produced a request with an empty context or continuation")
        if len(continuation) > self.max_length:
            raise EvaluationError(
                f"a continuation of {len(continuation)} tokens exceeds the model's max length {self.max_length}"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _continuation_logprobs(self, windows: list[list[int]], cont_lens: list[int]) -> list[torch.Tensor]:
        """Log-probabilities at the positions that predict each request's continuation.

        Args:
            windows: B token lists (input windows, unpadded).
            cont_lens: continuation length of each request.

        Returns:
            B tensors of shape ``(cont_len_i, V)``.
        """
        B, T = len(windows), max(len(w) for w in windows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # right padding, as HFLM
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, w in enumerate(windows):
            input_ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
            attention_mask[i, : len(w)] = 1
        starts = [len(w) - n for w, n in zip(windows, cont_lens, strict=True)]
        ends = [len(w) for w in windows]
        lo, hi = min(starts), max(ends)
        kwargs: dict[str, Any] = {"use_cache": False}
        if self.route_on == "prompt" and _has_sequence_routers(self.model):
            routing_mask = torch.zeros((B, T), dtype=torch.long)
            for i, s in enumerate(starts):
                routing_mask[i, : s + 1] = 1  # the context's tokens inside this window
            kwargs[ROUTING_MASK_ARG] = routing_mask.to(self.device)
        if self._supports_logits_to_keep():
            kwargs["logits_to_keep"] = torch.arange(lo, hi, device=self.device)
            offset = lo
        else:
            offset = 0
        dtype = getattr(self, "mixed_precision_dtype", None)
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            ).logits  # (B, hi - lo or T, V)
        softmax_dtype = getattr(self, "softmax_dtype", None)
        return [
            F.log_softmax(logits[i, s - offset : e - offset], dim=-1, dtype=softmax_dtype)
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
        ]

    def _supports_logits_to_keep(self) -> bool:
        cached = getattr(self, "_logits_to_keep_ok", None)
        if cached is None:
            import inspect

            cached = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._logits_to_keep_ok = cached
        return cached


def launched_accelerator() -> Any:
    """accelerate's ``Accelerator`` when this process is one of several launched together
    (``accelerate launch`` / ``torchrun``: ``WORLD_SIZE`` > 1), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import Accelerator

    # Without a GPU accelerate sets up several processes only when told they run on the CPU.
    return Accelerator(cpu=not torch.cuda.is_available())
