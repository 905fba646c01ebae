"""Encoders, the projection head, and the saved-encoder format shared by the stages.

An encoder maps normalised float images ``(N, 3, H, W)`` to embeddings ``(N, D)``; the
:class:`Preprocess` module turns raw ``uint8`` images ``(N, H, W, 3)`` into that input, so the
exported model can carry its own preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from contrastive.config import ModelConfig, TextConfig
from contrastive.files import atomic_path
from contrastive.text_models import TextTower, build_text_encoder


class SmallCNN(nn.Module):
    """Six 3x3 conv layers in three stages (two max-pools), then global average pooling.

    About 80 MFLOP for a 32x32 image at ``width=32``; the embedding has ``4 * width`` values.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embedding_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision_resnet(name: str, cifar_stem: bool) -> nn.Module:
    """A torchvision ResNet without weights and without its classifier.

    ``cifar_stem`` swaps the 7x7/2 stem and max-pool for one 3x3/1 conv, as in SimCLR's CIFAR
    experiments, so 32x32 images are not shrunk to 8x8 before the first block.
    """
    import torchvision  # slow import (seconds); only these encoders need it

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.embedding_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


VIT_TINY: dict[str, int] = {"hidden_dim": 192, "num_layers": 12, "num_heads": 3, "mlp_dim": 768}
"""ViT-Tiny as in DeiT (Touvron et al. 2021, "Training data-efficient image transformers")."""


def vit_tiny(image_size: int, patch_size: int) -> nn.Module:
    """torchvision's VisionTransformer with DeiT's ViT-Tiny sizes, untrained, no classifier.

    The embedding is the class token's final (layer-normed) representation, 192 values; about
    5.5M parameters. It accepts only ``image_size x image_size`` inputs (``prepare`` resizes every
    image to ``data.image_size``), cut into ``(image_size / patch_size)^2`` patch tokens, e.g. 64
    for 32x32 images and patch 4.
    """
    if image_size % patch_size:
        raise ValueError(f"model.patch_size: {patch_size} does not divide the image size "
                         f"{image_size}; use a divisor of {image_size}")
    from torchvision.models import VisionTransformer  # slow import; only this encoder needs it

    net = VisionTransformer(image_size=image_size, patch_size=patch_size, **VIT_TINY)
    net.heads = nn.Identity()  # forward() ends with self.heads(class_token)
    net.embedding_dim = VIT_TINY["hidden_dim"]
    return net


def build_encoder(cfg: ModelConfig, image_size: int = 32) -> nn.Module:
    """The encoder named by ``model.encoder`` for square images of ``image_size``; it has an
    ``embedding_dim`` attribute."""
    if cfg.encoder == "small_cnn":
        return SmallCNN(cfg.width)
    if cfg.encoder == "vit_tiny":
        return vit_tiny(image_size, cfg.patch_size)
    if cfg.encoder == "resnet18_cifar":
        return _torchvision_resnet("resnet18", cifar_stem=True)
    return _torchvision_resnet(cfg.encoder, cifar_stem=False)


class ProjectionHead(nn.Sequential):
    """SimCLR's MLP head: Linear -> BatchNorm -> ReLU -> Linear. Used in pretraining only."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class Preprocess(nn.Module):
    """Raw images ``uint8 (N, H, W, 3)`` -> normalised ``float32 (N, 3, H, W)``."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std


def normalize(x01: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Float images in [0, 1], ``(N, 3, H, W)`` -> normalised with the dataset's mean and std."""
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


@dataclass
class EncoderInfo:
    """What a consumer needs to rebuild and feed a saved encoder."""

    model: dict
    image_size: int
    mean: list[float]
    std: list[float]
    embedding_dim: int
    classes: list[str]
    params_hash: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TextSide:
    """The text half of an image-text (``clip``) model, saved in the encoder's file: the image
    head and the text encoder (:class:`~contrastive.text_models.TextTower`) and the tokenizer
    that feeds it, so the file alone embeds images and captions in one space."""

    tower: TextTower
    tokenizer: Tokenizer
    kind: str
    """``model.text_encoder``: transformer or gru."""
    config: TextConfig
    logit_scale: float | None = None
    """1 / the learned temperature, CLIP's logit scale: cosine x scale are the logits whose
    softmax over labels gives zero-shot probabilities. None for a side not trained (random-init)."""


def save_encoder(path: str | Path, encoder: nn.Module, info: EncoderInfo,
                 text: TextSide | None = None) -> None:
    """Write ``{"info", "state_dict"}`` (and ``"text"`` for an image-text model) atomically and
    synced (``files.atomic_path``)."""
    blob: dict = {"info": asdict(info), "state_dict": _cpu_state(encoder)}
    if text is not None:
        blob["text"] = {"kind": text.kind, "config": text.config.model_dump(mode="json"),
                        "vocab_size": text.tokenizer.get_vocab_size(),
                        "tokenizer": text.tokenizer.to_str(), "state_dict": _cpu_state(text.tower),
                        "logit_scale": text.logit_scale}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_text_side(path: str | Path) -> TextSide | None:
    """The text half saved with an image-text encoder (in eval mode, on the CPU); None for an
    encoder of images alone."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "text" not in blob:
        return None
    text, info = blob["text"], EncoderInfo(**blob["info"])
    config = TextConfig(**text["config"])
    tower = build_text_tower(info, text["kind"], config, text["vocab_size"])
    tower.load_state_dict(text["state_dict"])
    return TextSide(tower.eval(), Tokenizer.from_str(text["tokenizer"]), text["kind"], config,
                    text.get("logit_scale"))


def build_text_tower(info: EncoderInfo, kind: str, config: TextConfig,
                     vocab_size: int) -> TextTower:
    """A freshly initialised image head and text encoder for the encoder ``info`` describes."""
    model = ModelConfig(**info.model)
    head = ProjectionHead(info.embedding_dim, model.projection_hidden_dim, model.projection_dim)
    return TextTower(head, build_text_encoder(kind, config, vocab_size, model.projection_dim))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def load_encoder(path: str | Path) -> tuple[nn.Module, EncoderInfo]:
    """Rebuild a saved encoder (in eval mode, on the CPU) and its :class:`EncoderInfo`."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    info = EncoderInfo(**blob["info"])
    encoder = build_encoder(ModelConfig(**info.model), info.image_size)
    encoder.load_state_dict(blob["state_dict"])
    return encoder.eval(), info


class LinearProbe(nn.Module):
    """A linear classifier on standardised frozen features: ``Linear((f - mean) / std)``."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(embedding_dim))
        self.register_buffer("feature_std", torch.ones(embedding_dim))
        self.linear = nn.Linear(embedding_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def save_probe(path: str | Path, probe: LinearProbe | None, embedding_dim: int) -> None:
    """Write a probe atomically and synced as ``{"embedding_dim", "num_classes", "state_dict"}``;
    for data without classes (no probe) ``num_classes`` 0 and no weights, so the file still
    says what it is."""
    classes, state = 0, {}
    if probe is not None:
        classes = probe.linear.out_features
        state = {k: v.detach().cpu() for k, v in probe.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"embedding_dim": embedding_dim, "num_classes": classes, "state_dict": state},
                   tmp)


def load_probe(path: str | Path) -> LinearProbe | None:
    """Rebuild a probe saved by :func:`save_probe`, in eval mode on the CPU; None when the data
    had no classes."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob["num_classes"] == 0:
        return None
    probe = LinearProbe(blob["embedding_dim"], blob["num_classes"])
    probe.load_state_dict(blob["state_dict"])
    return probe.eval()
