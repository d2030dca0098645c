"""``routertune generate``: stream a completion from a dense or routed model.

    routertune generate --prompt "What is 2+3?" --chat
    routertune generate --model ./my-llama --routers runs/routers --prompt "Once upon a time"
    routertune generate --routers runs/routers --prompt "Hi" --compile   # static cache + torch.compile

The text goes to stdout as it is produced; a one-line summary (new tokens, tokens/s, KV-cache
bytes) goes to stderr, so ``> out.txt`` captures only the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from routertune.commands.common import attn_option, device_option, dtype_option, fail, model_option


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text (the user message with --chat)."),
    model: str = model_option(),
    max_new_tokens: int = typer.Option(
        128, "--max_new_tokens", "--max-new-tokens", min=1, help="Most tokens to generate."
    ),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    routers: Path | None = typer.Option(
        None, "--routers", help="Router folder (router_config.json + routers.safetensors) to attach."
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="Sampling temperature; 0 = greedy."
    ),
    top_p: float = typer.Option(
        1.0, "--top_p", "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (for sampling)."),
    device: str | None = device_option(),
    dtype: str | None = dtype_option(),
    attn_implementation: str | None = attn_option(),
    compile_decode: bool = typer.Option(
        False,
        "--compile",
        help="transformers' fast path: a static KV cache and torch.compile'd decode steps (the first call "
        "compiles, which the reported speed includes; routed sub-layers run as opaque ops in the graph).",
    ),
) -> None:
    """Generate text from a prompt, streaming tokens to stdout, with a speed / KV-cache summary on stderr."""
    if top_p <= 0.0:
        fail("--top_p must be in (0, 1]")

    import torch
    from transformers import TextStreamer, set_seed

    from routertune import RouterLoadError, load_routers
    from routertune.kv_cache import kv_cache_bytes
    from routertune.loading import ModelResolutionError, load_model_and_tokenizer

    try:
        lm, tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
    except (ModelResolutionError, ValueError) as err:
        fail(str(err))
    if routers is not None:
        _warn_if_other_base(routers, lm.config._name_or_path)
        try:
            load_routers(lm, routers)
        except RouterLoadError as err:
            fail(str(err))
    if seed is not None:
        set_seed(seed)

    inputs = _encode(tokenizer, prompt, chat).to(lm.device)
    prompt_len = inputs["input_ids"].shape[1]
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False}
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if compile_decode:
        sampling.update(_compiled_decode())

    _synchronize(lm.device)
    started = _now()
    with torch.inference_mode():
        out = lm.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    _synchronize(lm.device)
    elapsed = _now() - started

    new_tokens = int(out.sequences.shape[1] - prompt_len)
    kv_bytes = kv_cache_bytes(out.cache)
    rate = new_tokens / elapsed if elapsed > 0 else float("inf")
    mode = f"routers {routers}" if routers is not None else "dense"
    if compile_decode:
        mode += ", static cache + compiled decode (speed includes compilation)"
    typer.echo(
        f"{new_tokens} new tokens in {elapsed:.2f} s ({rate:.1f} tokens/s, prompt {prompt_len} tokens); "
        f"KV cache {kv_bytes:,} bytes ({kv_bytes / 2**20:.2f} MiB); {mode}; "
        f"{lm.config._name_or_path} on {lm.device} {str(lm.dtype).removeprefix('torch.')}",
        err=True,
    )


def _compiled_decode() -> dict[str, Any]:
    """generate() arguments of the fast path; transformers compiles by itself only on accelerators."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # generate's own switch for CPUs
    return {"cache_implementation": "static", "compile_config": config}


def _encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """Token ids (and attention mask) of the prompt, (1, T)."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        fail(
            "--chat: this model's tokenizer has no chat template; drop --chat to use the prompt as plain text"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


def _warn_if_other_base(routers: Path, model_name: str) -> None:
    """Warns when routers were trained on a different base model (shapes may still match)."""
    try:
        meta = json.loads((Path(routers) / "router_config.json").read_text())
    except (OSError, ValueError):
        return  # load_routers reports missing or broken files with the details
    base = meta.get("base_model") if isinstance(meta, dict) else None
    if base and base != model_name:
        typer.echo(
            f"Warning: routers in {routers} were trained on {base!r}, this model is {model_name!r}", err=True
        )


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now() -> float:
    import time

    return time.perf_counter()
