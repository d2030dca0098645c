"""Two CPU processes under ``accelerate launch`` (gloo) train routers for a few steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "train"))

from train_fixtures import save_tiny_model, write_chat_jsonl  # noqa: E402

from routertune import load_routers  # noqa: E402
from routertune.routing.attach import router_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_cpu_processes_train_routers(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "data.jsonl", 48)
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "routertune.train",
        "--use_cpu",
        "--model_name_or_path", str(model_dir),
        "--train_file", str(data),
        "--output_dir", str(out),
        "--router_layers", "3",
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--learning_rate", "1e-2",
        "--target_capacity", "0.5",
        "--gradient_scale", "0.1",
        "--loss", "lm+distill",
        "--logging_steps", "1",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "train_results.json").read_text())
    assert results["global_batch_size"] == 8  # 2 processes x 4
    assert results["steps"] == 3
    assert "capacity_loss" in results["last_logged"] and "distill_loss" in results["last_logged"]
    weights = load_file(str(out / "routers.safetensors"))
    assert all(w.abs().sum() > 0 for w in weights.values())

    from routertune.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir, device="cpu", progress=False)
    load_routers(model, out)
    assert [int(k.split(".")[1]) for k in sorted(weights)] == [2, 3, 4]
    assert all(p.abs().sum() > 0 for p in router_parameters(model))
    for p, key in zip(router_parameters(model), sorted(weights), strict=True):
        torch.testing.assert_close(p.detach(), weights[key])


def _deepspeed_python() -> str | None:
    """A Python that has deepspeed: $ROUTERTUNE_DEEPSPEED_PYTHON, else this one if it has it."""
    candidate = os.environ.get("ROUTERTUNE_DEEPSPEED_PYTHON", sys.executable)
    probe = subprocess.run([candidate, "-c", "import deepspeed"], capture_output=True, timeout=120)
    return candidate if probe.returncode == 0 else None


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_on_two_cpu_processes(tmp_path, stage):
    """DeepSpeed is an extra (`scripts/install.sh` installs it by default): without it this test
    skips, unless ROUTERTUNE_REQUIRE_DEEPSPEED=1 (CI sets it) makes that a failure.
    ROUTERTUNE_DEEPSPEED_PYTHON names another Python with deepspeed that sees routertune."""
    python = _deepspeed_python()
    if python is None:
        message = "deepspeed is not installed (set ROUTERTUNE_DEEPSPEED_PYTHON to a Python that has it)"
        if os.environ.get("ROUTERTUNE_REQUIRE_DEEPSPEED") == "1":
            pytest.fail(message + "; ROUTERTUNE_REQUIRE_DEEPSPEED=1 requires it")
        pytest.skip(message)
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chat_jsonl(tmp_path / "data.jsonl", 48)
    out = tmp_path / "out"
    cmd = [
        python, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"),
        "--num_processes", "2",
        "--main_process_port", str(free_port()),
        "-m", "routertune.train",
        "--ddp_backend", "gloo",  # DeepSpeed on CPU: without it accelerate counts one process
        "--model_name_or_path", str(model_dir),
        "--train_file", str(data),
        "--output_dir", str(out),
        "--router_layers", "3",
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--learning_rate", "1e-2",
        "--target_capacity", "0.5",
        "--gradient_scale", "0.1",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "train_results.json").read_text())["global_batch_size"] == 8
    weights = load_file(str(out / "routers.safetensors"))
    assert all(w.abs().sum() > 0 for w in weights.values())
