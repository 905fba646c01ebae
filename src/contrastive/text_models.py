"""Text encoders: token ids ``int64 (N, L)`` -> embeddings ``float32 (N, embedding_dim)``.

The input is what :func:`contrastive.text.encode` makes: ``[SOS] tokens [EOS]`` right-padded with
id 0 up to at most ``context_length``. Both encoders read only the real tokens, so appending padding
does not change an embedding, and both export to ONNX (opset 17, dynamic batch) with a fixed
sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import TextConfig
from contrastive.text import PAD_ID


def _last_real_index(tokens: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` ids -> ``(N,)`` position of the last non-pad token (``[EOS]``); 0 for none."""
    lengths = (tokens != PAD_ID).sum(dim=1)
    return (lengths - 1).clamp(min=0)


def _gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (N, L, C)``, ``index (N,)`` -> ``(N, C)``: each row's features at its own position."""
    n, _, c = x.shape
    return torch.gather(x, 1, index.view(n, 1, 1).expand(n, 1, c)).squeeze(1)


class TextTransformer(nn.Module):
    """CLIP's text tower (Radford et al. 2021, "Learning Transferable Visual Models From Natural
    Language Supervision"), small: token + learned positional embeddings, pre-LN transformer
    blocks with a causal mask, the features at ``[EOS]``, LayerNorm, a linear projection.

    The causal mask alone makes the ``[EOS]`` features blind to the padding after it; the padding
    mask also keeps pad keys out of every attention row. No dropout, as in CLIP.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embedding_dim: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.context_length = context_length
        self.embedding_dim = embedding_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embedding_dim, bias=False)
        # CLIP's initialisation: small embeddings, projection scaled by 1/sqrt(width).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (N, L, W)
        # True = may not attend: the future (causal), and pad keys. The first key stays visible,
        # so that a row of padding alone gives finite garbage, not NaN that a batch-wide loss
        # would spread to every row.
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        first = torch.arange(length, device=tokens.device) == 0
        padding = (tokens == PAD_ID) & ~first  # (N, L)
        for block in self.blocks:
            x = block(x, src_mask=causal, src_key_padding_mask=padding)
        pooled = _gather_positions(x, _last_real_index(tokens))  # (N, W) at [EOS]
        return self.projection(self.ln_final(pooled))  # (N, D)


class TextGRU(nn.Module):
    """Token embeddings, a (bidirectional) GRU over the real tokens of each caption, the final
    states of both directions, LayerNorm, a linear projection.

    The GRU runs over the padded batch, without ``pack_padded_sequence`` (which does not export to
    ONNX): the forward direction is read at the last real token, before any padding; the backward
    direction runs over each caption reversed within its own length (the padding stays at the
    end), so it too sees only real tokens before it is read. Stacked layers are built the same way,
    one direction pair at a time, so padding never reaches a real position.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, embedding_dim: int,
                 bidirectional: bool = True) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.bidirectional = bidirectional
        self.token_embedding = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        directions = 2 if bidirectional else 1
        self.forward_layers = nn.ModuleList(
            nn.GRU(width * (directions if i else 1), width, batch_first=True)
            for i in range(layers)
        )
        self.backward_layers = nn.ModuleList(
            nn.GRU(width * (directions if i else 1), width, batch_first=True)
            for i in range(layers if bidirectional else 0)
        )
        self.ln_final = nn.LayerNorm(directions * width)
        self.projection = nn.Linear(directions * width, embedding_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length = tokens.shape
        last = _last_real_index(tokens)  # (N,)
        x = self.token_embedding(tokens)  # (N, L, W)
        if not self.bidirectional:
            for gru in self.forward_layers:
                x, _ = gru(x)
            return self.projection(self.ln_final(_gather_positions(x, last)))
        # Position t of the reversed caption is position last - t of the caption (t <= last);
        # padding positions map to themselves. The map is its own inverse.
        steps = torch.arange(length, device=tokens.device).expand(n, length)  # (N, L)
        reverse = torch.where(steps <= last[:, None], last[:, None] - steps, steps)

        def flip(y: torch.Tensor) -> torch.Tensor:
            return torch.gather(y, 1, reverse[:, :, None].expand_as(y))

        for gru_f, gru_b in zip(self.forward_layers, self.backward_layers, strict=True):
            ahead, _ = gru_f(x)  # (N, L, W): position t has read tokens 0..t
            behind, _ = gru_b(flip(x))  # (N, L, W): reversed position t has read last..last-t
            x = torch.cat([ahead, flip(behind)], dim=2)  # (N, L, 2W), aligned with the tokens
        # Forward direction's final state at the last real token, backward one's at the first.
        final = torch.cat([_gather_positions(x[..., : x.shape[2] // 2], last),
                           x[:, 0, x.shape[2] // 2 :]], dim=1)  # (N, 2W)
        return self.projection(self.ln_final(final))


def build_text_encoder(kind: str, cfg: TextConfig, vocab_size: int,
                       embedding_dim: int | None = None) -> nn.Module:
    """The text encoder ``kind`` (``model.text_encoder``: transformer or gru) for a tokenizer of
    ``vocab_size`` tokens (the trained tokenizer's ``get_vocab_size()``, which may be below
    ``data.vocab_size``); ``embedding_dim`` defaults to ``cfg.width``. It has an
    ``embedding_dim`` attribute."""
    dim = cfg.width if embedding_dim is None else embedding_dim
    if kind == "transformer":
        return TextTransformer(vocab_size, cfg.context_length, cfg.width, cfg.layers, cfg.heads,
                               dim)
    if kind == "gru":
        return TextGRU(vocab_size, cfg.width, cfg.layers, dim)
    raise ValueError(f"model.text_encoder is '{kind}': there is no text encoder to build; "
                     "use transformer or gru")


class TextTower(nn.Module):
    """The two projections of an image-text model into its shared space: the image head on the
    image encoder's features, and the text encoder on token ids. Both outputs are compared by
    cosine similarity (zero-shot classification, cross-modal search)."""

    def __init__(self, image_head: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.image_head = image_head
        self.text_encoder = text_encoder

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """Image encoder features ``(N, F)`` -> shared-space embeddings ``(N, D)``."""
        return self.image_head(features)

    def embed_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, L)`` -> shared-space embeddings ``(N, D)``."""
        return self.text_encoder(tokens)
