"""Shared fixtures: tiny random Llama, Mistral (sliding window) and Qwen2 models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from helpers import ARCHS  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
