"""English text for the language-model notebooks: WikiText-2, cleaned and cut into token windows.

    from course_utils.text import load_wikitext, token_windows
    text = load_wikitext("test")                          # cleaned prose, one paragraph a line
    ids = token_windows(tokenizer, text, seq_len=128, n_windows=8)   # LongTensor [8, 128]

The files are the offline assets `text/wikitext-2-test.txt` and `text/wikitext-2-valid.txt`
(the word-level WikiText-2 release, Merity et al. 2016). That release was tokenised by its
authors: numbers are split as `1 @,@ 000`, hyphens as `guest @-@ starring`, and punctuation
stands apart (`actor .`). `clean_wikitext` undoes the worst of it so that a BPE model reads
ordinary English. Rare words stay `<unk>`, as in the release.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = ["WIKITEXT_SPLITS", "clean_wikitext", "load_wikitext", "token_windows", "tokenize"]

WIKITEXT_SPLITS = {"test": "text/wikitext-2-test.txt", "valid": "text/wikitext-2-valid.txt"}
"""Split name -> asset key (see `course_utils.assets`)."""

_JOINERS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}%]|'s\b|'re\b|'ve\b|'d\b|'ll\b|n't\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")
_QUOTES = re.compile(r'" ([^"]*?) "')


def clean_wikitext(raw: str) -> str:
    """Undo WikiText's tokenisation: `guest @-@ starring` -> `guest-starring`, `actor .` -> `actor.`.

    Headings (` = Title = `) and empty lines are dropped; every remaining paragraph becomes one
    line. `<unk>` stays as it is.
    """
    paragraphs = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for old, new in _JOINERS:
            line = line.replace(old, new)
        line = _SPACE_BEFORE.sub(r"\1", line)
        line = _SPACE_AFTER.sub(r"\1", line)
        line = _QUOTES.sub(r'"\1"', line)
        paragraphs.append(line)
    return "\n".join(paragraphs)


@lru_cache(maxsize=4)
def load_wikitext(split: str = "test") -> str:
    """The cleaned text of a WikiText-2 split (`"test"` or `"valid"`), from the course assets."""
    from course_utils.assets import path

    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; choose one of {sorted(WIKITEXT_SPLITS)}")
    return clean_wikitext(path(WIKITEXT_SPLITS[split]).read_text(encoding="utf-8"))


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids `[n]` of `text`, paragraph by paragraph (each line starts a new word), up to `max_tokens`.

    No special tokens are added. Stops reading early once `max_tokens` is reached, so a few
    thousand tokens of a long file cost milliseconds.
    """
    paragraphs = text.split("\n")
    pieces = [p if k == 0 else "\n" + p for k, p in enumerate(paragraphs)]
    ids: list[int] = []
    block = 256 if max_tokens is not None else len(pieces)  # batched: the fast tokenizer runs in parallel
    for start in range(0, len(pieces), max(block, 1)):
        for row in tokenizer(pieces[start : start + block], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if max_tokens is not None and len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    seq_len: int = 128,
    n_windows: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Consecutive, non-overlapping windows of `seq_len` tokens: LongTensor `[n_windows, seq_len]`.

    `offset` skips that many tokens first (to take windows from a different part of a text).
    Without `n_windows`, the whole text is used (the ragged end is dropped).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a token and the one after it), got {seq_len}")
    need = None if n_windows is None else offset + n_windows * seq_len
    ids = tokenize(tokenizer, text, max_tokens=need)[offset:]
    n = len(ids) // seq_len if n_windows is None else n_windows
    if n * seq_len > len(ids) or n == 0:
        raise ValueError(f"the text has {len(ids)} tokens after the offset {offset}, not enough for "
                         f"{n_windows or 1} windows of {seq_len}; ask for fewer or shorter windows")
    return ids[: n * seq_len].reshape(n, seq_len)
