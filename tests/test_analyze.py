"""Routing analysis: JSON shape, skip shares that match independent counts, a readable PNG, the CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "baselines"))

from baseline_fixtures import byte_chat_tokenizer, save_tiny_model, tiny_causal_lm  # noqa: E402

from routertune import RouterConfig, attach_routers, save_routers  # noqa: E402
from routertune.analyze import (  # noqa: E402
    ANALYSIS_JSON,
    HEATMAP_PNG,
    INSTRUCTIONS_COLUMN,
    AnalysisError,
    analyze_routing,
    format_analysis,
    plot_skip_heatmap,
    write_analysis,
)
from routertune.calibrate import DEFAULT_N, calibration_split, make_batches  # noqa: E402
from routertune.routing.attach import set_thresholds  # noqa: E402
from routertune.routing.observe import measure_capacity  # noqa: E402

from helpers import randomize_routers  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_chat_tokenizer()


def routed(tokenizer, granularity="attn_sequence", seed=0):
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed)
    attach_routers(model, RouterConfig(granularity=granularity))
    randomize_routers(model, seed=seed, scale=0.2)
    return model


@pytest.fixture(scope="module")
def analysis(tokenizer):
    model = routed(tokenizer)
    return model, analyze_routing(
        model, tokenizer, ["arc_easy", "boolq"], limit=3, instructions=6, max_length=96
    )


def test_analysis_has_layers_by_columns(analysis):
    _, result = analysis
    assert result["layers"] == [1, 2, 3, 4]
    assert result["columns"] == ["arc_easy", "boolq", INSTRUCTIONS_COLUMN]
    assert len(result["skip"]) == 4 and all(len(row) == 3 for row in result["skip"])
    values = [v for row in result["skip"] for v in row]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert 0.0 < sum(values) / len(values) < 1.0  # random routers skip some, keep some
    assert result["unit"] == "request" and result["granularity"] == "attn_sequence"
    for name in ("arc_easy", "boolq"):
        column = result["tasks"][name]
        assert column["samples"] == 3 and column["metric"] in ("acc", "acc_norm")
        assert column["value"] is not None and 0.0 <= column["value"] <= 1.0
        # arc_easy: one request per choice (>= 3 docs x 3 choices); boolq: 2 per doc.
        assert column["units_per_layer"] >= (9 if name == "arc_easy" else 6)
    json.dumps(result)  # JSON-able


def test_instruction_column_matches_an_independent_count(analysis, tokenizer):
    model, result = analysis
    _, held = calibration_split("builtin", n=DEFAULT_N, n_heldout=6)
    independent = measure_capacity(model, make_batches(tokenizer, held, max_length=96))
    column = result["tasks"][INSTRUCTIONS_COLUMN]
    for i in result["layers"]:
        assert column["skip_per_layer"][str(i)] == pytest.approx(1.0 - independent["per_layer"][str(i)])
    assert column["units_per_layer"] == 6


def test_skip_all_and_keep_all_routers(tokenizer):
    model = routed(tokenizer)
    set_thresholds(model, {1: 2.0, 2: 2.0, 3: 0.0, 4: 0.0})
    result = analyze_routing(model, tokenizer, ["boolq"], limit=2, instructions=2, max_length=64)
    assert result["skip"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert result["tasks"]["boolq"]["skip_overall"] == 0.5


def test_token_routers_count_tokens(tokenizer):
    model = routed(tokenizer, granularity="attn_token")
    result = analyze_routing(model, tokenizer, [], instructions=3, max_length=64)
    assert result["unit"] == "token" and result["columns"] == [INSTRUCTIONS_COLUMN]
    _, held = calibration_split("builtin", n=DEFAULT_N, n_heldout=3)
    tokens = sum(int(b["attention_mask"].sum()) for b in make_batches(tokenizer, held, max_length=64))
    assert result["tasks"][INSTRUCTIONS_COLUMN]["units_per_layer"] == tokens


def test_write_analysis_writes_json_and_a_png(analysis, tmp_path):
    _, result = analysis
    js, png = write_analysis(result, tmp_path / "out")
    assert json.loads(js.read_text())["skip"] == result["skip"]
    assert js.name == ANALYSIS_JSON and png.name == HEATMAP_PNG
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    table = format_analysis(result)
    assert "arc_easy" in table and table.count("\n") == len(result["layers"]) + 2


def test_bad_inputs(tokenizer, tmp_path):
    plain = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    with pytest.raises(AnalysisError, match="no routers"):
        analyze_routing(plain, tokenizer, ["boolq"])
    model = routed(tokenizer)
    with pytest.raises(AnalysisError, match="nothing to analyse"):
        analyze_routing(model, tokenizer, [], instructions=0)
    with pytest.raises(ValueError, match="unknown task"):
        analyze_routing(model, tokenizer, ["no_such_task"], instructions=0)
    with pytest.raises(AnalysisError, match="skip matrix"):
        plot_skip_heatmap({"layers": [1, 2], "columns": ["a"], "skip": [[0.1]]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_analyze_cli(tmp_path):
    from typer.testing import CliRunner

    from routertune.cli import app

    folder = save_tiny_model(tmp_path / "model")
    tok = byte_chat_tokenizer()
    model = routed(tok)
    routers = save_routers(model, tmp_path / "routers")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["analyze", "--model", str(folder), "--routers", str(routers), "--tasks", "boolq", "--limit", "2",
         "--instructions", "2", "--max_length", "64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = routers / "analysis"
    saved = json.loads((out / ANALYSIS_JSON).read_text())
    assert saved["columns"] == ["boolq", INSTRUCTIONS_COLUMN] and saved["routers_path"] == str(routers)
    assert (out / HEATMAP_PNG).read_bytes().startswith(PNG_MAGIC)
    assert "boolq" in result.output
    bad = runner.invoke(app, ["analyze", "--model", str(folder), "--routers", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    bad = runner.invoke(
        app, ["analyze", "--model", str(folder), "--routers", str(routers), "--tasks", "nope"]
    )
    assert bad.exit_code == 1 and "unknown task" in bad.output
    bad = runner.invoke(
        app,
        ["analyze", "--model", str(folder), "--routers", str(routers), "--tasks", "", "--instructions", "0"],
    )
    assert bad.exit_code == 1 and "nothing to analyse" in bad.output
