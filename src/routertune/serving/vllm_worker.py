"""The worker class that serves routed models: vLLM's own worker for the platform, plus

* after loading, the model's route book is bound to the model runner, whose input batch says which
  request each token range belongs to (the model itself sees only a flat token batch);
* before each step, the routes of requests the scheduler finished are moved to a bounded record;
* ``routertune_routes(request_ids)``, called through ``LLM.collective_rpc`` / the engine client,
  reports each request's routed and skipped layers; ``routertune_stats()`` how many tokens each
  routed layer attended and the time spent routing.

    vllm serve FOLDER --worker-cls routertune.serving.vllm_worker.RoutedWorker
"""

from __future__ import annotations

from typing import Any

from vllm.platforms import current_platform

from routertune.serving.vllm_model import route_book_of

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker


class RoutedWorker(_PlatformWorker):
    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().load_model(*args, **kwargs)
        book = route_book_of(self.model_runner.get_model())
        if book is not None:
            book.bind(self.model_runner)
        return out

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        book = self._routertune_book()
        if book is not None:
            book.finish(scheduler_output.finished_req_ids)
        return super().execute_model(scheduler_output, *args, **kwargs)

    def routertune_routes(self, request_ids: list[str]) -> dict[str, Any]:
        book = self._routertune_book()
        if book is None:
            return {rid: None for rid in request_ids}
        return book.report(request_ids)

    def routertune_stats(self) -> dict[str, Any]:
        """Tokens attended per routed layer and the time in the routed ops (RouteBook.stats)."""
        book = self._routertune_book()
        return {} if book is None else book.stats()

    def _routertune_book(self) -> Any:
        return route_book_of(self.model_runner.get_model())
