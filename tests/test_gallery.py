"""Gallery indexes (exact and FAISS), published with a registered model; search and anomaly."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastive.cli import main
from contrastive.config import ConfigError
from contrastive.data import load_split, read_image
from contrastive.export import ort_session
from contrastive.index import ExactIndex, FaissIndex, GalleryIndex, build_searcher
from contrastive.retrieval import knn_anomaly_scores
from tests.conftest import new_store
from tests.test_tracking import NAME, SIZE, make_project, write_images

CHAMPION = f"models:/{NAME}@champion"


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :k]


def test_exact_index_is_brute_force_and_faiss_agrees_closely(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(2000, 16)), rng.normal(size=(50, 16))
    expected = brute_force(gallery, queries, 10)
    scores, positions = ExactIndex(gallery).search(queries, 10)
    np.testing.assert_array_equal(positions, expected)
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # best first
    faiss_scores, faiss_positions = FaissIndex.build(gallery).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(faiss_positions, expected,
                                                                 strict=True)])
    assert recall >= 0.95
    np.testing.assert_allclose(faiss_scores[:, 0], scores[:, 0], atol=1e-5)
    for kind in ("exact", "faiss-hnsw"):  # a saved index answers as the built one
        built = GalleryIndex(build_searcher(gallery, kind), [f"g{i}" for i in range(2000)],
                             {"params_hash": "a", "fingerprint": [[0.0]]})
        built.save(tmp_path / kind)
        loaded = GalleryIndex.load(tmp_path / kind)
        assert loaded.searcher.kind == kind
        again, first = loaded.search(queries, 5), built.search(queries, 5)
        assert [[item for _, item in row] for row in again] == [
            [item for _, item in row] for row in first]
        np.testing.assert_allclose([[s for s, _ in row] for row in again],
                                   [[s for s, _ in row] for row in first], atol=1e-6)


def test_index_refuses_k_beyond_the_gallery_and_another_encoder() -> None:
    index = GalleryIndex(ExactIndex(np.eye(3)), ["a", "b", "c"],
                         {"params_hash": "abc", "fingerprint": [[1.0, 0.0]]})
    with pytest.raises(ConfigError, match="-k 4: the gallery index holds only 3 images"):
        index.search(np.eye(3)[:1], 4)
    index.check({"params_hash": "abc", "fingerprint": [[1.0, 0.00001]]}, "here")  # same encoder
    with pytest.raises(ConfigError, match="params hash abc, not by this model"):
        index.check({"params_hash": "xyz", "fingerprint": [[1.0, 0.0]]}, "here")
    with pytest.raises(ConfigError, match="same params hash .abc. but other weights"):
        index.check({"params_hash": "abc", "fingerprint": [[0.9, 0.1]]}, "here")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Path]:
    """A registered tiny encoder (champion v1) in its own SQLite store, and a gallery folder."""
    root = tmp_path_factory.mktemp("gallery")
    make_project(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, root / "store"))
        assert main(["register"]) == 0
        write_images(root / "gallery", 6)
        (root / "gallery" / "notes.txt").write_text("not an image")
        yield root


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if "error:" in line]
    assert len(err) == 1 and "Traceback" not in text, text
    return err[0]


def test_index_published_on_the_version_serves_search(project: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["index", "build", "--model", CHAMPION, "--gallery", "gallery"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size"] == 6 and summary["kind"] == "exact" and summary["version"] == 1
    assert [s["file"] for s in summary["skipped"]] == ["gallery/notes.txt"]
    from contrastive.gallery import model_version

    _, version = model_version(CHAMPION)
    assert version.tags["gallery_index.uri"] == summary["artifact"]
    assert version.tags["gallery_index.size"] == "6"

    # No --gallery: the version's index answers; the query finds itself first.
    assert main(["search", "--model", CHAMPION, "gallery/img04.png", "gallery/img01.png",
                 "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["neighbours"][0]["image"] for r in results] == ["gallery/img04.png",
                                                              "gallery/img01.png"]
    assert results[0]["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert len(results[0]["neighbours"]) == 3
    # The same ranking as embedding the gallery now.
    assert main(["search", "--model", "models/encoder.onnx", "--gallery", "gallery",
                 "gallery/img04.png", "-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["neighbours"] == results[0]["neighbours"]
    assert main(["search", "--model", CHAMPION, "gallery/img04.png", "-k", "7"]) == 2
    assert "-k 7: the gallery index holds only 6 images" in one_error_line(capsys)


def test_an_index_of_another_encoder_is_one_error(project: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["index", "build", "--model", "models/encoder.onnx", "--gallery", "gallery",
                 "--out", "local-index"]) == 0
    capsys.readouterr()
    meta_path = project / "local-index" / "index.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    assert meta["encoder"]["params_hash"] == "0" * 16 and meta["size"] == 6
    try:
        meta["encoder"]["fingerprint"][0][0] += 0.5  # same params hash, other weights
        meta_path.write_text(json.dumps(meta))
        assert main(["search", "--model", "models/encoder.onnx", "--index", "local-index",
                     "gallery/img00.png"]) == 2
        assert "but other weights" in one_error_line(capsys)
        meta["encoder"]["params_hash"] = "f" * 16
        meta_path.write_text(json.dumps(meta))
        assert main(["search", "--model", "models/encoder.onnx", "--index", "local-index",
                     "gallery/img00.png"]) == 2
        assert f"params hash {'f' * 16}, not by this model" in one_error_line(capsys)
    finally:
        meta_path.write_text(original)


def test_npz_galleries_of_another_size_and_grey_are_resized(project: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    grey = np.random.default_rng(3).integers(0, 256, (5, 20, 20), dtype=np.uint8)
    np.savez(project / "grey.npz", x=grey)
    assert main(["index", "build", "--model", "models/encoder.onnx", "--gallery", "grey.npz",
                 "--out", "grey-index"]) == 0
    capsys.readouterr()
    Image.fromarray(grey[2]).save(project / "grey2.png")
    assert main(["search", "--model", "models/encoder.onnx", "--index", "grey-index",
                 "grey2.png", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["neighbours"][0]["image"] == "grey.npz#2"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--gallery", "empty"], "no files to embed"),
        (["--gallery", "texts"], "none of the 2 files is a readable image"),
        (["--gallery", "floats.npz"], "'x' must be uint8"),
        (["--gallery", "none.npz"], "holds no images"),
        (["--gallery", "nowhere"], "nowhere: no such file or folder"),
        (["--model", "models/encoder.onnx", "--gallery", "texts"], "not a models:/ URI"),
        (["--model", f"models:/{NAME}@nope", "--gallery", "gallery"], "nope"),
    ],
)
def test_bad_galleries_are_one_line_exit_2_and_write_nothing(
    project: Path, capsys: pytest.CaptureFixture, argv: list[str], fragment: str
) -> None:
    (project / "empty").mkdir(exist_ok=True)
    (project / "texts").mkdir(exist_ok=True)
    for name in ("a.txt", "b.png"):
        (project / "texts" / name).write_text("text")
    np.savez(project / "floats.npz", x=np.zeros((2, 8, 8, 3), dtype=np.float32))
    np.savez(project / "none.npz", x=np.zeros((0, 8, 8, 3), dtype=np.uint8))
    full = ["index", "build", "--model", CHAMPION, "--out", "bad-index", *argv]
    if "--model" in argv:
        full = ["index", "build", *argv]
    assert main(full) == 2
    assert fragment in one_error_line(capsys)
    assert not (project / "bad-index").exists()
    assert not list(project.glob(".bad-index*"))


def test_anomaly_threshold_is_calibrated_on_val(project: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["anomaly", "--model", "models/encoder.onnx", "gallery", "--fpr", "0.1",
                 "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    session = ort_session("models/encoder.onnx")

    def embed(images: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": images})[0]

    import torch

    train = torch.from_numpy(embed(load_split("data/prepared", "train")[0]))
    val_scores = knn_anomaly_scores(train, torch.from_numpy(
        embed(load_split("data/prepared", "val")[0])), 3).numpy()
    assert result["threshold"] == pytest.approx(np.quantile(val_scores, 0.9, method="higher"),
                                                abs=1e-6)
    assert (val_scores > result["threshold"]).mean() <= 0.1
    files = sorted(f"gallery/img{i:02d}.png" for i in range(6))
    assert [r["image"] for r in result["images"]] == files
    images = np.stack([read_image(Path(f), SIZE) for f in files])
    expected = knn_anomaly_scores(train, torch.from_numpy(embed(images)), 3).numpy()
    for row, score in zip(result["images"], expected, strict=True):
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert row["anomalous"] == (row["score"] > result["threshold"])
    with pytest.raises(SystemExit) as exit_info:
        main(["anomaly", "--model", "models/encoder.onnx", "gallery", "--fpr", "1.5"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["anomaly", "--model", "models/encoder.onnx", "gallery", "-k", "99"]) == 2
    assert "-k 99: the train split holds only 60 images" in one_error_line(capsys)


def test_the_served_model_returns_neighbours_and_anomaly_scores_when_asked(
    project: Path, capsys: pytest.CaptureFixture
) -> None:
    """Through mlflow.pyfunc: train images find themselves first, and the anomaly scores and
    threshold are the `contrastive anomaly` command's (k 2, fpr 0.05)."""
    import mlflow

    model = mlflow.pyfunc.load_model(CHAMPION)
    train, labels = load_split("data/prepared", "train")
    plain = model.predict(train[:4])
    assert set(plain) == {"embeddings"}
    asked = model.predict(train[:4], params={"neighbours": 3, "anomaly": True})
    np.testing.assert_allclose(asked["embeddings"], plain["embeddings"])
    assert asked["neighbour_index"][:, 0].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(asked["neighbour_label"], labels[asked["neighbour_index"]])
    np.testing.assert_allclose(asked["neighbour_cosine"][:, 0], 1.0, atol=1e-5)
    Path("served").mkdir(exist_ok=True)
    for i in range(4):
        Image.fromarray(train[i]).save(f"served/{i}.png")
    assert main(["anomaly", "--model", CHAMPION, "served", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(asked["anomaly_score"], [r["score"] for r in result["images"]],
                               atol=1e-5)
    assert asked["anomalous"].tolist() == [r["anomalous"] for r in result["images"]]
