"""Image-text contrastive learning (``train.method: clip``) through the pipeline: paired data
from ``prepare``, the method in the training loop, zero-shot and cross-modal recall in the
probe stage, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from contrastive.captions import TEMPLATES, templated_captions
from contrastive.cli import main
from contrastive.config import TextConfig, load_params
from contrastive.crossmodal import image_text_metrics, recall_at
from contrastive.data import load_captions, load_manifest, load_prepared_tokenizer
from contrastive.layout import Layout
from contrastive.models import TextSide, load_encoder, load_text_side
from contrastive.text import encode, train_tokenizer
from contrastive.text_models import TextTower
from tests.conftest import write_params

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


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare, pretrain and probe with clip on the captioned digits, once for the tests."""
    root = tmp_path_factory.mktemp("clip")
    write_params(root, CLIP)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("prepare", "pretrain", "probe"):
            assert main([stage]) == 0, stage
    return root


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


def test_a_caption_file_without_labels_stops_prepare_and_writes_nothing(
    workspace: Path, capsys: pytest.CaptureFixture
) -> None:
    write_images(workspace / "pairs", ["a.png"])
    (workspace / "pairs/captions.tsv").write_text("filepath\ttitle\na.png\ta picture\n")
    write_params(workspace, {"data": {"source": "pairs", "path": "pairs/captions.tsv"}})
    assert main(["prepare"]) == 2
    err = capsys.readouterr().err.strip()
    assert "captions.tsv: no 'label' column" in err and "\n" not in err
    assert not Path("data/prepared").exists()
