"""Mixing by portions: exact sizes, the seed's sampling order, determinism, reporting."""

from __future__ import annotations

import json
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from routertune.data.messages import DataFormatError, load_messages_jsonl
from routertune.data.mix import DEFAULT_PORTIONS, mix_datasets, parse_portions, replicate


def _example(dataset: str, i: int) -> dict:
    return {
        "dataset": dataset,
        "id": f"{dataset}_{i}",
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
    }


def _write(root: Path, dataset: str, n: int, name: str = "data.jsonl") -> list[dict]:
    examples = [_example(dataset, i) for i in range(n)]
    path = root / dataset / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return examples


def test_replicate_two_and_a_half():
    items = list(range(10))
    out = replicate(items, 2.5, random.Random(0))
    assert len(out) == 25
    assert out[:20] == items + items  # two full copies, in order
    extra = out[20:]
    assert len(set(extra)) == 5 and set(extra) <= set(items)  # a random half, no repeats


@pytest.mark.parametrize(
    ("n", "portion", "expected"),
    [(10, 2.9, 29), (10, 0.0, 0), (10, 1.0, 10), (7, 0.5, 3), (3, 0.3, 0), (100, 0.07, 7), (0, 3.5, 0)],
)
def test_replicate_sizes_are_exact(n, portion, expected):
    assert len(replicate(list(range(n)), portion, random.Random(1))) == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), tenths=st.integers(0, 45))
def test_replicate_size_is_floor_of_n_times_decimal_portion(n, tenths):
    portion = tenths / 10
    out = replicate(list(range(n)), portion, random.Random(3))
    assert len(out) == (n * Fraction(tenths, 10)).__floor__()
    counts = Counter(out)
    # Every element appears int(portion) or int(portion) + 1 times.
    assert all(int(portion) <= counts[i] <= int(portion) + 1 for i in range(n))


def test_replicate_rejects_negative_portion():
    with pytest.raises(ValueError, match=">= 0"):
        replicate([1], -0.5, random.Random(0))


def test_parse_portions():
    assert parse_portions("vicuna_sharegpt=2.9, alpaca=1") == {"vicuna_sharegpt": 2.9, "alpaca": 1.0}
    for bad, message in [
        ("alpaca", "expected name=float"),
        ("alpaca=much", "not a number"),
        ("alpaca=-1", ">= 0"),
        ("alpaca=1,alpaca=2", "given twice"),
        ("", "no portions"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_portions(bad)


def test_default_portions_are_the_seeds():
    assert DEFAULT_PORTIONS == {
        "vicuna_sharegpt": 2.9,
        "evol_instruct": 1.0,
        "slim_orca": 1.0,
        "meta_math_qa": 1.0,
        "evol_code_alpaca": 1.0,
    }


@pytest.fixture()
def reformatted(tmp_path: Path) -> Path:
    root = tmp_path / "reformatted"
    _write(root, "vicuna_sharegpt", 10)
    _write(root, "evol_instruct", 4)
    _write(root, "slim_orca", 3)
    _write(root, "meta_math_qa", 5)
    _write(root, "alpaca", 6)  # reformatted but not in the default mix
    return root


def test_default_mix_counts_and_missing_dataset(reformatted: Path, tmp_path: Path):
    report = mix_datasets(reformatted, tmp_path / "mixed")
    entries = {e.dataset: e for e in report.entries}
    assert {k: (e.original, e.replicated) for k, e in entries.items()} == {
        "vicuna_sharegpt": (10, 29),
        "evol_instruct": (4, 4),
        "slim_orca": (3, 3),
        "meta_math_qa": (5, 5),
        "evol_code_alpaca": (0, 0),
    }
    assert not entries["evol_code_alpaca"].found
    mixed = load_messages_jsonl(tmp_path / "mixed" / "data.jsonl")
    assert len(mixed) == report.total == 41
    per_dataset = Counter(e["dataset"] for e in mixed)
    assert per_dataset == {"vicuna_sharegpt": 29, "evol_instruct": 4, "slim_orca": 3, "meta_math_qa": 5}
    ids = Counter(e["id"] for e in mixed if e["dataset"] == "vicuna_sharegpt")
    assert sorted(ids.values()) == [2] * 1 + [3] * 9  # nine of ten sampled for the .9 part


def test_mix_is_deterministic_and_seed_dependent(reformatted: Path, tmp_path: Path):
    mix_datasets(reformatted, tmp_path / "a")
    mix_datasets(reformatted, tmp_path / "b")
    mix_datasets(reformatted, tmp_path / "c", seed=234)
    a, b, c = ((tmp_path / x / "data.jsonl").read_bytes() for x in "abc")
    assert a == b
    assert a != c
    assert len(a.splitlines()) == len(c.splitlines())


def test_mix_follows_the_seed_random_call_order(reformatted: Path, tmp_path: Path):
    """Same inputs, same file as the seed's script: seed, then per dataset in table order one
    random.sample for the fractional part, then one shuffle of everything."""
    portions = {"vicuna_sharegpt": 2.5, "meta_math_qa": 0.6, "slim_orca": 1.0}
    mix_datasets(reformatted, tmp_path / "mixed", portions, seed=233)
    got = load_messages_jsonl(tmp_path / "mixed" / "data.jsonl")

    rng = random.Random(233)
    share = [_example("vicuna_sharegpt", i) for i in range(10)]
    math = [_example("meta_math_qa", i) for i in range(5)]
    orca = [_example("slim_orca", i) for i in range(3)]
    expected = share * 2 + rng.sample(share, 5) + rng.sample(math, 3) + orca
    rng.shuffle(expected)
    assert got == expected


def test_portions_replace_the_default_table(reformatted: Path, tmp_path: Path):
    report = mix_datasets(reformatted, tmp_path / "mixed", {"alpaca": 2.0})
    assert [e.dataset for e in report.entries] == ["alpaca"]
    assert Counter(e["dataset"] for e in load_messages_jsonl(tmp_path / "mixed" / "data.jsonl")) == {
        "alpaca": 12
    }


def test_each_file_is_replicated_on_its_own(tmp_path: Path):
    root = tmp_path / "reformatted"
    _write(root, "alpaca", 4, "part1.jsonl")
    _write(root, "alpaca", 2, "sub/part2.jsonl")
    report = mix_datasets(root, tmp_path / "mixed", {"alpaca": 1.5})
    assert report.entries[0].original == 6
    assert report.total == report.entries[0].replicated == 6 + 2 + 1


def test_no_data_at_all_is_an_error(tmp_path: Path):
    (tmp_path / "reformatted").mkdir()
    with pytest.raises(FileNotFoundError, match="run `routertune data reformat` first"):
        mix_datasets(tmp_path / "reformatted", tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="not found"):
        mix_datasets(tmp_path / "nowhere", tmp_path / "mixed")


def test_invalid_input_line_is_named(tmp_path: Path):
    root = tmp_path / "reformatted"
    _write(root, "slim_orca", 2)
    with (root / "slim_orca" / "data.jsonl").open("a") as f:
        f.write(
            json.dumps({"dataset": "x", "id": "y", "messages": [{"role": "robot", "content": "z"}]}) + "\n"
        )
    with pytest.raises(DataFormatError, match=r"data.jsonl line 3: messages\[0\] has unknown role 'robot'"):
        mix_datasets(root, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_cli_mix(reformatted: Path, tmp_path: Path):
    from routertune.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "data",
            "mix",
            "--reformatted_dir",
            str(reformatted),
            "--save_path",
            str(tmp_path / "m"),
            "--portions",
            "vicuna_sharegpt=0.5,evol_code_alpaca=1",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "absent: skipped" in result.output and "total" in result.output
    assert len(load_messages_jsonl(tmp_path / "m" / "data.jsonl")) == 5

    result = runner.invoke(app, ["data", "mix", "--reformatted_dir", str(reformatted), "--portions", "x=y"])
    assert result.exit_code == 1 and "not a number" in result.output
