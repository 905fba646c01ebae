"""Captions to token ids and back: a BPE tokenizer trained on the project's own captions.

The vocabulary is learned from the training captions by :func:`train_tokenizer` and saved beside
the model (:func:`save_tokenizer`); nothing is downloaded. :func:`encode` turns captions into the
fixed-size ``int64 (N, context_length)`` input of the text encoders (``text_models``):

    [SOS] tokens... [EOS] [PAD] [PAD] ...      PAD is id 0, so ``tokens != 0`` marks real tokens

Special tokens have fixed ids: ``[PAD]`` 0, ``[SOS]`` 1, ``[EOS]`` 2, ``[UNK]`` 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from contrastive.config import ConfigError
from contrastive.files import atomic_path

PAD, SOS, EOS, UNK = "[PAD]", "[SOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, SOS, EOS, UNK)
"""In id order: ``[PAD]`` is 0, ``[SOS]`` 1, ``[EOS]`` 2, ``[UNK]`` 3."""
PAD_ID, SOS_ID, EOS_ID, UNK_ID = range(4)
TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer's file name, in the prepared data and beside the exported text tower."""
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
"""The special tokens and the 256 bytes; merges learned from the captions come on top."""


def _normalizer() -> normalizers.Normalizer:
    """NFKC, lower case, runs of whitespace as one space, no space at either end."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer learned from ``captions`` alone, with at most ``vocab_size``
    tokens (fewer when the captions run out of pairs worth merging).

    Why byte-level (as GPT-2 and CLIP): every caption is encoded losslessly after cleaning, so
    ``decode(encode(c)) == clean(c)``, and a character never seen in training (an accent, an
    emoji) becomes its UTF-8 bytes instead of ``[UNK]``; ``[UNK]`` is kept for a stable id layout
    but byte-level BPE never emits it. Why lower case and collapsed whitespace (as CLIP): captions
    are short, the vocabulary is small, and "Dog" and "dog" should not spend two entries or be
    learned separately. Words carry a leading space (``add_prefix_space``), so a word is the same
    token at the start of a caption and in its middle.

    Deterministic: the same captions give the same vocabulary JSON, byte for byte, in any process
    (the trainer sorts its alphabet and breaks ties between merges by token id).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes and "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(iter(captions), trainer)
    # For consumers that use the tokenizers library alone (another language, a service):
    # ``tok.encode(c).ids`` is then what :func:`encode` gives before truncation and padding.
    tok.post_processor = TemplateProcessing(
        single=f"{SOS} $A {EOS}", special_tokens=[(SOS, SOS_ID), (EOS, EOS_ID)]
    )
    return tok


def for_model(tok: Tokenizer, context_length: int) -> Tokenizer:
    """A copy of ``tok`` that truncates and pads to ``context_length`` itself, so that
    ``[e.ids for e in tok.encode_batch(captions)]`` is what :func:`encode` gives: the file saved
    beside an exported text tower, for consumers with the tokenizers library alone."""
    ready = Tokenizer.from_str(tok.to_str())
    ready.enable_truncation(max_length=context_length)  # keeps room for [SOS] and [EOS]
    ready.enable_padding(length=context_length, pad_id=PAD_ID, pad_token=PAD)
    return ready


def clean(tok: Tokenizer, caption: str) -> str:
    """The caption as the tokenizer sees it (NFKC, lower case, whitespace collapsed)."""
    return tok.normalizer.normalize_str(caption) if tok.normalizer is not None else caption


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write the tokenizer's JSON atomically (a temporary file beside ``path``, then renamed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(tok.to_str(pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by :func:`save_tokenizer`.

    A missing file, a file that is not a tokenizer, or one without this module's special tokens
    at their ids raises :class:`~contrastive.config.ConfigError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a tokenizer file ({reason})") from None
    ids = {token: tok.token_to_id(token) for token in SPECIAL_TOKENS}
    expected = dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True))
    if ids != expected:
        found = ", ".join(f"{token}={ids[token]}" for token in SPECIAL_TOKENS)
        raise ConfigError(f"{path}: the special tokens must have the ids "
                          f"{PAD}=0, {SOS}=1, {EOS}=2, {UNK}=3; found {found}")
    return tok


def encode(tok: Tokenizer, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Captions -> ``int64 (N, context_length)``: ``[SOS] tokens [EOS]``, right-padded with 0.

    A caption too long for the context keeps its first ``context_length - 2`` tokens and still
    ends with ``[EOS]``, so the encoders always find it at the last non-pad position.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 ([SOS] and [EOS]), got "
                         f"{context_length}")
    if isinstance(texts, str):
        raise TypeError("encode takes a sequence of captions, not one string")
    out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.int64)
    keep = context_length - 2
    for row, encoding in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        ids = [SOS_ID, *encoding.ids[:keep], EOS_ID]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def decode(tok: Tokenizer, tokens: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """Token ids ``(N, L)`` -> N cleaned captions, without special tokens and padding."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    # The byte-level decoder keeps the space added before the first word; cleaned text never
    # starts with one.
    return [text.removeprefix(" ") for text in tok.decode_batch(rows, skip_special_tokens=True)]
