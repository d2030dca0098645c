"""The OpenAI server's routertune middleware (``vllm serve ... --middleware`` this function).

* Checks the routertune keys of a request's ``vllm_xargs`` before the engine sees them (HTTP 400
  naming the problem).
* Adds ``"routertune": {"routed_layers": [...], "skipped_layers": [...]}`` to each non-streaming
  chat / completion response, asked from the workers by the response's id. A streamed response is
  passed through untouched (its chunks are already sent when the route could be added).
"""

from __future__ import annotations

import json
from typing import Any

from routertune.serving.extra_args import RequestArgumentError, parse_request_routing

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")


async def routes_middleware(request: Any, call_next: Any) -> Any:
    from starlette.responses import JSONResponse, Response

    if request.method != "POST" or request.url.path not in ROUTED_PATHS:
        return await call_next(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        return await call_next(request)  # vLLM answers malformed JSON itself
    try:
        parse_request_routing(body.get("vllm_xargs") if isinstance(body, dict) else None)
    except RequestArgumentError as err:
        return JSONResponse(
            {"error": {"message": str(err), "type": "BadRequestError", "param": "vllm_xargs", "code": 400}},
            status_code=400,
        )
    response = await call_next(request)
    if response.status_code != 200 or body.get("stream"):
        return response
    content = b"".join([chunk async for chunk in response.body_iterator])
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    try:
        data = json.loads(content)
        request_id = data["id"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return Response(content, status_code=response.status_code, headers=headers)
    per_worker = await request.app.state.engine_client.collective_rpc(
        "routertune_routes", args=([request_id],)
    )
    data["routertune"] = per_worker[0].get(request_id) if per_worker else None
    headers.pop("content-type", None)
    return JSONResponse(data, status_code=200, headers=headers)
