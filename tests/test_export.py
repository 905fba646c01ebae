"""The export stage: ONNX parity with torch, dynamic batch, metadata, and no bad file left."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastive
from contrastive.captions import templated_captions
from contrastive.config import ConfigError, ExportConfig, ModelConfig, TextConfig, parse_params
from contrastive.export import (
    EmbeddingModel,
    ExportCheckError,
    check_parity,
    onnx_metadata,
    ort_session,
)
from contrastive.inference import load_model
from contrastive.layout import Layout
from contrastive.models import (
    EncoderInfo,
    LinearProbe,
    TextSide,
    build_encoder,
    build_text_tower,
    load_encoder,
    save_encoder,
    save_probe,
)
from contrastive.stages import export
from contrastive.text import encode, train_tokenizer

SIZE = 8
MEAN = [0.4, 0.5, 0.6]
STD = [0.2, 0.25, 0.3]
FAST = ExportConfig(latency_repeats=2)


def make_inputs(root: Path, encoder: str = "small_cnn", n_test: int = 300) -> dict[str, Path]:
    """A randomly initialised encoder and probe, and a prepared dir of random images."""
    torch.manual_seed(0)
    net = build_encoder(ModelConfig(encoder=encoder, width=4))
    for module in net.modules():  # non-trivial BatchNorm statistics, so they are really checked
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    dim = net.embedding_dim
    info = EncoderInfo(model=ModelConfig(encoder=encoder, width=4).model_dump(), image_size=SIZE,
                       mean=MEAN, std=STD, embedding_dim=dim, classes=["a", "b", "c"],
                       params_hash="00c0ffee12345678")
    probe = LinearProbe(dim, 3)
    probe.feature_mean.normal_()
    probe.feature_std.uniform_(0.5, 2.0)
    layout = Layout(root)
    paths = {"root": root, "encoder": layout.encoder, "probe": layout.probe,
             "prepared": layout.prepared, "onnx": layout.onnx,
             "metrics": layout.export_metrics, "report": layout.export_report}
    save_encoder(paths["encoder"], net, info)
    save_probe(paths["probe"], probe, probe.linear.in_features)
    rng = np.random.default_rng(0)
    paths["prepared"].mkdir(parents=True)
    for split, n in (("train", 10), ("test", n_test)):
        x = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        np.savez(paths["prepared"] / f"{split}.npz", x=x, y=rng.integers(0, 3, n, dtype=np.int64))
    return paths


def run_export(paths: dict[str, Path], cfg: ExportConfig = FAST) -> dict:
    """The export stage on ``make_inputs``'s folder with ``cfg``."""
    return export.run(parse_params({"export": cfg.model_dump()}), Layout(paths["root"]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("export")
    paths = make_inputs(root)
    return {"paths": paths, "metrics": run_export(paths)}


def test_export_passes_checks_and_writes_metrics(exported: dict) -> None:
    metrics, paths = exported["metrics"], exported["paths"]
    assert paths["onnx"].is_file()
    assert not list(paths["onnx"].parent.glob("*.data"))  # weights inside the one file
    assert metrics["max_abs_diff"] <= FAST.atol
    assert metrics["prediction_agreement"] == 1.0
    assert metrics["n_test"] == 300  # two parity batches: 256 + 44
    assert metrics["exporter"] == "dynamo"
    assert metrics["opset"] == FAST.opset
    assert metrics["onnx_file_bytes"] == paths["onnx"].stat().st_size
    assert set(metrics["latency_ms"]) == {"ort_b1", "torch_b1", "ort_b256", "torch_b256"}
    assert metrics["speedup_b1"] == pytest.approx(
        metrics["latency_ms"]["torch_b1"] / metrics["latency_ms"]["ort_b1"], rel=0.01)
    # the file holds the numbers that describe the model; timings and text go to the report
    written = json.loads(paths["metrics"].read_text())
    report = json.loads(paths["report"].read_text())
    assert written == {k: metrics[k] for k in ("max_abs_diff", "prediction_agreement", "n_test",
                                                "onnx_file_bytes", "opset")}
    assert report == {k: v for k, v in metrics.items() if k not in written}


def test_an_image_only_model_has_no_text_tower(exported: dict) -> None:
    folder = exported["paths"]["root"] / "models/text"
    assert sorted(p.name for p in folder.iterdir()) == ["text.json"]
    assert json.loads((folder / "text.json").read_text())["text_tower"] is None
    assert "text" not in exported["metrics"]
    assert load_model(str(exported["paths"]["onnx"])).text is None


def add_text_side(paths: dict[str, Path], kind: str) -> TextSide:
    """Give ``make_inputs``'s encoder a random text side of ``kind`` (an image-text model)."""
    encoder, info = load_encoder(paths["encoder"])
    config = TextConfig(width=16, layers=1, heads=2, context_length=12)
    tok = train_tokenizer([p for name in info.classes for p in templated_captions(name)], 300)
    torch.manual_seed(1)
    tower = build_text_tower(info, kind, config, tok.get_vocab_size()).eval()
    side = TextSide(tower, tok, kind, config)
    save_encoder(paths["encoder"], encoder, info, side)
    return side


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_an_image_text_model_exports_both_towers_within_parity(kind: str, tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, n_test=40)
    side = add_text_side(paths, kind)
    metrics = run_export(paths)
    assert metrics["image_embeds_max_abs_diff"] <= FAST.atol
    assert metrics["text"]["max_abs_diff"] <= FAST.atol and metrics["text"]["n_texts"] == 54
    folder = tmp_path / "models/text"
    assert sorted(p.name for p in folder.iterdir()) == ["text.json", "text.onnx",
                                                        "tokenizer.json"]
    assert json.loads((folder / "text.json").read_text())["context_length"] == 12

    # what a consumer gets through onnxruntime and the saved tokenizer is torch's shared space
    model = load_model(str(paths["onnx"]))
    texts = ["a photo of a b.", "an unseen word: zebra, and é", "x" * 80]
    tokens = encode(side.tokenizer, texts, 12)
    encoder, _ = load_encoder(paths["encoder"])
    images = np.load(paths["prepared"] / "test.npz")["x"][:5]
    with torch.no_grad():
        want_text = F.normalize(side.tower.embed_texts(tokens), dim=1).numpy()
        features = EmbeddingModel(*load_encoder(paths["encoder"]))(torch.from_numpy(images))
        want_image = F.normalize(side.tower.embed_images(features), dim=1).numpy()
    np.testing.assert_allclose(model.texts().embed(texts), want_text, atol=1e-5)
    np.testing.assert_allclose(model.embed_shared(images), want_image, atol=1e-5)
    np.testing.assert_allclose(model.embed(images), features.numpy(), atol=1e-4)


def test_a_failed_text_check_writes_neither_tower(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, n_test=20)
    add_text_side(paths, "transformer")
    with pytest.raises(ExportCheckError, match="limit export.atol"):
        run_export(paths, ExportConfig(atol=1e-30, latency_repeats=1))
    assert not (tmp_path / "models/text").exists() and not paths["onnx"].exists()


def test_preprocessing_is_inside_the_graph(exported: dict) -> None:
    """Raw uint8 in, the same embeddings as the torch encoder on hand-normalised floats."""
    from contrastive.models import load_encoder

    encoder, info = load_encoder(exported["paths"]["encoder"])
    images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = encoder(x).numpy()
        wrapped = EmbeddingModel(encoder, info).eval()(torch.from_numpy(images)).numpy()
    got = ort_session(exported["paths"]["onnx"]).run(None, {"images": images})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(wrapped, expected, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported: dict, batch: int) -> None:
    session = ort_session(exported["paths"]["onnx"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    images = np.zeros((batch, SIZE, SIZE, 3), dtype=np.uint8)
    (out,) = session.run(None, {"images": images})
    assert out.shape == (batch, 16)  # small_cnn width 4 -> 16 features


def test_metadata_round_trips(exported: dict) -> None:
    meta = onnx_metadata(exported["paths"]["onnx"])
    assert meta["input_size"] == SIZE
    assert meta["mean"] == pytest.approx(MEAN)
    assert meta["std"] == pytest.approx(STD)
    assert meta["embedding_dim"] == 16
    assert meta["params_hash"] == "00c0ffee12345678"
    assert meta["classes"] == ["a", "b", "c"]
    assert meta["encoder"] == "small_cnn"
    assert (meta["channel_order"], meta["layout"]) == ("RGB", "NHWC uint8")


def test_the_model_file_names_no_folder_of_this_machine(exported: dict) -> None:
    """The exporter records a stack trace, with absolute source paths, on every node; the
    exported file must hold none, or its bytes (and the registry's state key) would depend on
    where the project sits, and the registered model would carry the machine's paths."""
    data = exported["paths"]["onnx"].read_bytes()
    for folder in (Path(contrastive.__file__).parents[1], Path(torch.__file__).parents[1]):
        assert str(folder).encode() not in data, folder
    assert b"stack_trace" not in data


def test_failed_check_leaves_no_onnx_and_keeps_an_older_one(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, n_test=20)
    strict = ExportConfig(atol=1e-30, latency_repeats=1)
    with pytest.raises(ExportCheckError, match="limit export.atol"):
        run_export(paths, strict)
    assert not paths["onnx"].exists() and not paths["metrics"].exists()
    assert list(paths["onnx"].parent.glob("*onnx*")) == []  # no temporary left

    paths["onnx"].write_bytes(b"older good model")
    with pytest.raises(ExportCheckError):
        run_export(paths, strict)
    assert paths["onnx"].read_bytes() == b"older good model"


def test_mismatched_inputs_stop_before_any_work(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, n_test=4)
    wrong = np.zeros((4, SIZE * 2, SIZE * 2, 3), dtype=np.uint8)
    np.savez(paths["prepared"] / "test.npz", x=wrong, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"test images must be uint8 \(N, 8, 8, 3\)"):
        run_export(paths)
    paths["probe"].unlink()
    with pytest.raises(ConfigError, match="probe.pt: not found"):
        run_export(paths)
    assert not paths["onnx"].exists() and not paths["metrics"].exists()


def test_check_parity_figures_and_failures() -> None:
    probe = LinearProbe(4, 2).eval()
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        probe.linear.bias.zero_()
    reference = np.array([[1.0, 0.5, 0, 0], [0.0, 2.0, 0, 0]], dtype=np.float32)

    ok = check_parity(reference, reference + 1e-6, probe, atol=1e-5)
    assert ok["max_abs_diff"] == pytest.approx(1e-6, rel=0.1)
    assert ok["prediction_agreement"] == 1.0
    with pytest.raises(ExportCheckError, match="limit export.atol"):
        check_parity(reference, reference + 1e-3, probe, atol=1e-5)
    with pytest.raises(ExportCheckError, match="limit export.atol"):
        check_parity(reference, reference * np.nan, probe, atol=1e-5)
    flipped = reference.copy()
    flipped[0, 1] = 1.0 + 1e-6  # class 0 -> class 1, within a loose atol
    with pytest.raises(ExportCheckError, match="50.00% of 2 test images; limit 100%"):
        check_parity(reference, flipped, probe, atol=1.0)


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("unsupported op\nsecond line")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    paths = make_inputs(tmp_path, n_test=20)
    metrics = run_export(paths)
    assert metrics["exporter"] == "torchscript"
    assert metrics["dynamo_error"] == "RuntimeError: unsupported op"
    assert metrics["prediction_agreement"] == 1.0
    out = ort_session(paths["onnx"]).run(None, {"images": np.zeros((3, SIZE, SIZE, 3), np.uint8)})
    assert out[0].shape == (3, 16)
    assert onnx_metadata(paths["onnx"])["params_hash"] == "00c0ffee12345678"


def test_resnet18_cifar_exports(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path, encoder="resnet18_cifar", n_test=8)
    start = time.perf_counter()
    metrics = run_export(paths, ExportConfig(latency_repeats=1))
    assert metrics["exporter"] == "dynamo"
    assert metrics["prediction_agreement"] == 1.0
    assert onnx_metadata(paths["onnx"])["embedding_dim"] == 512
    assert time.perf_counter() - start < 60
