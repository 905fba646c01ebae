"""CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021): an image tower and a text tower, trained so that each image's embedding is nearest
its own caption's among the batch's, both ways (:class:`~contrastive.losses.CLIPLoss`), with a
learned temperature.

The batch's third element is, for this method, each image's index into the training split
(:func:`contrastive.train.build_run` hands the batches indices instead of labels). The method
draws one of that image's captions per step from its :class:`CaptionTable`, with a generator
seeded by the run's seed and the step, which the checkpoint holds: a resumed run draws the same
captions, and so do one process and several. Under ``torchrun`` the image and text embeddings of
every process are gathered, so each image's negatives are the global batch's captions, as
SimCLR's are its views (``tests/test_distributed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from contrastive.config import Params
from contrastive.distributed import gather
from contrastive.losses import CLIPLoss, Temperature
from contrastive.methods.base import Method, MethodInputs
from contrastive.text import EOS_ID, MIN_VOCAB_SIZE, SOS_ID, encode
from contrastive.text_models import TextTower, build_text_encoder


@dataclass(frozen=True)
class CaptionTable:
    """Every caption of a split as token ids, and which rows are each image's."""

    tokens: torch.Tensor
    """``int64 (C, context_length)``: the captions of image 0, then image 1, ..."""
    first: torch.Tensor
    """``int64 (N,)``: the row of image i's first caption."""
    count: torch.Tensor
    """``int64 (N,)``: how many captions image i has (at least one)."""
    vocab_size: int

    @classmethod
    def build(cls, captions: Sequence[Sequence[str]], tok: Tokenizer,
              context_length: int) -> CaptionTable:
        """The table of ``captions`` (per image, a list of at least one caption)."""
        count = torch.tensor([len(c) for c in captions], dtype=torch.int64)
        if len(count) == 0 or int(count.min()) < 1:
            raise ValueError("every image needs at least one caption")
        first = torch.cumsum(count, 0) - count
        flat = [caption for image in captions for caption in image]
        return cls(encode(tok, flat, context_length), first, count, tok.get_vocab_size())

    @classmethod
    def blank(cls, context_length: int) -> CaptionTable:
        """One empty caption of the smallest vocabulary: enough to build the method's modules
        for a look at them (the checks before a run), not to train."""
        tokens = torch.zeros(1, context_length, dtype=torch.int64)
        tokens[0, :2] = torch.tensor([SOS_ID, EOS_ID])
        one = torch.ones(1, dtype=torch.int64)
        return cls(tokens, one - 1, one, MIN_VOCAB_SIZE)


class CLIP(Method):
    """Symmetric InfoNCE between each image's view and one of its captions, per step."""

    name = "clip"
    batch_targets = "index"

    def __init__(self, encoder: nn.Module, text_encoder: nn.Module, hidden_dim: int,
                 out_dim: int, temperature: Temperature, captions: CaptionTable,
                 seed: int) -> None:
        super().__init__(encoder, hidden_dim, out_dim, temperature)
        self.text_encoder = text_encoder
        self.criterion = CLIPLoss()
        self.seed = seed
        # derived from the data: kept out of the checkpoint, like the class weights
        self.register_buffer("tokens", captions.tokens, persistent=False)
        self.register_buffer("first", captions.first, persistent=False)
        self.register_buffer("count", captions.count, persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        """Optimiser steps taken: with the seed, which captions the next step draws."""

    @classmethod
    def from_params(cls, encoder: nn.Module, params: Params, inputs: MethodInputs) -> CLIP:
        m, t = params.model, params.train
        if inputs.captions is None:
            raise ValueError("train.method 'clip' needs the captions of the training split")
        text_encoder = build_text_encoder(m.text_encoder, m.text, inputs.captions.vocab_size,
                                          m.projection_dim)
        # CLIP learns its temperature; train.temperature is where it starts
        return cls(encoder, text_encoder, m.projection_hidden_dim, m.projection_dim,
                   Temperature(t.temperature, learnable=True), inputs.captions, params.seed)

    def pick_captions(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` of one caption of each image in ``index`` ``(B,)``, drawn for this
        step."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        # one draw per image of the split, so an image's caption does not depend on which
        # process or batch position it lands in
        draw = torch.rand(len(self.count), generator=generator).to(index.device)[index]
        count = self.count[index]
        row = self.first[index] + torch.minimum((draw * count).long(), count - 1)
        return self.tokens[row]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> their embeddings in the shared space ``(B, D)``."""
        return self.head(self.encoder(images))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        image = self.embed_images(view_a)
        text = self.text_encoder(self.pick_captions(index))
        return self.criterion(gather(image), gather(text), self.temperature())

    def text_tower(self) -> TextTower:
        """The image head and the text encoder, for zero-shot and search after training."""
        return TextTower(self.head, self.text_encoder)

    def after_step(self, progress: float) -> None:
        super().after_step(progress)
        self.steps += 1
