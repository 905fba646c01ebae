"""The registered model as MLflow serves it: embeddings, and on request neighbours and anomalies.

MLflow logs this file as a "model from code" (``mlflow.pyfunc.log_model(python_model=<this
file>)``), so a served model needs only numpy and onnxruntime, not this package. Its artifacts:
``encoder``, the exported ONNX encoder, and ``reference``, an ``.npz`` of the train split's unit
embeddings and labels with the deep-kNN anomaly settings (``k``, and the ``threshold`` that a share
``fpr`` of the val split exceeds).

``predict(images, params={"neighbours": 5, "anomaly": True})`` on ``uint8 (N, H, W, 3)`` images
returns ``embeddings`` always; with ``neighbours`` > 0 the train images nearest by cosine
(``neighbour_index``, ``neighbour_label``, ``neighbour_cosine``, best first); with ``anomaly``
the score (mean cosine distance to the ``k`` nearest train embeddings) and ``anomalous``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class EncoderService(mlflow.pyfunc.PythonModel):
    """The ONNX encoder with the train split's embeddings as the reference."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(context.artifacts["encoder"],
                                            providers=["CPUExecutionProvider"])
        with np.load(context.artifacts["reference"]) as reference:
            self.reference = reference["embeddings"]
            self.labels = reference["labels"]
            self.k = int(reference["k"])
            self.threshold = float(reference["threshold"])

    def predict(self, context, model_input, params=None):
        """See the module docstring. No type hints: MLflow would read them as the input schema
        (the logged signature is the schema)."""
        params = params or {}
        images = np.asarray(model_input, dtype=np.uint8)
        embeddings = self.session.run(["embeddings"], {"images": images})[0]
        out = {"embeddings": embeddings}
        neighbours = min(int(params.get("neighbours", 0)), len(self.reference))
        anomaly = bool(params.get("anomaly", False))
        if neighbours <= 0 and not anomaly:
            return out
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        similarity = unit @ self.reference.T  # (N, train)
        order = np.argsort(-similarity, axis=1, kind="stable")
        if neighbours > 0:
            top = order[:, :neighbours]
            out["neighbour_index"] = top
            out["neighbour_label"] = self.labels[top]
            out["neighbour_cosine"] = np.take_along_axis(similarity, top, axis=1)
        if anomaly:
            nearest = np.take_along_axis(similarity, order[:, :self.k], axis=1)
            out["anomaly_score"] = 1 - nearest.mean(axis=1)
            out["anomalous"] = out["anomaly_score"] > self.threshold
        return out


mlflow.models.set_model(EncoderService())
