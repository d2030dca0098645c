"""``routertune eval`` under ``accelerate launch --num_processes 2`` (CPU, gloo): data-parallel
lm-eval on the routed model gives the same metrics, per-document scores and capacity counts as
one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from routertune import save_routers  # noqa: E402
from test_evaluation import byte_tokenizer, random_routers, tiny_llama  # noqa: E402

from helpers import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.parametrize("granularity", ["attn_sequence", "mlp_token"])
def test_two_process_eval_equals_one_process(tmp_path, granularity):
    tokenizer = byte_tokenizer()
    folder = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = tiny_llama(len(tokenizer))
    random_routers(model, granularity)  # routers that keep some units and skip others
    routers = save_routers(model, tmp_path / "routers")
    # 7 documents: the two processes get 4 and 3 (lm-eval pads the shorter one)
    args = ["eval", "--model", str(folder), "--routers", str(routers), "--tasks", "arc_easy,rte",
            "--limit", "7", "--batch_size", "3", "--per_doc", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for name, prefix in (
        ("one", [sys.executable, "-m", "routertune"]),
        ("two", [sys.executable, "-m", "accelerate.commands.launch",
                 "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
                 "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "routertune"]),
    ):  # fmt: skip
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [*prefix, *args, "--output_path", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count("average") == 1  # one table, from the main process only
        runs[name] = json.loads(out.read_text())
    one, two = runs["one"], runs["two"]
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    for task in ("arc_easy", "rte"):
        a, b = one["tasks"][task], two["tasks"][task]
        assert a["samples"] == b["samples"] == 7
        assert b["per_doc"] == a["per_doc"]
        for metric in ("acc", "acc_norm"):
            if metric in a:
                assert b[metric] == pytest.approx(a[metric], abs=1e-12)
        assert b["capacity"]["counts"] == a["capacity"]["counts"]
    assert two["capacity"] == one["capacity"]
    assert 0.0 < one["capacity"]["overall"] < 1.0
    assert two["average"] == one["average"]
