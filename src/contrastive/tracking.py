"""Run logging: one MLflow run per pipeline state, made from the upstream stages' outputs.

:func:`log_pipeline_run` turns the outputs of
the four upstream stages into one run (params, per-epoch history, final metrics, artifacts, model
card, tags that trace it back to git, ``dvc.lock`` and the data) holding an ONNX and a PyTorch
model. The run is tagged with a *pipeline-state key*, a hash of what defines the model (weights,
ONNX file, probe results, params, data), so a retry finds a finished run instead of logging a
second one, and measuring again (timings) registers nothing new.

The store itself (where it is, its lock, its errors) is :mod:`contrastive.store`; where a model came
from (git, ``dvc.lock``) is :mod:`contrastive.provenance`. Nothing here writes to the pipeline's
own files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np

from contrastive import paths
from contrastive.config import ConfigError, Params, flatten, params_hash
from contrastive.provenance import UPSTREAM_STAGES, dvc_lock_hashes, git_state
from contrastive.store import logged_params

# export.TEXT_INFO_FILE and TEXT_ONNX_FILE (not imported: export pulls in torch and onnx)
TEXT_INFO = f"{paths.TEXT_ONNX_DIR}/text.json"
TEXT_ONNX = f"{paths.TEXT_ONNX_DIR}/text.onnx"
"""An image-text model's text tower, beside its tokenizer; absent for an image-only model."""
LINEAR, ZERO_SHOT, RECALL = "linear_top1", "zero_shot_top1", "mean_recall_at_1"
"""The registry gate's figures (``gate_metric``): image-only models, image-text (clip) models,
image-text models of data without classes (the mean of image-to-text and text-to-image R@1)."""
GATE_METRICS = (ZERO_SHOT, RECALL, LINEAR)
"""In the order the gate looks for them in metrics/probe.json."""
GATE_LABELS = {LINEAR: "linear top-1", ZERO_SHOT: "zero-shot top-1", RECALL: "mean Recall@1"}
# What the register stage reads: declared as its deps in dvc.yaml, hashed into the state key.
INPUTS = {
    "manifest": paths.MANIFEST,
    "encoder": paths.ENCODER,
    "onnx": paths.ONNX,
    "text_info": TEXT_INFO,
    "pretrain": paths.PRETRAIN_METRICS,
    "probe": paths.PROBE_METRICS,
    "export": paths.EXPORT_METRICS,
    "pretrain_report": paths.PRETRAIN_REPORT,
    "export_report": paths.EXPORT_REPORT,
    "history": paths.PRETRAIN_HISTORY,
    "knn": paths.KNN_HISTORY,
    "confusion": paths.CONFUSION,
    "embedding": paths.EMBEDDING_PLOT,
    "anomaly": paths.ANOMALY_PLOT,
    "training_plot": paths.TRAINING_PLOT,
    "confusion_plot": paths.CONFUSION_PLOT,
}
# The inputs logged as run artifacts (the models go in as MLflow models), and the recipe files
# logged under recipe/ when present.
ARTIFACTS = (
    "manifest", "pretrain", "probe", "export", "pretrain_report", "export_report", "history",
    "knn", "confusion", "embedding", "anomaly", "training_plot", "confusion_plot",
)
STAGE_FILES = ("pretrain", "probe", "export")
"""The stages whose metrics (``metrics/<stage>.json``) the register stage reads."""
REPORTED = ("pretrain", "export")
"""The stages whose report (``reports/<stage>.json``: timings, device, text) it reads too."""
RECIPE_FILES = ("params.yaml", "dvc.yaml", "dvc.lock")

STATE_TAG = "pipeline_state"
LIVE_TAG = "pretrain.run_key"
"""Tags the pretraining's live run (:mod:`contrastive.live`) with the checkpoint's run key."""
SERVICE = Path(__file__).with_name("service.py")
"""The served model's code (MLflow "model from code"); a dep of the register stage."""
SERVICE_FPR = 0.05
"""The share of val images the served model's anomaly threshold flags."""
ONNX_TAG = "onnx_model_uri"
PYTORCH_TAG = "pytorch_model_uri"


# --- what a run is made from --------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The upstream stages' outputs as the register stage reads them, and where they came from."""

    params: Params
    manifest: dict[str, Any]
    metrics: dict[str, dict[str, Any]]  # stage -> its metrics JSON (numbers only)
    reports: dict[str, dict[str, Any]]  # stage -> its report JSON (timings, device, text)
    history: list[dict[str, float]]  # one row per epoch: loss, lr, images_per_s[, knn_top1]
    state_key: str
    tags: dict[str, str]

    @property
    def linear_top1(self) -> float | None:
        """The candidate's linear-probe top-1 on test, or None when missing."""
        value = self.metrics["probe"].get("pretrained", {}).get(LINEAR)
        return float(value) if isinstance(value, int | float) else None

    @property
    def gate_metric(self) -> str:
        """What the registry gate ranks this model by: the zero-shot top-1 of an image-text
        model (its probe measured one), its cross-modal Recall@1 when the data have no classes,
        else the linear-probe top-1."""
        measured = self.metrics["probe"].get("pretrained", {})
        return next((metric for metric in GATE_METRICS if metric in measured), LINEAR)

    @property
    def gate_top1(self) -> float | None:
        """The candidate's figure in :attr:`gate_metric` on test, or None when missing."""
        value = self.metrics["probe"].get("pretrained", {}).get(self.gate_metric)
        return float(value) if isinstance(value, int | float) else None

    @property
    def collapse(self) -> str | None:
        """Why pretraining flagged the representation as collapsed, or None."""
        if not self.metrics["pretrain"].get("collapsed"):
            return None
        reason = self.reports["pretrain"].get("collapse_reason")
        return str(reason or f"flagged in {paths.PRETRAIN_METRICS}")

    @property
    def parity_ok(self) -> bool:
        """Whether onnxruntime matched torch within ``export.atol`` and the probe agreed fully."""
        return parity_ok(self.metrics["export"], self.params.export.atol,
                         bool(self.manifest.get("classes")))

    @property
    def eval_key(self) -> str:
        """Identifies the evaluation (prepared data and probe protocol) a top-1 was measured on."""
        return params_hash({"data_hash": self.manifest.get("data_hash")}, self.params.probe)


def read_snapshot(params: Params, root: str | Path = ".") -> Snapshot:
    """Read the upstream outputs under ``root``; :class:`ConfigError` if one is missing."""
    root = Path(root)
    missing = [path for path in INPUTS.values() if not (root / path).is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: not found; run the stages before register (dvc repro)")
    manifest = json.loads((root / INPUTS["manifest"]).read_text())
    metrics = {stage: json.loads((root / INPUTS[stage]).read_text()) for stage in STAGE_FILES}
    reports = {stage: json.loads((root / INPUTS[f"{stage}_report"]).read_text())
               for stage in REPORTED}
    history = _read_history(root / INPUTS["history"], root / INPUTS["knn"])
    key = state_key(params, manifest, metrics, root)

    device = reports["pretrain"].get("device", "unknown")
    tags = {
        STATE_TAG: key,
        "params_hash": params_hash(params),
        "data_hash": str(manifest.get("data_hash", "unknown")),
        "data_source": str(manifest.get("source", "unknown")),
        "device": f"{device} ({reports['pretrain'].get('precision', 'unknown')})",
        **git_state(root),
        **dvc_lock_hashes(root / "dvc.lock"),
    }
    return Snapshot(params, manifest, metrics, reports, history, key, tags)


def state_key(params: Params, manifest: dict[str, Any], metrics: dict[str, dict[str, Any]],
              root: Path) -> str:
    """The pipeline-state key: a hash of what defines the model, and of nothing else.

    In: the encoder's weights (the tensors, not the file's bytes, which also hold the name the
    file was saved under) and the ONNX file's bytes, the probe results, whether the ONNX
    parity check passed, the params that make the model (every section but ``registry`` and
    ``schedule``, which decide where and when it is registered), and the data hash. Out: timings
    (export latencies, images/s in metrics/pretrain.json and plots/pretrain.csv), which differ
    on every run, so that exporting or measuring again registers no second, identical version.
    """
    identity = {
        "encoder": weights_digest(root / INPUTS["encoder"]),
        "onnx": hashlib.sha256((root / INPUTS["onnx"]).read_bytes()).hexdigest(),
        "probe": metrics["probe"],
        "parity_ok": parity_ok(metrics["export"], params.export.atol,
                               bool(manifest.get("classes"))),
        "params": {key: value for key, value in flatten(params).items()
                   if key.split(".")[0] not in ("registry", "schedule")},
        "data_hash": manifest.get("data_hash"),
    }
    if (root / TEXT_ONNX).is_file():  # the text tower's weights are not in the encoder's state
        identity["text_onnx"] = hashlib.sha256((root / TEXT_ONNX).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def weights_digest(encoder_path: Path) -> str:
    """A hash of a saved encoder's tensors: names, dtypes, shapes and values."""
    import torch

    state = torch.load(encoder_path, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parity_ok(export: dict[str, Any], atol: float, labelled: bool = True) -> bool:
    """Whether metrics/export.json says onnxruntime matched torch within ``atol`` and the probe
    agreed on every image (data without classes have no probe: not ``labelled``); for an
    image-text model, on its ``image_embeds`` and its text tower too."""
    diff = export.get("max_abs_diff")
    agreement = export.get("prediction_agreement") if labelled else 1.0
    if not isinstance(diff, int | float) or not isinstance(agreement, int | float):
        return False
    diffs = [diff]
    if "text" in export:
        diffs += [export.get("image_embeds_max_abs_diff"), export["text"].get("max_abs_diff")]
    return all(isinstance(d, int | float) and d <= atol for d in diffs) and agreement == 1.0


def _read_history(history_csv: Path, knn_csv: Path) -> list[dict[str, float]]:
    """plots/pretrain.csv rows with the kNN accuracy of plots/knn.csv merged in by epoch."""
    with history_csv.open() as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    with knn_csv.open() as handle:
        knn = {int(float(r["epoch"])): float(r["knn_top1"]) for r in csv.DictReader(handle)}
    for row in rows:
        if int(row["epoch"]) in knn:
            row["knn_top1"] = knn[int(row["epoch"])]
    return rows


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A finished run of one pipeline state and the models logged in it."""

    run_id: str
    onnx_model_uri: str
    pytorch_model_uri: str
    reused: bool


def find_or_log_run(client: Any, experiment_id: str, snapshot: Snapshot,
                    root: str | Path = ".") -> RunRecord:
    """The finished run tagged with this pipeline state; else the pretraining's live run,
    completed now; else a new run logged now.

    Runs of this state that did not finish (a crash or store failure mid-way) are deleted first,
    so each pipeline state keeps exactly one run however many retries it took. The live run of
    the pretraining (:mod:`contrastive.live`) is adopted only if it finished, belongs to no other
    state yet and logged no param with another value.
    """
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.{STATE_TAG} = '{snapshot.state_key}'"
    )
    for run in runs:
        tags = run.data.tags
        if run.info.status == "FINISHED" and ONNX_TAG in tags and PYTORCH_TAG in tags:
            return RunRecord(run.info.run_id, tags[ONNX_TAG], tags[PYTORCH_TAG], reused=True)
    for run in runs:
        if LIVE_TAG not in run.data.tags:
            client.delete_run(run.info.run_id)
    live = live_run(client, experiment_id, snapshot)
    return log_pipeline_run(experiment_id, snapshot, root, live)


def live_run(client: Any, experiment_id: str, snapshot: Snapshot) -> Any | None:
    """The finished live run of this pretraining that this state can adopt, if any."""
    key = snapshot.reports["pretrain"].get("params_hash")
    if not key:
        return None
    params = logged_params(snapshot.params)
    for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{LIVE_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
    ):
        same_params = all(params.get(k, v) == v for k, v in run.data.params.items())
        state = run.data.tags.get(STATE_TAG)
        if run.info.status == "FINISHED" and same_params and state in (None, snapshot.state_key):
            return run
    return None


def log_pipeline_run(experiment_id: str, snapshot: Snapshot, root: str | Path = ".",
                     live: Any | None = None) -> RunRecord:
    """Log one run: params, history, final metrics, artifacts, model card, tags and both models.

    Into ``live``, the pretraining's own run, when given: its history and params are already
    there, and the state tag is set last, when the run is complete.
    """
    import mlflow
    from mlflow.entities import Metric

    root = Path(root)
    params, manifest = snapshot.params, snapshot.manifest
    name = (f"{manifest.get('source', 'data')}-{params.model.encoder}-e{params.train.epochs}"
            f"-{snapshot.state_key[:8]}")
    tags = {k: v for k, v in snapshot.tags.items() if k != STATE_TAG}
    if live is None:
        started = mlflow.start_run(experiment_id=experiment_id, run_name=name,
                                   tags=snapshot.tags)
    else:
        started = mlflow.start_run(run_id=live.info.run_id, tags=tags)
    with started as run:
        client, run_id = mlflow.MlflowClient(), run.info.run_id
        known = live.data.params if live is not None else {}
        mlflow.log_params({k: v for k, v in logged_params(params).items() if k not in known})
        now = int(time.time() * 1000)
        history = [] if live is not None else [
            Metric(f"train/{key}", value, now, int(row["epoch"]))
            for row in snapshot.history for key, value in row.items() if key != "epoch"
        ]
        finals = [Metric(key, value, now, 0) for key, value in final_metrics(snapshot).items()]
        client.log_batch(run_id, metrics=history + finals)  # MLflow splits large batches
        for key in ARTIFACTS:
            path = root / INPUTS[key]
            client.log_artifact(run_id, str(path), str(Path(INPUTS[key]).parent))
        for file in RECIPE_FILES:
            if (root / file).is_file():
                client.log_artifact(run_id, str(root / file), "recipe")
        mlflow.log_text(model_card(snapshot, run_id), "model_card.md")
        onnx_uri, pytorch_uri = _log_models(root, params.probe.anomaly_k)
        mlflow.set_tags({ONNX_TAG: onnx_uri, PYTORCH_TAG: pytorch_uri,
                         STATE_TAG: snapshot.state_key})
    return RunRecord(run_id, onnx_uri, pytorch_uri, reused=False)


def final_metrics(snapshot: Snapshot) -> dict[str, float]:
    """Every number of the stages' metrics and reports, flattened: ``probe.pretrained.linear_top1``,
    ``export.latency_ms.ort_b1``. The timings that DVC does not compare are kept in MLflow.

    Characters MLflow refuses in a metric name (class names are keys of the per-class anomaly
    table, and an image folder's class may be called anything) become ``_``.
    """
    flat = {}
    for stage, values in [*snapshot.metrics.items(), *snapshot.reports.items()]:
        for key, value in flatten(values, f"{stage}.").items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[re.sub(r"[^\w./\- ]", "_", key)] = float(value)
    return flat


def _write_reference(path: Path, root: Path, onnx_path: Path, k: int) -> None:
    """The served model's reference (:mod:`contrastive.service`): unit train embeddings and
    labels, and the deep-kNN threshold calibrated on val at :data:`SERVICE_FPR`."""
    from contrastive.anomaly import Detector
    from contrastive.data import load_split
    from contrastive.export import INPUT_NAME, OUTPUT_NAME, ort_session

    session, prepared = ort_session(onnx_path), root / Path(INPUTS["manifest"]).parent
    embedded = {}
    for split in ("train", "val"):
        images, labels = load_split(prepared, split)
        embedded[split] = (np.concatenate([
            session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 256]})[0]
            for i in range(0, len(images), 256)]), labels)
    train, labels = embedded["train"]
    detector = Detector(train, embedded["val"][0], k, SERVICE_FPR)
    unit = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    np.savez(path, embeddings=unit.astype(np.float32), labels=labels, k=k,
             threshold=detector.threshold)


def _log_models(root: Path, anomaly_k: int = 2) -> tuple[str, str]:
    """Log the ONNX encoder (served by :mod:`contrastive.service`: embeddings, and on request
    neighbours and anomaly scores) and the PyTorch encoder; return their URIs.

    Both take raw ``uint8 (N, H, W, 3)`` images. The input example has two real test images:
    torch.export would freeze a batch of one into the graph. Pinned requirements skip MLflow's
    slow requirement inference (a subprocess per model).
    """
    import mlflow
    import torch
    from mlflow.models import ModelSignature, infer_signature

    from contrastive.data import load_split
    from contrastive.export import INPUT_NAME, OUTPUT_NAME, EmbeddingModel, ort_session
    from contrastive.models import load_encoder

    onnx_path = root / INPUTS["onnx"]
    images = load_split(root / Path(INPUTS["manifest"]).parent, "test")[0][:2]
    if len(images) < 2:
        images = np.repeat(images, 2, axis=0)
    embeddings = ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    options = {"neighbours": 0, "anomaly": False}
    signature = infer_signature(images, {"embeddings": embeddings}, params=options)
    artifacts, example, pins = {}, (images, options), _pins("onnxruntime", "numpy")
    if (root / TEXT_ONNX).is_file():
        # {"images": ...} or {"texts": [...]} or both: no tensor schema can leave either out,
        # so the signature holds only the params and the service checks its input itself.
        signature = ModelSignature(inputs=None, params=signature.params)
        artifacts["text"] = str(root / paths.TEXT_ONNX_DIR)
        example = ({"images": images, "texts": np.array(["a photo of a cat."])}, options)
        pins += _pins("tokenizers")
    with tempfile.TemporaryDirectory(prefix="contrastive-reference-") as folder:
        reference = Path(folder) / "reference.npz"
        _write_reference(reference, root, onnx_path, anomaly_k)
        onnx_info = mlflow.pyfunc.log_model(
            name="encoder-onnx", python_model=str(SERVICE), signature=signature,
            artifacts={"encoder": str(onnx_path), "reference": str(reference), **artifacts},
            input_example=example, pip_requirements=pins,
        )
    model = EmbeddingModel(*load_encoder(root / INPUTS["encoder"])).eval()
    with torch.inference_mode():
        torch_embeddings = model(torch.from_numpy(images))
    torch_info = mlflow.pytorch.log_model(
        model, name="encoder-pytorch",
        signature=infer_signature(images, torch_embeddings.numpy()), input_example=images,
        pip_requirements=_pins("torch", "numpy"),
    )
    return onnx_info.model_uri, torch_info.model_uri


def _pins(*packages: str) -> list[str]:
    return [f"{p}=={installed_version(p)}" for p in ("mlflow", *packages)]


FEATURE_SETS = (("pretrained", "pretrained"), ("random init", "random_init"),
                ("raw pixels", "raw_pixels"))


def uses_section(probe: dict[str, Any]) -> str:
    """The model card's retrieval and anomaly tables, from metrics/probe.json (empty when the
    probe measured neither)."""
    present = [(name, probe[key]) for name, key in FEATURE_SETS
               if "map_at_r" in probe.get(key, {})]
    if not present:
        return ""
    retrieval_rows = "\n".join(
        f"| {name} | {m['recall_at_1']:.4f} | {m['recall_at_5']:.4f} | {m['recall_at_10']:.4f} "
        f"| {m['map_at_r']:.4f} | {m['anomaly_auroc']:.4f} |" for name, m in present
    )
    classes = list(present[0][1].get("anomaly_auroc_per_class", {}))
    class_rows = "\n".join(
        f"| {c} | " + " | ".join(f"{m['anomaly_auroc_per_class'].get(c, float('nan')):.4f}"
                                 for _, m in present) + " |"
        for c in classes
    )
    return f"""
## Retrieval and anomaly detection (test queries the train split, cosine)
| features | Recall@1 | Recall@5 | Recall@10 | mAP@R | anomaly AUROC |
|---|---|---|---|---|---|
{retrieval_rows}

Anomaly AUROC: deep kNN (mean cosine distance to the {probe.get('anomaly_k')} nearest train
embeddings), each class in turn left out of train and taken as the anomaly among the test images.

| held-out class | {' | '.join(name for name, _ in present)} |
|---|{'---|' * len(present)}
{class_rows}
"""


def image_text_section(probe: dict[str, Any]) -> str:
    """The model card's zero-shot and image-text recall table of an image-text model, next to
    random-init towers (empty for an image-only model)."""
    present = [(name, probe[key]) for name, key in FEATURE_SETS
               if RECALL in probe.get(key, {})]
    if not present:
        return ""
    columns = ("zero_shot_top1", "zero_shot_top5", "image_to_text_recall_at_1",
               "image_to_text_recall_at_5", "text_to_image_recall_at_1",
               "text_to_image_recall_at_5", RECALL)
    rows = "\n".join(f"| {name} | " + " | ".join(
        f"{m[c]:.4f}" if c in m else "-" for c in columns) + " |" for name, m in present)
    return f"""
## Image-text (test split; zero-shot: class names in CLIP's prompt templates)
| towers | zero-shot top-1 | top-5 | image-to-text R@1 | R@5 | text-to-image R@1 | R@5 | mean R@1 |
|---|---|---|---|---|---|---|---|
{rows}
"""


def model_card(snapshot: Snapshot, run_id: str) -> str:
    """A Markdown card: what the model is, what it was trained on, how good it is, how to use it."""
    p, m, metrics = snapshot.params, snapshot.manifest, snapshot.metrics
    probe, export = metrics["probe"], metrics["export"]
    latency = snapshot.reports["export"].get("latency_ms", {})
    rows = "\n".join(
        f"| {name} | {probe[key]['linear_top1']:.4f} | {probe[key]['knn_top1']:.4f} |"
        for name, key in FEATURE_SETS if LINEAR in probe.get(key, {})
    )
    quality = f"""
## Quality (frozen features, test split)
| features | linear top-1 | kNN top-1 |
|---|---|---|
{rows}

kNN k = {probe.get('knn_k')}.
""" if rows else ""
    tags, size, classes = snapshot.tags, m.get("image_size"), m.get("classes", [])
    described = (f"{m.get('num_classes')} classes: {', '.join(map(str, classes))}" if classes
                 else "no classes (captions without labels)")
    return f"""# {p.registry.model_name}

A {p.model.encoder} image encoder pretrained with {p.train.method.upper()} (contrastive, no labels)
on `{m.get('source')}`. It maps raw RGB images, `uint8 (N, {size}, {size}, 3)`, to
`float32 (N, {probe.get('embedding_dim')})` embeddings. Scaling and mean/std normalisation are part
of the ONNX graph, and its metadata holds everything a consumer needs; `contrastive embed` resizes
image files to {size}x{size} first.

## Data
- source `{m.get('source')}`, {described}
- images per split: {json.dumps(m.get('totals', {}))}
- data hash `{m.get('data_hash')}`

## Training
- {p.train.epochs} epochs, batch {p.train.batch_size}, {p.train.optimizer} lr {p.train.lr},
  temperature {p.train.temperature}, seed {p.seed}, device {tags.get('device')}
- final contrastive loss {metrics['pretrain'].get('final_loss')}
{quality}{image_text_section(probe)}{uses_section(probe)}

## Export
- ONNX max abs difference to torch {export.get('max_abs_diff')}, probe agreement
  {export.get('prediction_agreement') if classes else 'none (no classes, no probe)'}
- latency ms, onnxruntime vs torch: batch 1 {latency.get('ort_b1')} vs {latency.get('torch_b1')},
  batch 256 {latency.get('ort_b256')} vs {latency.get('torch_b256')}

## Provenance
- MLflow run `{run_id}`, pipeline state `{snapshot.state_key}`
- git commit `{tags.get('git.commit')}` (dirty: {tags.get('git.dirty')})
- dvc.lock: {', '.join(f"{s} `{tags.get(f'dvc.lock.{s}')}`" for s in UPSTREAM_STAGES)}

## Use
```
contrastive embed --model models:/{p.registry.model_name}@champion IMAGES --out emb.parquet
contrastive search --model models:/{p.registry.model_name}@champion --gallery DIR QUERY -k 5
contrastive index build --model models:/{p.registry.model_name}@champion --gallery DIR
contrastive anomaly --model models:/{p.registry.model_name}@champion IMAGES --fpr 0.05
```
"""
