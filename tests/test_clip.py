"""Image-text contrastive learning (``train.method: clip``) through the pipeline: paired data
from ``prepare``, the method in the training loop, zero-shot and cross-modal recall in the
probe stage, and the one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from contrastive.captions import TEMPLATES, templated_captions
from contrastive.classify import label_embeddings
from contrastive.cli import main
from contrastive.config import TextConfig, load_params
from contrastive.crossmodal import (
    class_embeddings,
    embed_images,
    embed_texts,
    image_text_metrics,
    recall_at,
)
from contrastive.data import load_captions, load_manifest, load_prepared_tokenizer, load_split
from contrastive.export import EmbeddingModel
from contrastive.inference import load_model
from contrastive.layout import Layout
from contrastive.models import TextSide, load_encoder, load_text_side
from contrastive.text import encode, train_tokenizer
from contrastive.text_models import TextTower
from tests.conftest import new_store, write_params

PAIRS = {"data": {"source": "pairs", "vocab_size": 300}}
CLIP = {**PAIRS,
        "train": {"method": "clip", "epochs": 10, "warmup_epochs": 1, "temperature": 0.1,
                  "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05},
        "model": {"text_encoder": "transformer",
                  "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}}}


# --- the figures, on a set where the answer is known -------------------------------------------


class ClassWords(nn.Module):
    """A text encoder that knows the class names: a caption's embedding is the one-hot vector of
    the class whose name's token it holds."""

    def __init__(self, class_token_ids: list[int], vocab_size: int) -> None:
        super().__init__()
        table = torch.zeros(vocab_size, len(class_token_ids))
        for k, token in enumerate(class_token_ids):
            table[token, k] = 1.0
        self.table = nn.Embedding.from_pretrained(table)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens).sum(dim=1)


CLASSES = ["cat", "dog", "ship", "frog"]


@pytest.fixture(scope="module")
def known() -> TextSide:
    captions = [c for name in CLASSES for c in templated_captions(name)]
    tok = train_tokenizer(captions, 300)
    ids = [encode(tok, [name], 8)[0, 1].item() for name in CLASSES]  # [SOS] name [EOS]
    assert len(set(ids)) == len(CLASSES)  # each name one token of its own
    tower = TextTower(nn.Identity(), ClassWords(ids, tok.get_vocab_size()))
    return TextSide(tower, tok, "transformer", TextConfig(context_length=16))


def test_zero_shot_and_recall_find_the_known_answer(known: TextSide) -> None:
    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    features = F.one_hot(labels, 4).float() + 0.1 * torch.randn(40, 4)  # near their class axis
    captions = [[f"a photo of a {CLASSES[k]}."] for k in labels.tolist()]
    found = image_text_metrics(known, features, labels, CLASSES, captions)
    assert found["zero_shot_top1"] == 1.0 and found["zero_shot_top5"] == 1.0
    assert found["image_to_text_recall_at_1"] == 1.0  # the class's caption is the nearest
    assert found["text_to_image_recall_at_1"] == 1.0
    wrong = image_text_metrics(known, features, (labels + 1) % 4, CLASSES, captions)
    assert wrong["zero_shot_top1"] == 0.0 and wrong["zero_shot_top5"] == 1.0  # 4 classes


def test_recall_at_counts_a_relevant_item_among_the_k_nearest() -> None:
    queries = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    gallery = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.0]]), dim=1)
    relevant = torch.tensor([[False, False, True], [False, True, False]])
    # query 0 ranks 0, 2, 1: its relevant item is second; query 1 ranks 1 first
    assert recall_at(queries, gallery, relevant, (1, 2, 3)) == {1: 0.5, 2: 1.0, 3: 1.0}


# --- the pipeline ------------------------------------------------------------------------------


def write_images(folder: Path, names: list[str]) -> None:
    """Random 12x12 PNGs, distinct (exact duplicates would be dropped)."""
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / name)


def test_prepare_captions_the_digits_with_the_templates(workspace: Path) -> None:
    write_params(workspace, PAIRS)
    assert main(["prepare"]) == 0
    manifest = load_manifest("data/prepared")
    captions = load_captions("data/prepared")
    assert manifest["captions"]["from"] == "templates"
    for split in ("train", "val", "test"):
        y = torch.from_numpy(np.load(f"data/prepared/{split}.npz")["y"])
        assert len(captions[split]) == len(y)
        assert all(c == templated_captions(manifest["classes"][k])
                   for c, k in zip(captions[split], y.tolist(), strict=True))
        assert manifest["captions"]["counts"][split] == len(y) * len(TEMPLATES)
    tok = load_prepared_tokenizer("data/prepared")
    assert tok is not None and tok.get_vocab_size() <= 300
    plain = json.loads(Path("data/prepared/manifest.json").read_text())["data_hash"]
    write_params(workspace)
    assert main(["prepare"]) == 0
    assert load_manifest("data/prepared")["data_hash"] != plain  # captions are part of the data
    assert load_captions("data/prepared") is None


@contextmanager
def every_stage(root: Path, mlflow_template: Path) -> Iterator[None]:
    """Run the five stages in ``root`` (its params.yaml) into its own MLflow store; the folder
    and the store stay set until the context ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, root / "store"))
        for stage in ("prepare", "pretrain", "probe", "export", "register"):
            assert main([stage]) == 0, stage
        yield


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Path]:
    """Every stage with clip on the captioned digits, once for the tests, into the run's own
    MLflow store (set for the tests that use the fixture)."""
    root = tmp_path_factory.mktemp("clip")
    write_params(root, CLIP)
    with every_stage(root, mlflow_template):
        yield root


def test_clip_trains_and_the_probe_reports_zero_shot_and_recall(clip_run: Path) -> None:
    probe = json.loads((clip_run / "metrics/probe.json").read_text())
    pretrained, random_init = probe["pretrained"], probe["random_init"]
    for found in (pretrained, random_init):
        for k in (1, 5, 10):
            assert 0 <= found[f"image_to_text_recall_at_{k}"] <= 1
        assert found["image_to_text_recall_at_1"] <= found["image_to_text_recall_at_10"]
    # ten epochs on the digits: far above the random towers and chance (0.1)
    assert pretrained["zero_shot_top1"] > random_init["zero_shot_top1"] + 0.3
    assert pretrained["image_to_text_recall_at_1"] > random_init["image_to_text_recall_at_1"] + 0.3
    assert probe["gain_over_random"]["zero_shot_top1"] == pytest.approx(
        pretrained["zero_shot_top1"] - random_init["zero_shot_top1"], abs=1e-6)
    report = json.loads((clip_run / "reports/pretrain.json").read_text())
    assert report["method"] == "clip"
    assert 0.01 <= json.loads((clip_run / "metrics/pretrain.json").read_text())["temperature"] <= 1


def test_the_encoder_file_holds_the_text_side(clip_run: Path) -> None:
    layout = Layout(clip_run)
    side = load_text_side(layout.encoder)
    assert side is not None and side.kind == "transformer" and side.config.context_length == 16
    encoder, info = load_encoder(layout.encoder)
    tokens = encode(side.tokenizer, ["a photo of a 3.", "a photo of a 7."], 16)
    with torch.no_grad():
        texts = side.tower.embed_texts(tokens)
        images = side.tower.embed_images(encoder(torch.zeros(2, 3, 8, 8)))
    assert texts.shape == images.shape == (2, load_params(clip_run / "params.yaml")
                                           .model.projection_dim)
    assert info.model["text_encoder"] == "transformer"


def test_clip_on_images_without_captions_is_one_line(workspace: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    write_params(workspace, {k: v for k, v in CLIP.items() if k != "data"})
    assert main(["prepare"]) == 0
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.method: 'clip'" in err and "data.source: pairs" in err and "\n" not in err
    assert not Path("models/encoder.pt").exists() and not Path("checkpoints/last.pt").exists()


def test_image_only_encoders_have_no_text_side(workspace: Path) -> None:
    assert main(["prepare"]) == 0
    assert main(["pretrain"]) == 0
    assert load_text_side("models/encoder.pt") is None


def test_prepare_reads_a_caption_file_and_counts_what_it_skipped(workspace: Path) -> None:
    names = [f"img/{k}.png" for k in range(8)]
    write_images(workspace / "pairs", names)
    rows = [f"{name},a picture number {k},{'odd' if k % 2 else 'even'}"
            for k, name in enumerate(names)]
    rows.append("img/gone.png,a missing picture,odd")
    (workspace / "pairs/captions.csv").write_text("\n".join(["image,caption,label", *rows]))
    write_params(workspace, {"data": {"source": "pairs", "path": "pairs/captions.csv",
                                      "image_size": 8, "vocab_size": 300,
                                      "val_fraction": 0.25, "test_fraction": 0.25}})
    assert main(["prepare"]) == 0
    manifest = load_manifest("data/prepared")
    assert manifest["classes"] == ["even", "odd"] and manifest["captions"]["from"] == "file"
    assert {"reason": "missing image", "count": "1"} in manifest["skipped"]
    captions = load_captions("data/prepared")
    assert sorted(c for split in captions.values() for own in split for c in own) == sorted(
        f"a picture number {k}" for k in range(8))


# --- export, serving, search and classify ------------------------------------------------------


def test_both_towers_are_exported_within_parity_and_the_gate_ranks_by_zero_shot(
        clip_run: Path) -> None:
    export = json.loads((clip_run / "metrics/export.json").read_text())
    assert export["max_abs_diff"] <= 1e-4 and export["image_embeds_max_abs_diff"] <= 1e-4
    assert export["text"]["max_abs_diff"] <= 1e-4
    # the probe's zero-shot figure (torch) again, from the ONNX files and the saved tokenizer
    model = load_model("models/encoder.onnx")
    x, y = load_split("data/prepared", "test")
    predicted = (model.embed_shared(x) @ label_embeddings(model.texts(), model.classes).T)
    probe = json.loads((clip_run / "metrics/probe.json").read_text())["pretrained"]
    assert float((predicted.argmax(axis=1) == y).mean()) == pytest.approx(
        probe["zero_shot_top1"], abs=1e-5)
    registered = json.loads((clip_run / "reports/registry.json").read_text())
    assert registered["gate_metric"] == "zero_shot_top1" and registered["decision"] == "promoted"
    assert registered["zero_shot_top1"] == probe["zero_shot_top1"]


def test_the_registered_model_serves_images_texts_and_both(clip_run: Path) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    served = mlflow.pyfunc.load_model("models:/contrastive-encoder@champion")
    local = load_model("models/encoder.onnx")
    x = load_split("data/prepared", "test")[0][:3]
    texts = np.array(["a photo of a 3.", "a blurry photo of a 7."])
    only_texts = served.predict({"texts": texts})
    np.testing.assert_allclose(only_texts["text_embeds"], local.texts().embed(list(texts)),
                               atol=1e-6)
    both = served.predict({"images": x, "texts": texts}, params={"neighbours": 2})
    np.testing.assert_allclose(both["image_embeds"], local.embed_shared(x), atol=1e-6)
    np.testing.assert_allclose(both["similarity"], both["image_embeds"] @ both["text_embeds"].T,
                               atol=1e-6)
    # CLIP's logits: the similarity over the temperature the run ended with
    temperature = json.loads(Path("metrics/pretrain.json").read_text())["temperature"]
    np.testing.assert_allclose(both["logits_per_image"], both["similarity"] / temperature,
                               rtol=1e-4)
    assert both["neighbour_index"].shape == (3, 2)
    assert set(served.predict(x)) == {"embeddings", "image_embeds"}  # images alone, as before
    for bad, says in (({"captions": texts}, "'images' and 'texts'"),
                      ({"texts": np.array(["", "a"])}, "non-empty")):
        with pytest.raises(MlflowException, match=says):
            served.predict(bad)


def write_test_images(folder: Path, count: int) -> list[Path]:
    x, y = load_split("data/prepared", "test")
    folder.mkdir(exist_ok=True)
    files = [folder / f"{i:03d}_{y[i]}.png" for i in range(count)]
    for i, file in enumerate(files):
        Image.fromarray(x[i]).save(file)
    return files


def torch_shared_space(files: list[Path], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: image and text embeddings from encoder.pt with torch alone."""
    side = load_text_side("models/encoder.pt")
    encoder, info = load_encoder("models/encoder.pt")
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    with torch.no_grad():
        images = embed_images(side, EmbeddingModel(encoder, info)(x))
    return images, class_embeddings(side, texts) if texts else torch.empty(0)


def test_classify_names_the_nearest_prompt_ensemble(clip_run: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    files = write_test_images(clip_run / "queries", 40)
    labels = [str(k) for k in range(10)]
    assert main(["classify", "--labels", ",".join(labels), str(clip_run / "queries"),
                 "--top", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    images, classes = torch_shared_space(files, labels)
    want = (images @ classes.T).argmax(dim=1).tolist()
    got = {Path(p["image"]).name: p for p in result["predictions"]}
    assert [got[f.name]["label"] for f in files] == [labels[k] for k in want]
    assert all(len(p["top"]) == 3 and p["top"][0]["cosine"] >= p["top"][1]["cosine"]
               for p in result["predictions"])
    # probabilities: CLIP's softmax over all labels of cosine / the learned temperature
    temperature = json.loads(Path("metrics/pretrain.json").read_text())["temperature"]
    probabilities = ((images @ classes.T) / temperature).softmax(dim=1)
    for i, file in enumerate(files):
        for entry in got[file.name]["top"]:
            assert entry["probability"] == pytest.approx(
                probabilities[i, labels.index(entry["label"])].item(), abs=1e-3)
    assert main(["classify", "--labels", ",".join(labels), str(files[0])]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["label", "cosine", "prob", "image"] and len(row.split()) == 4


def test_text_search_ranks_the_gallery_by_cosine_with_the_sentence(
        clip_run: Path, capsys: pytest.CaptureFixture) -> None:
    files = write_test_images(clip_run / "gallery", 30)
    sentence = "a photo of a 3."
    assert main(["search", "--gallery", str(clip_run / "gallery"), "--text", sentence,
                 "-k", "5", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    side = load_text_side("models/encoder.pt")
    images, _ = torch_shared_space(sorted(files), [])
    scores = (images @ embed_texts(side, [sentence]).T).squeeze(1)
    order = scores.argsort(descending=True)[:5].tolist()
    assert result["query"] == sentence
    assert [Path(h["image"]).name for h in result["neighbours"]] == [
        sorted(files)[i].name for i in order]
    assert result["neighbours"][0]["cosine"] == pytest.approx(scores.max().item(), abs=1e-5)


@pytest.mark.parametrize("argv, says", [
    (["classify", "--labels", "cat,,dog", "IMAGES"], "--labels 'cat,,dog': a label is empty"),
    (["classify", "--labels", "cat,cat", "IMAGES"], "'cat' is given twice"),
    (["classify", "--labels", "cat", "IMAGES"], "at least two labels"),
    (["search", "--gallery", "IMAGES", "--text", " "], "--text: a query text is empty"),
    (["search", "--gallery", "IMAGES"], "give query images, or --text"),
])
def test_bad_text_queries_are_one_line(clip_run: Path, capsys: pytest.CaptureFixture,
                                       argv: list[str], says: str) -> None:
    write_test_images(clip_run / "queries", 2)
    argv = [str(clip_run / "queries") if a == "IMAGES" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_texts_need_an_image_text_model(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    for stage in ("prepare", "pretrain", "probe", "export"):
        assert main([stage]) == 0
    write_images(workspace / "imgs", ["a.png", "b.png"])
    capsys.readouterr()
    for argv in (["classify", "--model", "models/encoder.onnx", "--labels", "a,b", "imgs"],
                 ["search", "--model", "models/encoder.onnx", "--gallery", "imgs", "--text", "a"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "has no text tower" in err and "train.method: clip" in err and "\n" not in err


# --- captions without labels (last: its register stage moves MLflow's global store) ---------


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_unlabelled_captions(folder: Path, count: int) -> Path:
    """The layout of COCO/Flickr exports: ``count`` digit images as PNGs and a ``.tsv`` with two
    captions per image (two rows) and no label column; the captions name the digit in words."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = ["filepath\ttitle"]
    for i in range(count):
        image = np.rint(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i}.png")
        word = WORDS[digits.target[i]]
        rows += [f"{i}.png\ta handwritten {word}", f"{i}.png\tthe number {word} on a scan"]
    path = folder / "captions.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """Every stage with clip on a caption file without labels, into the run's own MLflow store
    (the folder and the store are set only while the stages run: the tests read the files)."""
    root = tmp_path_factory.mktemp("unlabelled")
    (root / "pairs").mkdir()
    write_unlabelled_captions(root / "pairs", 600)
    write_params(root, {**CLIP, "data": {"source": "pairs", "path": "pairs/captions.tsv",
                                         "vocab_size": 300, "image_size": 8},
                        "train": {**CLIP["train"], "batch_size": 64, "epochs": 20}})
    with every_stage(root, mlflow_template):
        pass
    return root


def test_captions_without_labels_are_split_as_one_pool(unlabelled_run: Path) -> None:
    prepared = unlabelled_run / "data/prepared"
    manifest = load_manifest(prepared)
    assert manifest["classes"] == [] and manifest["num_classes"] == 0
    assert manifest["totals"]["all"] == 600 and manifest["totals"]["test"] == 120  # 0.2 of 600
    seen = set()
    for split in ("train", "val", "test"):
        x, y = load_split(prepared, split)
        assert (y == -1).all() and manifest["counts"][split] == {}
        images = {image.tobytes() for image in x}
        assert not images & seen  # no image in two splits
        seen |= images
        assert all(len(own) == 2 for own in load_captions(prepared)[split])


def test_without_labels_clip_is_measured_by_recall_and_gated_on_it(unlabelled_run: Path) -> None:
    def read(name: str) -> dict:
        return json.loads((unlabelled_run / name).read_text())

    probe = read("metrics/probe.json")
    pretrained, random_init = probe["pretrained"], probe["random_init"]
    assert "linear_top1" not in pretrained and "zero_shot_top1" not in pretrained
    assert "raw_pixels" not in probe and "knn_k" not in probe
    assert pretrained["mean_recall_at_1"] == pytest.approx(
        (pretrained["image_to_text_recall_at_1"] + pretrained["text_to_image_recall_at_1"]) / 2,
        abs=1e-6)
    assert pretrained["mean_recall_at_1"] > random_init["mean_recall_at_1"] + 0.2
    assert set(probe["gain_over_random"]) == {"image_to_text_recall_at_1",
                                              "text_to_image_recall_at_1", "mean_recall_at_1"}
    assert Path(unlabelled_run, "plots/confusion.csv").read_text().strip() == "actual,predicted"
    for plot in ("confusion.png", "anomaly.png", "embedding.png"):
        assert Path(unlabelled_run, "plots", plot).stat().st_size > 0
    assert read("metrics/pretrain.json")["knn_val_top1"] is None

    export = read("metrics/export.json")
    assert "prediction_agreement" not in export and export["text"]["max_abs_diff"] <= 1e-4
    registered = read("reports/registry.json")
    assert registered["gate_metric"] == "mean_recall_at_1" and registered["decision"] == "promoted"
    assert registered["mean_recall_at_1"] == pretrained["mean_recall_at_1"]
    # the gate's re-score of a champion on other data: the same figure, through the ONNX files
    from contrastive.registry import _mean_recall_at_1

    onnx = load_model(str(unlabelled_run / "models/encoder.onnx"))
    assert _mean_recall_at_1(onnx, unlabelled_run / "data/prepared") == pytest.approx(
        pretrained["mean_recall_at_1"], abs=1e-5)


def test_without_labels_only_clip_trains(unlabelled_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(unlabelled_run / "data")
    write_params(tmp_path, {**CLIP, "train": {"method": "simclr"},
                            "model": {"text_encoder": "none"}})
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.method: 'simclr'" in err and "no 'label' column" in err and "\n" not in err
    assert not Path("models").exists()
