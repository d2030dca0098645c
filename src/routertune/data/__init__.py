"""Instruction data: the seed's six raw datasets -> unified messages jsonl -> mix -> token ids.

    routertune data reformat --raw_data_root ./data/raw --save_path ./data/reformatted
    routertune data mix --reformatted_dir ./data/reformatted --save_path ./data/mixed
    routertune data builtin --save_path ./data/builtin/data.jsonl

In Python::

    from routertune.data import load_training_examples, encode_examples, PaddingCollator
    examples = load_training_examples("builtin", max_samples=1000)
    encoded = encode_examples(examples, tokenizer, max_seq_length=2048)
    collate = PaddingCollator.from_tokenizer(tokenizer)
"""

from __future__ import annotations

from routertune.data.builtin import builtin_composition, builtin_excluded, builtin_messages, write_builtin
from routertune.data.encode import (
    IGNORE_INDEX,
    ChatTemplateError,
    EncodedData,
    PaddingCollator,
    encode_example,
    encode_examples,
    render_messages,
)
from routertune.data.messages import DataFormatError, load_messages_jsonl, write_jsonl
from routertune.data.mix import DEFAULT_PORTIONS, DEFAULT_SEED, mix_datasets, parse_portions, replicate
from routertune.data.reformat import RAW_DATASETS, UnknownSenderError, reformat_dataset, reformat_datasets
from routertune.data.sources import load_training_examples

__all__ = [
    "DEFAULT_PORTIONS",
    "DEFAULT_SEED",
    "IGNORE_INDEX",
    "RAW_DATASETS",
    "ChatTemplateError",
    "DataFormatError",
    "EncodedData",
    "PaddingCollator",
    "UnknownSenderError",
    "builtin_composition",
    "builtin_excluded",
    "builtin_messages",
    "encode_example",
    "encode_examples",
    "load_messages_jsonl",
    "load_training_examples",
    "mix_datasets",
    "parse_portions",
    "reformat_dataset",
    "reformat_datasets",
    "render_messages",
    "replicate",
    "write_builtin",
    "write_jsonl",
]
