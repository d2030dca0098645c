"""The six converters on small files in each dataset's real raw schema (json, jsonl, parquet, saved dataset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from routertune.data.messages import DataFormatError, load_messages_jsonl
from routertune.data.reformat import RAW_DATASETS, UnknownSenderError, reformat_dataset, reformat_datasets

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _write_alpaca_parquet(folder: Path) -> Path:
    """Alpaca as on the hub: data/train-00000-of-00001-<hash>.parquet with instruction/input/output/text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads((FIXTURES / "alpaca_records.json").read_text())
    path = folder / "data" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture()
def raw_root(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    shutil.copytree(FIXTURES / "raw", root)
    _write_alpaca_parquet(root / "alpaca")
    return root


@pytest.fixture()
def reformatted(raw_root: Path, tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "reformatted"
    reports = reformat_datasets(raw_root, out)
    return {r.dataset: r for r in reports}, out


def _read(out: Path, key: str) -> list[dict]:
    return load_messages_jsonl(out / key / "data.jsonl")


def test_all_six_datasets_written_one_folder_each(reformatted):
    reports, out = reformatted
    assert list(reports) == list(RAW_DATASETS)
    for key, report in reports.items():
        assert report.found
        assert report.output == str(out / key / "data.jsonl")
        assert len(_read(out, key)) == report.kept
        assert report.kept + sum(report.dropped.values()) == report.total


def test_sharegpt_senders_drop_reasons_and_seed_file_choice(reformatted):
    reports, out = reformatted
    report = reports["vicuna_sharegpt"]
    # Only the seed's *_no_imsorry.json file is read, not its sibling or the raw HTML dump.
    assert [Path(f).name for f in report.files] == ["ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json"]
    assert report.total == 9
    assert dict(report.dropped) == {
        "bing turn": 1,
        "empty conversation": 1,
        "does not start with a user turn": 1,
        "roles do not alternate": 1,
        "empty turn": 1,
        "no assistant turn": 1,
    }
    examples = _read(out, "vicuna_sharegpt")
    assert [e["id"] for e in examples] == [
        "ShareGPT_Vicuna_unfiltered_0",
        "ShareGPT_Vicuna_unfiltered_1",
        "ShareGPT_Vicuna_unfiltered_7",
    ]
    assert all(e["dataset"] == "ShareGPT_Vicuna_unfiltered" for e in examples)
    assert examples[0]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    assert [m["role"] for m in examples[1]["messages"]] == ["system", "user", "assistant"]
    # chatgpt and bard are assistants, user is a user.
    assert [m["role"] for m in examples[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert examples[2]["messages"][3]["content"] == "Chat"


def test_evol_instruct_drops_system_conversations(reformatted):
    reports, out = reformatted
    assert dict(reports["evol_instruct"].dropped) == {"system turn": 1}
    examples = _read(out, "evol_instruct")
    assert [e["id"] for e in examples] == [
        "WizardLM_evol_instruct_V2_143k_0",
        "WizardLM_evol_instruct_V2_143k_2",
    ]
    assert examples[1]["messages"][-1] == {"role": "assistant", "content": "x ** 3"}


def test_slim_orca_keeps_system_and_leaves_out_empty_system(reformatted):
    reports, out = reformatted
    examples = _read(out, "slim_orca")
    assert reports["slim_orca"].kept == 3 and not reports["slim_orca"].dropped
    assert examples[0]["messages"][0] == {
        "role": "system",
        "content": "You are an AI assistant. User will you give you a task.",
    }
    assert [m["role"] for m in examples[1]["messages"]] == ["user", "assistant"]
    assert examples[1]["id"] == "SlimOrca_1"


def test_pair_datasets(reformatted):
    reports, out = reformatted
    math = _read(out, "meta_math_qa")
    assert dict(reports["meta_math_qa"].dropped) == {"empty turn": 1}
    assert math[0] == {
        "dataset": "MetaMathQA",
        "id": "MetaMathQA_0",
        "messages": [
            {"role": "user", "content": "What is the value of $x$ if $2x + 3 = 11$?"},
            {"role": "assistant", "content": "Subtract 3: $2x = 8$, so $x = 4$.\nThe answer is: 4"},
        ],
    }
    code = _read(out, "evol_code_alpaca")
    assert [e["id"] for e in code] == ["evol_codealpaca_v1_0", "evol_codealpaca_v1_1"]
    assert code[0]["messages"][1]["content"] == "def reverse(s):\n    return s[::-1]"


def test_alpaca_from_parquet_uses_the_seed_input_layout(reformatted):
    reports, out = reformatted
    assert reports["alpaca"].files[0].endswith(".parquet")
    alpaca = _read(out, "alpaca")
    assert dict(reports["alpaca"].dropped) == {"empty turn": 1}
    assert alpaca[0]["messages"][0]["content"] == "Give three tips for staying healthy."
    assert (
        alpaca[1]["messages"][0]["content"]
        == "Identify the odd one out.\nInput: Twitter, Instagram, Telegram\n"
    )
    assert alpaca[1]["messages"][1]["content"] == "Telegram"


def test_saved_hf_dataset_folder_gives_the_same_output_as_jsonl(tmp_path: Path, reformatted):
    import datasets

    _, out = reformatted
    records = [
        json.loads(line)
        for line in (FIXTURES / "raw/slim_orca/oo-labeled_correct.gpt4.sharegpt.jsonl")
        .read_text()
        .splitlines()
    ]
    saved = tmp_path / "saved_slim_orca"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved))
    report = reformat_dataset(saved, tmp_path / "from_saved", "slim_orca")
    assert report.files == [str(saved)]
    assert load_messages_jsonl(tmp_path / "from_saved" / "data.jsonl") == _read(out, "slim_orca")


def test_absent_datasets_are_reported_and_skipped(tmp_path: Path):
    root = tmp_path / "raw"
    shutil.copytree(FIXTURES / "raw" / "evol_instruct", root / "evol_instruct")
    reports = reformat_datasets(root, tmp_path / "out")
    found = {r.dataset: r.found for r in reports}
    assert found == {k: k == "evol_instruct" for k in RAW_DATASETS}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evol_instruct"]


def test_dataset_subset_and_unknown_dataset_name(raw_root: Path, tmp_path: Path):
    reports = reformat_datasets(raw_root, tmp_path / "out", ["alpaca", "meta_math_qa"])
    assert [r.dataset for r in reports] == ["alpaca", "meta_math_qa"]
    with pytest.raises(ValueError, match="unknown dataset.*'sharegpt'"):
        reformat_datasets(raw_root, tmp_path / "out", ["sharegpt"])


def _sharegpt_with(tmp_path: Path, records: list[dict]) -> Path:
    folder = tmp_path / "vicuna_sharegpt"
    folder.mkdir()
    (folder / "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json").write_text(json.dumps(records))
    return folder


def test_unknown_sender_names_file_and_record(tmp_path: Path):
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "claude", "value": "hey"}]},
    ]
    folder = _sharegpt_with(tmp_path, records)
    out = tmp_path / "out"
    with pytest.raises(UnknownSenderError) as error:
        reformat_dataset(folder, out, "vicuna_sharegpt")
    message = str(error.value)
    assert "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json record 1 conversations[1]" in message
    assert "'claude'" in message and "--skip_unknown_roles" in message
    assert not (out / "data.jsonl").exists()  # nothing half-written
    assert not out.exists() or not any(out.iterdir())  # no temporary file left behind

    report = reformat_dataset(folder, out, "vicuna_sharegpt", skip_unknown_roles=True)
    assert report.kept == 1 and dict(report.dropped) == {"unknown sender 'claude'": 1}


def test_missing_field_is_an_error_naming_the_field(tmp_path: Path):
    folder = _sharegpt_with(tmp_path, [{"id": "a", "turns": []}])
    with pytest.raises(DataFormatError, match=r"record 0: missing field 'conversations'"):
        reformat_dataset(folder, tmp_path / "out", "vicuna_sharegpt")
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "train.jsonl").write_text(json.dumps({"query": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl line 1: missing field 'response'"):
        reformat_dataset(tmp_path / "mm", tmp_path / "out2", "meta_math_qa")


def test_malformed_json_line_names_file_and_line(tmp_path: Path):
    folder = tmp_path / "evol_code_alpaca"
    folder.mkdir()
    good = json.dumps({"instruction": "a", "output": "b"})
    (folder / "train.jsonl").write_text(f'{good}\n{good}\n{{"instruction": "c", \n')
    with pytest.raises(DataFormatError, match=r"train.jsonl line 3: malformed json"):
        reformat_dataset(folder, tmp_path / "out", "evol_code_alpaca")


def test_malformed_json_array_names_the_line(tmp_path: Path):
    folder = tmp_path / "meta_math_qa"
    folder.mkdir()
    (folder / "MetaMathQA-395K.json").write_text('[\n  {"query": "q", "response": "r"},\n  {"query": \n]\n')
    with pytest.raises(DataFormatError, match=r"MetaMathQA-395K.json line 4 column \d+: malformed json"):
        reformat_dataset(folder, tmp_path / "out", "meta_math_qa")


def test_failed_run_keeps_the_previous_output(raw_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    reformat_dataset(raw_root / "evol_code_alpaca", out, "evol_code_alpaca")
    before = (out / "data.jsonl").read_bytes()
    with (raw_root / "evol_code_alpaca" / "train.jsonl").open("a") as f:
        f.write("not json\n")
    with pytest.raises(DataFormatError):
        reformat_dataset(raw_root / "evol_code_alpaca", out, "evol_code_alpaca")
    assert (out / "data.jsonl").read_bytes() == before
    assert [p.name for p in out.iterdir()] == ["data.jsonl"]


def test_test_split_files_are_not_training_data(tmp_path: Path):
    folder = tmp_path / "evol_code_alpaca"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(json.dumps({"instruction": "train q", "output": "a"}) + "\n")
    (folder / "data" / "test.jsonl").write_text(json.dumps({"instruction": "test q", "output": "a"}) + "\n")
    report = reformat_dataset(folder, tmp_path / "out", "evol_code_alpaca")
    assert [Path(f).name for f in report.files] == ["train.jsonl"]


def test_json_file_holding_json_lines(tmp_path: Path):
    folder = tmp_path / "slim_orca"
    folder.mkdir()
    lines = (FIXTURES / "raw/slim_orca/oo-labeled_correct.gpt4.sharegpt.jsonl").read_text()
    (folder / "slim_orca.json").write_text(lines)
    report = reformat_dataset(folder, tmp_path / "out", "slim_orca")
    assert report.kept == 3


def test_cli_reformat_reports_counts_and_errors(raw_root: Path, tmp_path: Path):
    from routertune.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "data",
            "reformat",
            "--raw_data_root",
            str(raw_root),
            "--save_path",
            str(tmp_path / "out"),
            "--datasets",
            "vicuna_sharegpt,evol_instruct",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "bing turn: 1" in result.output and "system turn: 1" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evol_instruct", "vicuna_sharegpt"]

    bad = tmp_path / "bad"
    (bad / "vicuna_sharegpt").mkdir(parents=True)
    (bad / "vicuna_sharegpt" / "x.json").write_text(
        json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}])
    )
    result = runner.invoke(
        app, ["data", "reformat", "--raw_data_root", str(bad), "--save_path", str(tmp_path / "o2")]
    )
    assert result.exit_code == 1
    assert "x.json record 0" in result.output and "'robot'" in result.output

    result = runner.invoke(app, ["data", "reformat", "--raw_data_root", str(tmp_path / "empty_root_missing")])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_nested_saved_datasets_pick_the_train_split(tmp_path: Path):
    import datasets

    records = json.loads((FIXTURES / "raw/meta_math_qa/MetaMathQA-395K.json").read_text())
    folder = tmp_path / "meta_math_qa"
    datasets.Dataset.from_list(records).save_to_disk(str(folder / "saved" / "train"))
    datasets.Dataset.from_list(records[:1]).save_to_disk(str(folder / "saved" / "test"))
    report = reformat_dataset(folder, tmp_path / "out", "meta_math_qa")
    assert report.files == [str(folder / "saved" / "train")]
    assert report.total == 3 and report.kept == 2
