"""The ``vit_tiny`` encoder: DeiT's ViT-Tiny from torchvision, trainable, saved, exported to ONNX.

Tiny images (8x8, patch 4: 4 patch tokens + the class token) keep the real 12-layer architecture
fast enough for the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from contrastive.config import ExportConfig, ModelConfig, parse_params
from contrastive.export import EmbeddingModel, onnx_metadata, ort_session
from contrastive.layout import Layout
from contrastive.models import (
    EncoderInfo,
    LinearProbe,
    ProjectionHead,
    build_encoder,
    load_encoder,
    save_encoder,
    save_probe,
)
from contrastive.stages import export

SIZE = 8
PATCH = 4
VIT = ModelConfig(encoder="vit_tiny", patch_size=PATCH)
MEAN = [0.4, 0.5, 0.6]
STD = [0.2, 0.25, 0.3]


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(VIT, SIZE)


def encoder_info() -> EncoderInfo:
    return EncoderInfo(model=VIT.model_dump(), image_size=SIZE, mean=MEAN, std=STD,
                       embedding_dim=192, classes=["a", "b", "c"], params_hash="0123456789abcdef")


def test_import_of_models_does_not_load_torchvision() -> None:
    """torchvision costs seconds per stage process; only building its encoders may load it."""
    code = ("import sys, contrastive.models; "
            "assert 'torchvision' not in sys.modules, 'loaded'; "
            "from contrastive.config import ModelConfig; "
            "contrastive.models.build_encoder(ModelConfig(encoder='vit_tiny'), 8); "
            "assert 'torchvision' in sys.modules, 'not loaded'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-500:]


def test_vit_tiny_has_deits_architecture_and_about_5_5m_parameters() -> None:
    net = build_encoder(VIT, 32)
    assert (net.hidden_dim, net.mlp_dim, len(net.encoder.layers)) == (192, 768, 12)
    assert net.encoder.layers[0].self_attention.num_heads == 3
    assert net.conv_proj.kernel_size == (PATCH, PATCH) == net.conv_proj.stride
    assert net.encoder.pos_embedding.shape == (1, 64 + 1, 192)  # 32/4 squared patches + class
    assert isinstance(net.heads, nn.Identity)
    assert net.embedding_dim == 192
    params = sum(p.numel() for p in net.parameters())
    assert 5_000_000 < params < 6_000_000


def test_patch_size_that_does_not_divide_the_image_is_refused() -> None:
    for size, patch in ((32, 5), (8, 16)):
        with pytest.raises(ValueError, match=rf"model.patch_size: {patch} does not divide"):
            build_encoder(ModelConfig(encoder="vit_tiny", patch_size=patch), size)


def test_forward_backward_on_a_batch_of_4_trains_every_parameter() -> None:
    """What every contrastive method relies on: ``encoder(x) -> (N, embedding_dim)``, gradients
    to all weights, and an optimiser step that changes the embeddings."""
    net = tiny_vit().train()
    head = ProjectionHead(net.embedding_dim, 32, 16)
    x = torch.randn(4, 3, SIZE, SIZE)
    out = net(x)
    assert out.shape == (4, net.embedding_dim)
    assert not torch.allclose(out[0], out[1])  # the class token sees each image's patches

    view = x + 0.1 * torch.randn_like(x)  # a second "view": pull the two projections together
    loss = -nn.functional.cosine_similarity(head(out), head(net(view))).mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    torch.optim.SGD(net.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.allclose(net(x), out.detach())


def test_channels_last_input_gives_the_same_embeddings() -> None:
    """Pretraining converts the encoder and its input to channels_last on CUDA."""
    net = tiny_vit().eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = net(x)
        net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    net = tiny_vit(seed=3).eval()
    save_encoder(tmp_path / "encoder.pt", net, encoder_info())
    loaded, info = load_encoder(tmp_path / "encoder.pt")
    assert not loaded.training
    assert (info.model["encoder"], info.model["patch_size"], info.image_size) == ("vit_tiny", 4, 8)
    assert loaded.embedding_dim == 192
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
        assert not torch.allclose(tiny_vit(seed=4).eval()(x), net(x))  # weights really restored


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random ViT and probe, saved, then through the export stage with its parity checks."""
    root = tmp_path_factory.mktemp("vit_export")
    layout = Layout(root)
    paths = {"encoder": layout.encoder, "probe": layout.probe, "prepared": layout.prepared,
             "onnx": layout.onnx}
    save_encoder(paths["encoder"], tiny_vit(), encoder_info())
    probe = LinearProbe(192, 3)
    probe.feature_std.fill_(0.1)  # spread the logits so the class check is not trivial
    save_probe(paths["probe"], probe, probe.linear.in_features)
    rng = np.random.default_rng(0)
    paths["prepared"].mkdir(parents=True)
    x = rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(paths["prepared"] / "test.npz", x=x, y=rng.integers(0, 3, 40, dtype=np.int64))
    metrics = export.run(parse_params({"export": {"latency_repeats": 1}}), layout)
    return {"paths": paths, "metrics": metrics}


def test_vit_exports_with_the_same_parity_checks(exported: dict) -> None:
    metrics = exported["metrics"]
    assert metrics["exporter"] == "dynamo"  # no fallback to the legacy exporter
    assert metrics["max_abs_diff"] <= ExportConfig().atol
    assert metrics["prediction_agreement"] == 1.0
    assert metrics["n_test"] == 40
    meta = onnx_metadata(exported["paths"]["onnx"])
    assert (meta["encoder"], meta["embedding_dim"], meta["input_size"]) == ("vit_tiny", 192, SIZE)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_batch_dimension_is_dynamic(exported: dict, batch: int) -> None:
    """Exported at batch 2; batches 1 and 5 give torch's embeddings through onnxruntime."""
    images = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), np.uint8)
    encoder, info = load_encoder(exported["paths"]["encoder"])
    with torch.inference_mode():
        expected = EmbeddingModel(encoder, info).eval()(torch.from_numpy(images)).numpy()
    (got,) = ort_session(exported["paths"]["onnx"]).run(None, {"images": images})
    assert got.shape == (batch, 192)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected).max() > 1e-2  # not trivially zero
