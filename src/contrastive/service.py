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

An image-text (``clip``) model has a third artifact, ``text``: the text tower's folder
(``text.onnx`` and the ``tokenizer.json`` that truncates and pads for it, so the service needs
the tokenizers library too). It takes ``{"images": ...}``, ``{"texts": [...]}`` or both: images
also get ``image_embeds``, texts ``text_embeds`` (unit vectors in one space), and both together
``similarity``, the cosine of every image with every text ``(N_images, N_texts)``, and
``logits_per_image``, CLIP's logits (similarity x the ``logit_scale`` of ``text.json``, 1 / the
learned temperature; their softmax over the texts gives zero-shot probabilities).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUTS = ("images", "texts")


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
        self.text = self.tokenizer = self.logit_scale = None
        if "text" in context.artifacts:
            from tokenizers import Tokenizer

            folder = Path(context.artifacts["text"])
            self.text = ort.InferenceSession(str(folder / "text.onnx"),
                                             providers=["CPUExecutionProvider"])
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            info = json.loads((folder / "text.json").read_text())
            self.logit_scale = info.get("logit_scale")

    def predict(self, context, model_input, params=None):
        """See the module docstring. No type hints: MLflow would read them as the input schema
        (the logged signature is the schema)."""
        params = params or {}
        images, texts = model_input, None
        if isinstance(model_input, dict):
            unknown = sorted(set(model_input) - set(INPUTS))
            if unknown or not model_input:
                raise _bad_input(f"keys {unknown}: allowed are 'images' and 'texts'")
            images, texts = model_input.get("images"), model_input.get("texts")
        out = {}
        if texts is not None:
            out["text_embeds"] = self._embed_texts(texts)
        if images is not None:
            out.update(self._embed_images(np.asarray(images, dtype=np.uint8), params))
        if "text_embeds" in out and "image_embeds" in out:
            out["similarity"] = out["image_embeds"] @ out["text_embeds"].T
            if self.logit_scale is not None:  # CLIP's logits_per_image
                out["logits_per_image"] = self.logit_scale * out["similarity"]
        return out

    def _embed_texts(self, texts):
        if self.text is None:
            raise _bad_input("'texts': this model has no text tower (only train.method clip "
                             "learns one); send 'images'")
        texts = [str(t) for t in np.asarray(texts).ravel()]
        if not texts or not all(t.strip() for t in texts):
            raise _bad_input("'texts': give one or more non-empty sentences")
        ids = np.array([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=np.int64)
        return self.text.run(["text_embeds"], {"tokens": ids})[0]

    def _embed_images(self, images, params):
        names = ["embeddings", "image_embeds"] if self.text is not None else ["embeddings"]
        out = dict(zip(names, self.session.run(names, {"images": images}), strict=True))
        embeddings = out["embeddings"]
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


def _bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and the message."""
    return MlflowException(f"model input {message}", error_code=INVALID_PARAMETER_VALUE)


mlflow.models.set_model(EncoderService())
