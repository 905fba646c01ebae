"""MLflow tracking, the registry and its promotion gate.

The gate is tested as a pure function; the registration itself runs end to end through a real
SQLite store in a temporary project whose inputs are built directly (a tiny random encoder, really
exported to ONNX), so no training is needed. Metrics files are then edited to make new pipeline
states: worse, better, parity failed, other evaluation data.
"""

from __future__ import annotations

import getpass
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from contrastive import paths, provenance, registry, store, tracking
from contrastive.cli import main
from contrastive.config import ModelConfig, flatten, load_params, parse_params
from contrastive.export import ort_session
from contrastive.files import write_json
from contrastive.layout import Layout
from contrastive.models import (
    EncoderInfo,
    LinearProbe,
    build_encoder,
    load_encoder,
    save_encoder,
    save_probe,
)
from contrastive.registry import RECALL, ZERO_SHOT, Candidate, Champion, RescoreError, decide
from contrastive.stages import export
from tests.conftest import ROOT, new_store, write_params

NAME = "contrastive-encoder"
SIZE = 8
CLASSES = ["a", "b", "c"]
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]

# --- the gate as a pure function ----------------------------------------------------------------

SAME, OTHER = "eval-same", "eval-other"


def never() -> float:
    raise AssertionError("the champion must not be re-scored when a score on this data is known")


def candidate(top1: float | None = 0.90, eval_key: str = SAME, parity: bool = True) -> Candidate:
    return Candidate(top1, eval_key, parity)


CHAMP = Champion("4", {SAME: 0.85})


def test_first_model_becomes_champion() -> None:
    decision = decide(candidate(0.1), None, 0.01, never)
    assert decision.promoted and "first model" in decision.reason


def test_better_model_is_promoted_with_the_comparison_as_reason() -> None:
    decision = decide(candidate(0.90), CHAMP, 0.01, never)
    assert decision.promoted and decision.compared_with == "4"
    assert decision.reference_top1 == 0.85
    assert "0.9000 vs champion v4 0.8500" in decision.reason and "+0.0500" in decision.reason


def test_worse_model_is_kept_as_challenger_only() -> None:
    decision = decide(candidate(0.80), CHAMP, 0.01, never)
    assert decision.outcome == "kept" and decision.eligible and not decision.promoted
    assert "-0.0500 < registry.min_improvement 0.01" in decision.reason
    assert "champion v4 stays" in decision.reason


@pytest.mark.parametrize(("top1", "promoted"), [(0.855, False), (0.8599, False), (0.86, True)])
def test_gain_must_reach_min_improvement(top1: float, promoted: bool) -> None:
    assert decide(candidate(top1), CHAMP, 0.01, never).promoted is promoted


@pytest.mark.parametrize("champion", [None, CHAMP])
def test_failed_parity_is_never_promoted(champion: Champion | None) -> None:
    decision = decide(candidate(0.99, parity=False), champion, 0.0, never)
    assert decision.outcome == "rejected" and not decision.eligible
    assert "parity" in decision.reason


@pytest.mark.parametrize("champion", [None, CHAMP])
def test_a_collapsed_representation_is_never_promoted(champion: Champion | None) -> None:
    flagged = Candidate(0.99, SAME, True, collapse="embedding spread 0.001 < 0.1")
    decision = decide(flagged, champion, 0.0, never)
    assert decision.outcome == "rejected" and not decision.eligible
    assert "collapsed" in decision.reason and "spread 0.001" in decision.reason


@pytest.mark.parametrize("top1", [None, float("nan")])
def test_missing_metric_is_never_promoted(top1: float | None) -> None:
    decision = decide(candidate(top1), None, 0.0, never)
    assert decision.outcome == "rejected" and "missing" in decision.reason


def test_other_evaluation_data_rescores_the_champion_first() -> None:
    calls = []

    def rescore() -> float:
        calls.append(1)
        return 0.95  # on the new data the champion is better than its old score said

    decision = decide(candidate(0.90, OTHER), CHAMP, 0.01, rescore)
    assert calls == [1] and decision.outcome == "kept"
    assert decision.reference_top1 == 0.95 and "re-scored on this evaluation" in decision.reason
    # a score on that data recorded earlier is used instead of re-scoring
    known = Champion("4", {SAME: 0.85, OTHER: 0.80})
    assert decide(candidate(0.90, OTHER), known, 0.01, never).promoted


def test_other_evaluation_data_that_cannot_be_scored_is_refused() -> None:
    def impossible() -> float:
        raise RescoreError("it takes 8x8 images, the data are 16x16")

    decision = decide(candidate(0.99, OTHER), CHAMP, 0.01, impossible)
    assert decision.outcome == "refused" and decision.eligible and not decision.promoted
    assert "could not be scored" in decision.reason and "16x16" in decision.reason


def test_champion_scores_come_from_version_tags() -> None:
    class Version:
        version = 3
        tags = {"eval_key": SAME, "linear_top1": "0.7", f"rescored.{OTHER}": "0.6"}

    assert Champion.of(Version()) == Champion("3", {SAME: 0.7, OTHER: 0.6})


def test_an_image_text_model_is_ranked_by_zero_shot_against_its_own_kind() -> None:
    zero_shot = Champion("5", {SAME: 0.40}, ZERO_SHOT)
    better = Candidate(0.45, SAME, True, None, ZERO_SHOT)
    decision = decide(better, zero_shot, 0.01, never)
    assert decision.promoted and "zero-shot top-1 0.4500 vs champion v5 0.4000" in decision.reason
    assert decide(Candidate(0.405, SAME, True, None, ZERO_SHOT), zero_shot, 0.01,
                  never).outcome == "kept"
    # a linear top-1 and a zero-shot top-1 are not the same figure: no comparison either way
    for champion, challenger in ((CHAMP, better), (zero_shot, candidate(0.99))):
        refused = decide(challenger, champion, 0.01, never)
        assert refused.outcome == "refused" and refused.eligible
        assert "ranked by" in refused.reason and "no fair comparison" in refused.reason


def test_a_model_of_captions_without_labels_is_ranked_by_mean_recall() -> None:
    recall = Champion("6", {}, RECALL)
    rescored = decide(Candidate(0.52, SAME, True, None, RECALL), recall, 0.01, lambda: 0.50)
    assert rescored.promoted and rescored.reference_top1 == 0.50
    assert "mean Recall@1 0.5200 vs champion v6 0.5000 (re-scored" in rescored.reason
    refused = decide(Candidate(0.9, SAME, True, None, RECALL), Champion("5", {SAME: 0.4},
                                                                      ZERO_SHOT), 0.01, never)
    assert refused.outcome == "refused" and "no fair comparison" in refused.reason


def test_a_zero_shot_champions_score_comes_from_its_gate_metric_tag() -> None:
    class Version:
        version = 2
        tags = {"eval_key": SAME, "gate_metric": ZERO_SHOT, "linear_top1": "0.9",
                "zero_shot_top1": "0.5"}

    assert Champion.of(Version()) == Champion("2", {SAME: 0.5}, ZERO_SHOT)


# --- helpers: provenance tags -------------------------------------------------------------------


def test_dvc_lock_hashes_and_git_state(tmp_path: Path) -> None:
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "contrastive prepare"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    tags = provenance.dvc_lock_hashes(tmp_path / "dvc.lock")
    assert len(tags["dvc.lock.prepare"]) == 16 and tags["dvc.lock.export"] == "unknown"

    assert provenance.git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "probe.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run([*git, *args], cwd=tmp_path, check=True)
    (tmp_path / "metrics" / "probe.json").write_text('{"a": 1}')  # a stage output: not dirty
    (tmp_path / "dvc.lock").write_text("changed")
    clean = provenance.git_state(tmp_path)
    assert len(clean["git.commit"]) == 40 and clean["git.dirty"] == "false"
    (tmp_path / "code.py").write_text("x = 2\n")
    dirty = provenance.git_state(tmp_path)
    assert dirty["git.dirty"] == "true" and dirty["git.changed"] == "code.py"


def test_register_stage_deps_cover_what_it_reads() -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]
    deps = set(stage["deps"])
    for path in tracking.INPUTS.values():
        assert any(path == d or path.startswith(d + "/") for d in deps), path
    for module in ("tracking", "registry", "inference"):
        assert f"src/contrastive/{module}.py" in deps
    assert stage["params"] == ["registry"]
    assert stage["outs"] == [{paths.REGISTRY_REPORT: {"cache": False, "persist": True}}]
    assert "metrics" not in stage  # the report holds text: no metric for dvc to compare


def test_store_lock_refuses_after_its_timeout(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.store_lock(uri):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with (pytest.raises(store.TrackingError, match="another registration held"),
          store.store_lock(uri)):
        pass
    release.set()
    thread.join()
    with store.store_lock(uri):  # free again
        pass


def _lease_store(template: Path, tmp_path: Path) -> tuple[Any, str]:
    """A client of a new SQLite store (a copy of the migrated template): its unique names hold as
    a server's do."""
    uri = new_store(template, tmp_path)
    return store.connect(uri), uri


LEASE = f"{NAME}{store.LEASE_SUFFIX}"


def test_a_lease_is_held_by_one_holder_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path
) -> None:
    """A second holder gives up after LOCK_TIMEOUT_S, or waits until the first lets go; the lease
    says who holds it and is gone afterwards."""
    client, uri = _lease_store(mlflow_template, tmp_path)
    held, release = threading.Event(), threading.Event()
    order: list[str] = []

    def holder() -> None:
        with store.lease(client, LEASE, uri):
            held.set()
            release.wait(30)
            order.append("first released")

    def waiter() -> None:
        with store.lease(client, LEASE, uri):
            order.append("second acquired")

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(30)
    tags = client.get_registered_model(LEASE).tags
    assert tags["pid"] == str(os.getpid()) and {"owner", "host", "acquired_at"} <= set(tags)
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.5)
    with (
        pytest.raises(store.TrackingError, match="another registration holds it"),
        store.lease(client, LEASE, uri),
    ):
        pass
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 60)
    second = threading.Thread(target=waiter)
    second.start()
    second.join(1.0)
    assert second.is_alive() and order == []  # waiting
    release.set()
    first.join(30)
    second.join(30)
    assert order == ["first released", "second acquired"]
    assert [m.name for m in client.search_registered_models()] == []


def test_an_abandoned_lease_is_broken_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    mlflow_template: Path,
) -> None:
    """Another machine's lease is broken only once older than LEASE_STALE_S; one of this machine
    at once when its process has ended."""
    client, uri = _lease_store(mlflow_template, tmp_path)
    elsewhere = {"owner": "ann", "host": "elsewhere", "pid": "1", "acquired_at": "then"}
    client.create_registered_model(LEASE, tags=elsewhere)
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.3)
    with (  # fresh: kept
        pytest.raises(store.TrackingError, match="ann on elsewhere, pid 1"),
        store.lease(client, LEASE, uri),
    ):
        pass
    monkeypatch.setattr(store, "LEASE_STALE_S", 0.2)
    time.sleep(0.3)
    with (
        caplog.at_level(logging.WARNING, logger="contrastive.store"),
        store.lease(client, LEASE, uri),
    ):
        assert client.get_registered_model(LEASE).tags["pid"] == str(os.getpid())
    assert "broke the abandoned lease" in caplog.text and "ann on elsewhere" in caplog.text

    monkeypatch.setattr(store, "LEASE_STALE_S", 1800)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = {**elsewhere, "host": socket.gethostname(), "pid": ended}
    client.create_registered_model(LEASE, tags=here)
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="contrastive.store"),
        store.lease(client, LEASE, uri),
    ):
        pass
    assert "its process on this machine has ended" in caplog.text
    assert [m.name for m in client.search_registered_models()] == []


# --- end to end through a real SQLite store -----------------------------------------------------


def make_project(root: Path) -> None:
    """The upstream stages' outputs, made directly: random data, a tiny encoder really exported."""
    rng = np.random.default_rng(0)
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    totals = {}
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        x = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        np.savez(prepared / f"{split}.npz", x=x, y=(np.arange(n) % 3).astype(np.int64))
        totals[split] = n
    write_json(prepared / "manifest.json", {
        "source": "npz", "image_size": SIZE, "classes": CLASSES, "num_classes": 3,
        "totals": totals, "mean": MEAN, "std": STD, "data_hash": "d" * 64,
    })
    torch.manual_seed(0)
    cfg = ModelConfig(width=4)
    net = build_encoder(cfg)
    info = EncoderInfo(model=cfg.model_dump(), image_size=SIZE, mean=MEAN, std=STD,
                       embedding_dim=net.embedding_dim, classes=CLASSES, params_hash="0" * 16)
    models = root / "models"
    save_encoder(models / "encoder.pt", net, info)
    save_probe(models / "probe.pt", LinearProbe(net.embedding_dim, 3), net.embedding_dim)
    export.run(parse_params({"export": {"latency_repeats": 2}}), Layout(root))
    write_json(root / "metrics" / "pretrain.json", {
        "final_loss": 4.2, "knn_val_top1": 0.4, "epochs": 3, "collapsed": False,
    })
    write_json(root / "reports" / "pretrain.json", {
        "images_per_s": 100.0, "device": "cpu", "precision": "fp32", "params_hash": "0" * 16,
        "method": "simclr", "collapse_reason": None,
    })
    scores = {"linear_top1": 0.6, "linear_top5": 1.0, "knn_top1": 0.5, "knn_top5": 1.0}
    write_json(root / "metrics" / "probe.json", {
        "pretrained": scores, "random_init": scores, "raw_pixels": scores,
        "gain_over_random": {"linear_top1": 0.0, "knn_top1": 0.0}, "n_test": 30,
        "embedding_dim": net.embedding_dim,
    })
    plots = root / "plots"
    plots.mkdir()
    (plots / "pretrain.csv").write_text("epoch,loss,lr,images_per_s\n1,5.0,0.1,90\n2,4.5,0.2,95\n"
                                        "3,4.2,0.1,100\n")
    (plots / "knn.csv").write_text("epoch,knn_top1\n2,0.35\n3,0.4\n")
    (plots / "confusion.csv").write_text("actual,predicted\na,a\nb,c\n")
    for image in ("embedding.png", "anomaly.png", "training.png", "confusion.png"):
        Image.new("RGB", (4, 4)).save(plots / image)
    write_params(root)


def set_metric(root: Path, file: str, keys: tuple[str, ...], value: Any) -> None:
    """Edit one value of a metrics file: a new pipeline state without retraining."""
    path = root / file
    data = json.loads(path.read_text())
    inner = data
    for key in keys[:-1]:
        inner = inner[key]
    inner[keys[-1]] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Path]:
    """A project with upstream outputs and its own SQLite store, registered once."""
    root = tmp_path_factory.mktemp("registry")
    make_project(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, root / "store"))
        assert main(["register"]) == 0
        yield root


def client() -> mlflow.MlflowClient:
    return store.connect()


def versions() -> dict[str, Any]:
    return {str(v.version): v for v in client().search_model_versions(f"name = '{NAME}'")}


def aliases() -> dict[str, str]:
    return registry.aliases_of(client(), NAME)


def runs() -> list[Any]:
    experiment = client().get_experiment_by_name("contrastive")
    return client().search_runs([experiment.experiment_id])


def report(root: Path) -> dict[str, Any]:
    return json.loads((root / paths.REGISTRY_REPORT).read_text())


def test_first_registration_is_champion_and_fully_traced(project: Path) -> None:
    first = report(project)
    assert first["decision"] == "promoted" and first["version"] == 1
    assert first["aliases"] == ["challenger", "champion"] and first["new_run"]
    assert aliases() == {"champion": "1", "challenger": "1"}
    assert (project / "store" / "mlartifacts").is_dir()  # artifacts beside the SQLite file

    (run,) = runs()
    data = run.data
    assert data.params["train.epochs"] == "3" and data.params["registry.model_name"] == NAME
    assert len(data.params) == len(flatten(load_params("params.yaml")))
    history = client().get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 4.5), (3, 4.2)]
    assert [m.step for m in client().get_metric_history(run.info.run_id, "train/knn_top1")] == [
        2, 3]
    for key in ("probe.pretrained.linear_top1", "probe.raw_pixels.knn_top1",
                "export.max_abs_diff", "export.latency_ms.ort_b1", "pretrain.final_loss"):
        assert key in data.metrics, key
    for key in ("git.commit", "git.dirty", "dvc.lock.prepare", "dvc.lock.export", "data_hash",
                "device", tracking.STATE_TAG):
        assert key in data.tags, key
    assert data.tags["device"] == "cpu (fp32)" and data.tags["dvc.lock.probe"] == "unknown"
    artifacts = {a.path for folder in ("", "metrics", "plots", "data/prepared", "recipe")
                 for a in client().list_artifacts(run.info.run_id, folder or None)}
    for path in ("model_card.md", "metrics/probe.json", "plots/embedding.png",
                 "plots/confusion.csv", "data/prepared/manifest.json", "recipe/params.yaml"):
        assert path in artifacts, path
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card.md")
    assert card.startswith(f"# {NAME}") and run.info.run_id in card

    version = versions()["1"]
    assert version.run_id == run.info.run_id
    for key in ("gate.decision", "gate.reason", "linear_top1", "git.commit", "data_hash",
                "eval_key", "pytorch_model_uri"):
        assert key in version.tags, key
    assert version.tags["gate.status"] == "done"
    for uri in (version.source, version.tags["pytorch_model_uri"]):
        info = mlflow.models.get_model_info(uri)
        assert info.signature.inputs.inputs[0].shape == (-1, SIZE, SIZE, 3)
        assert info.saved_input_example_info is not None


def test_rerun_of_the_same_state_creates_nothing(project: Path) -> None:
    assert main(["register"]) == 0
    again = report(project)
    assert not again["new_run"] and not again["new_version"] and again["version"] == 1
    assert len(runs()) == 1 and list(versions()) == ["1"]


def test_new_timings_are_no_new_state_but_new_weights_are(project: Path) -> None:
    """Exporting or measuring again changes only timings: the same model, nothing registered."""
    params = load_params("params.yaml")
    key = tracking.read_snapshot(params).state_key
    set_metric(project, "reports/export.json", ("latency_ms", "ort_b1"), 99.0)
    for metric in ("export_seconds", "speedup_b1", "speedup_b256"):
        set_metric(project, "reports/export.json", (metric,), 0.5)
    set_metric(project, "reports/pretrain.json", ("images_per_s",), 1.0)
    history = project / "plots" / "pretrain.csv"
    history.write_text(history.read_text().replace(",90\n", ",9\n"))
    assert tracking.read_snapshot(params).state_key == key
    assert main(["register"]) == 0
    assert not report(project)["new_version"] and list(versions()) == ["1"]

    weights = project / "models" / "encoder.pt"
    saved = weights.read_bytes()
    net, info = load_encoder(weights)
    torch.save(torch.load(weights, weights_only=True), project / "elsewhere.pt")
    (project / "elsewhere.pt").replace(weights)  # other bytes (the archive's name), same tensors
    try:
        assert weights.read_bytes() != saved
        assert tracking.read_snapshot(params).state_key == key
    finally:
        weights.write_bytes(saved)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_encoder(weights, net, info)
    try:
        assert tracking.read_snapshot(params).state_key != key
    finally:
        weights.write_bytes(saved)


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_embed_by_alias_equals_the_local_onnx_and_pyfunc(
    project: Path, capsys: pytest.CaptureFixture
) -> None:
    from contrastive.data import read_image

    files = write_images(project / "images", 5)
    (project / "images" / "broken.png").write_bytes(b"not an image")
    champion = f"models:/{NAME}@champion"
    assert main(["embed", "--model", champion, "images", "--out", "by_alias.npy"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embedded"] == 5 and summary["skipped"][0]["file"].endswith("broken.png")
    assert main(["embed", "--model", "models/encoder.onnx", *map(str, files),
                 "--out", "local.parquet"]) == 0
    by_alias = np.load("by_alias.npy")
    table = pq.read_table("local.parquet").to_pydict()
    assert table["file"] == [str(f) for f in files]
    np.testing.assert_array_equal(by_alias, np.array(table["embedding"], dtype=np.float32))

    images = np.stack([read_image(f, SIZE) for f in files])
    reference = ort_session("models/encoder.onnx").run(None, {"images": images})[0]
    np.testing.assert_allclose(by_alias, reference, atol=1e-6)
    predicted = mlflow.pyfunc.load_model(champion).predict(images)["embeddings"]
    np.testing.assert_allclose(predicted, reference, atol=1e-5)


def test_search_finds_the_query_itself_first(project: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    files = write_images(project / "gallery", 6)
    assert main(["search", "--model", "models/encoder.onnx", "--gallery", "gallery",
                 str(files[3]), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "cosine", "image"] and len(lines) == 4
    rank, cosine, path = lines[1].split()
    assert rank == "1" and float(cosine) == pytest.approx(1.0, abs=1e-4)
    assert path == "gallery/img03.png"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["registry", "show", "nope"], "has no alias 'nope'; aliases: challenger (v1)"),
        (["registry", "show", "99"], "has no version 99"),
        (["registry", "rollback", "--reason", "x"], "no previous-champion"),
        (["embed", "--model", f"models:/{NAME}@nope", "images", "--out", "x.npy"], "alias nope"),
        (["embed", "--model", "models:/unknown-model/1", "images", "--out", "x.npy"],
         "unknown-model"),
        (["embed", "--model", "missing.onnx", "images", "--out", "x.npy"], "no such file"),
        (["embed", "--model", "models/encoder.onnx", "images", "--out", "x.csv"], ".parquet"),
    ],
)
def test_lookup_errors_are_one_line_and_exit_2(
    project: Path, capsys: pytest.CaptureFixture, argv: list[str], fragment: str
) -> None:
    write_images(project / "images", 1)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["embed", "images", "--out", "x.npy", "--batch-size", "0"],
         "argument --batch-size: must be a whole number >= 1, got '0'"),
        (["search", "--gallery", "images", "q.png", "-k", "-1"], "argument -k: must be a whole"),
        (["search", "--gallery", "images", "q.png", "--batch-size", "ten"], "got 'ten'"),
    ],
)
def test_counts_must_be_whole_numbers_of_at_least_one(
    capsys: pytest.CaptureFixture, argv: list[str], fragment: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


def test_unreachable_store_fails_at_once_naming_the_setting_and_touches_nothing(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    before = {p: p.read_bytes() for p in project.glob("[dmpr]*/**/*") if p.is_file()}
    assert project / paths.REGISTRY_REPORT in before  # the earlier report stays as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["register"]) == 2  # after 3 quick tries, not MLflow's minutes of retries
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("contrastive register: error: MLFLOW_TRACKING_URI: no MLflow server "
                          "answers at http://127.0.0.1:9 after 3 tries")
    assert before == {p: p.read_bytes() for p in before}
    assert main(["registry", "list"]) == 2 and "MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_a_missing_bucket_is_one_line_naming_the_setting_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    mlflow_template: Path,
) -> None:
    """The experiment's artifact location is in an S3 bucket that does not exist (moto's mock
    S3): exit 2 before any write, one line naming the bucket and the setting; no run, no
    version, the pipeline's files as they were."""
    moto = pytest.importorskip("moto")
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    uri = new_store(mlflow_template, tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    before = {p: p.read_bytes() for p in tmp_path.glob("[dmpr]*/**/*") if p.is_file()}
    with moto.mock_aws():
        store.connect(uri).create_experiment("contrastive", artifact_location="s3://gone/art")
        capsys.readouterr()  # whatever MLflow printed while making the experiment
        assert main(["register"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "contrastive register: error: the artifact location of experiment 'contrastive' is "
        "s3://gone/art, and its bucket 'gone' does not exist"
    ), err
    assert versions() == {} and runs() == []
    assert not (tmp_path / paths.REGISTRY_REPORT).exists()
    assert before == {p: p.read_bytes() for p in tmp_path.glob("[dmpr]*/**/*") if p.is_file()}


def test_gate_through_the_store(project: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    probe_top1 = ("pretrained", "linear_top1")

    # worse, and the first attempt dies while logging its PyTorch model: the retry leaves one run
    set_metric(project, "metrics/probe.json", probe_top1, 0.55)
    with monkeypatch.context() as m:
        m.setattr(mlflow.pytorch, "log_model", _raise("store went away"))
        assert main(["register"]) == 1
    assert sorted(r.info.status for r in runs()) == ["FAILED", "FINISHED"]
    assert list(versions()) == ["1"]
    assert main(["register"]) == 0  # deletes the failed run, logs a complete one
    worse = report(project)
    assert worse["decision"] == "kept" and worse["version"] == 2
    assert "0.5500 vs champion v1 0.6000" in worse["reason"]
    assert worse["champion"] == {"version": 1, "linear_top1": 0.6, "same_evaluation": True}
    assert aliases() == {"champion": "1", "challenger": "2"}
    assert versions()["2"].tags["gate.reason"] == worse["reason"]
    assert [r.info.status for r in runs()] == ["FINISHED", "FINISHED"]

    # better, and setting the aliases fails once: the retry finishes without a new version
    set_metric(project, "metrics/probe.json", probe_top1, 0.7)
    with monkeypatch.context() as m:
        m.setattr(mlflow.MlflowClient, "set_registered_model_alias", _raise("database is locked"))
        assert main(["register"]) == 1
    assert "retry" in capsys.readouterr().err
    assert aliases()["champion"] == "1" and versions()["3"].tags["gate.status"] == "pending"
    assert main(["register"]) == 0
    better = report(project)
    assert better["decision"] == "promoted" and better["version"] == 3 and not better["new_version"]
    assert aliases() == {"champion": "3", "challenger": "3", "previous-champion": "1"}
    assert len(versions()) == 3 and len(runs()) == 3

    # parity failed: registered for the record, but neither champion nor challenger
    set_metric(project, "metrics/export.json", ("max_abs_diff",), 0.5)
    set_metric(project, "metrics/probe.json", probe_top1, 0.99)
    assert main(["register"]) == 0
    rejected = report(project)
    assert rejected["decision"] == "rejected" and rejected["aliases"] == []
    assert aliases() == {"champion": "3", "challenger": "3", "previous-champion": "1"}
    set_metric(project, "metrics/export.json", ("max_abs_diff",), 1e-7)

    # other evaluation data: the champion is re-scored on it through its registered ONNX model
    set_metric(project, "data/prepared/manifest.json", ("data_hash",), "e" * 64)
    set_metric(project, "metrics/probe.json", probe_top1, 0.98)
    assert main(["register"]) == 0
    rescored = report(project)
    assert rescored["decision"] == "promoted", rescored["reason"]
    assert "v3" in rescored["reason"] and "re-scored" in rescored["reason"]
    assert any(k.startswith("rescored.") for k in versions()["3"].tags)
    assert aliases()["champion"] == "5" and aliases()["previous-champion"] == "3"

    # people decide otherwise: promote and roll back, each recorded with a reason
    capsys.readouterr()
    assert main(["registry", "promote", "2", "--reason", "calibration is better"]) == 0
    assert json.loads(capsys.readouterr().out)["replaced"] == 5
    assert aliases()["champion"] == "2" and aliases()["previous-champion"] == "5"
    assert versions()["2"].tags["manual.reason"] == "calibration is better"
    assert main(["registry", "rollback", "--reason", "users complained"]) == 0
    assert aliases()["champion"] == "5" and aliases()["previous-champion"] == "2"
    assert main(["registry", "promote", "4", "--reason", "try it"]) == 2  # parity failed
    assert "never promoted" in capsys.readouterr().err

    assert main(["registry", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["version", "aliases"] and len(table) == 7
    assert table[2].split()[:2] == ["5", "challenger,champion"]
    assert "rejected" in table[3] and "FAILED" in table[3]
    assert main(["registry", "show", "champion"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 5 and shown["tags"]["manual.action"] == "restored"
    assert "probe.pretrained.linear_top1" in shown["metrics"]


def test_rescoring_is_refused_when_the_champion_cannot_take_the_data(project: Path) -> None:
    other = project / "other"
    other.mkdir()
    for split in ("train", "val", "test"):
        x = np.zeros((6, 16, 16, 3), dtype=np.uint8)
        np.savez(other / f"{split}.npz", x=x, y=np.arange(6, dtype=np.int64) % 3)
    write_json(other / "manifest.json", {"image_size": 16, "num_classes": 3})
    with pytest.raises(RescoreError, match="takes 8x8 images, the data are 16x16"):
        registry.rescore_version(NAME, "1", load_params("params.yaml"), other)


def _register_at_the_signal(root: str, uri: str, start: Any) -> None:
    """A process: ready to register ``root`` into ``uri``, it waits for ``start`` (a barrier)."""
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    start.wait(timeout=120)
    sys.exit(main(["register"]))


def test_two_first_registrations_at_once_both_succeed(tmp_path: Path) -> None:
    """Two processes register into a store that does not exist yet, at the same moment: one
    creates the store's schema, the other waits, finds the version and registers no second one.
    (The one test whose store is made by MLflow's migrations, not copied from the template.)"""
    make_project(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    workers = [spawn.Process(target=_register_at_the_signal, args=(str(tmp_path), uri, start))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0]
    found = mlflow.MlflowClient(tracking_uri=uri).search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in found] == ["1"]


def test_read_commands_need_an_existing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tmp_path)
    assert main(["registry", "list"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    assert main(["register"]) == 2  # nothing to register yet: one line, no store created
    assert "run the stages before register" in capsys.readouterr().err


def _raise(message: str) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise MlflowException(message)

    return fail


def test_every_manual_decision_stays_on_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture,
                                               mlflow_template: Path) -> None:
    """A promotion and two rollbacks: `registry show` lists all three, each with its reason, user,
    time, and the versions the champion moved from and to."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    uri = new_store(mlflow_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = store.connect(uri)
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias(NAME, "champion", "1")

    reasons = ["calibration is better", "users complained", "the complaint was about the UI"]
    assert main(["registry", "promote", "2", "--reason", reasons[0]]) == 0
    assert main(["registry", "rollback", "--reason", reasons[1]]) == 0
    assert main(["registry", "rollback", "--reason", reasons[2]]) == 0
    capsys.readouterr()
    assert main(["registry", "show", "2"]) == 0
    audit = json.loads(capsys.readouterr().out)["audit"]
    assert [(e["action"], e["from_version"], e["to_version"], e["reason"]) for e in audit] == [
        ("promoted", "1", "2", reasons[0]),
        ("restored", "2", "1", reasons[1]),
        ("restored", "1", "2", reasons[2]),
    ]
    for entry in audit:
        assert entry["user"] == getpass.getuser()
        assert datetime.fromisoformat(entry["time"]) <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("sqlite:///{root}/mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:///{root}/store/mlflow.db", "sqlite:///store/mlflow.db"),
        ("sqlite:////elsewhere/mlflow.db", "sqlite:///.../mlflow.db"),
        ("http://alice:secret@mlflow.example:5000", "http://mlflow.example:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("file://{root}/mlruns", "file:mlruns"),
        ("file:///elsewhere/mlruns", "file:.../mlruns"),
        ("/elsewhere/mlruns", ".../mlruns"),
        ("postgresql://bob:pw@db:5432/mlflow?sslmode=require&password=pw",
         "postgresql://db:5432/mlflow"),
    ],
)
def test_reports_show_no_machine_path_and_no_credentials(tmp_path: Path, uri: str,
                                                         shown: str) -> None:
    assert store.display_uri(uri.format(root=tmp_path), tmp_path) == shown


def test_a_store_failure_line_never_shows_the_uris_password() -> None:
    uri = "postgresql://mlflow:s3cret-pw@db.example:5432/mlflow?sslmode=require"
    with pytest.raises(store.TrackingError) as failure, store.mlflow_errors("registering", uri):
        raise MlflowException("the server said no")
    message = str(failure.value)
    assert "s3cret-pw" not in message and "db.example:5432/mlflow" in message
    assert message.startswith("registering failed at postgresql://db.example:5432/mlflow: ")
