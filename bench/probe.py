"""Probe stage: the linear probes and embedding map against the procedure they replaced.

On the CIFAR-10 development subset (32x32; 4,500 train / 500 val / 1,000 test images after
``prepare``), the frozen features of a randomly initialised ``small_cnn`` (seed 0, 128-d; no
pretraining, the cost is in the fits) and the raw pixels (3,072-d) are computed once; then on
the same features:

- reference: the previous procedure, copied below: one L-BFGS fit per weight decay of
  ``params.yaml`` (5), each cold-started from a seeded random initialisation, ``max_iter`` 200 and
  torch's default tolerances, the decay chosen on val, plus the kNN; and the PCA + t-SNE map of
  all 1,000 test embeddings;
- project: ``evaluate_features`` (preconditioned L-BFGS along the warm-started regularisation
  path, with a tolerance) and ``plot_embedding`` with ``probe.tsne_points`` of ``params.yaml``.

Each part runs once, reference then project, part after part (random-init features, raw pixels,
map), so a change of load hits both alike. Prints each part's wall times, their ratio and the
linear top-1 of both, the total, and an estimate of the whole stage on these data (three feature
sets, two of them extracted). Fails (exit 1) when a linear top-1 differs by more than 0.005.

    python bench/probe.py [--data DIR] [--threads N]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the benchmark's output

import torch
import torch.nn.functional as F
from _common import WrongResult, data_file, line, machine_line, parser, run

from contrastive.config import DataConfig, ModelConfig, Params, load_params
from contrastive.data import load_manifest, load_split, prepare
from contrastive.evaluate import Features, _pixel_features, evaluate_features
from contrastive.features import extract_features, knn_scores, topk_accuracy
from contrastive.models import LinearProbe, build_encoder
from contrastive.plots import plot_embedding

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005
"""How far the project's linear top-1 may be from the reference's."""
T = TypeVar("T")


def reference_fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    seed: int,
) -> LinearProbe:
    """The previous ``fit_linear_probe``: cold-started L-BFGS on the standardised features."""
    torch.manual_seed(seed)
    probe = LinearProbe(features.shape[1], num_classes)
    probe.feature_mean.copy_(features.mean(0))
    probe.feature_std.copy_(features.std(0).clamp_min(1e-6))
    standardized = (features - probe.feature_mean) / probe.feature_std
    linear = probe.linear
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(standardized), labels)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.eval()


def reference_evaluate(feats: Features, num_classes: int, params: Params) -> dict[str, float]:
    """The previous ``evaluate_features`` loop: a cold fit per decay in params order, the first
    best on val kept; the kNN as the project computes it."""
    cfg = params.probe
    best: tuple[float, float, LinearProbe] | None = None
    for wd in cfg.weight_decays:
        probe = reference_fit(
            feats.train, feats.y_train, num_classes, wd, cfg.max_iter, params.seed
        )
        with torch.no_grad():
            val_acc = topk_accuracy(probe(feats.val), feats.y_val, 1)
        if best is None or val_acc > best[0]:
            best = (val_acc, wd, probe)
    assert best is not None
    _, wd, probe = best
    with torch.no_grad():
        linear = probe(feats.test)
    knn = knn_scores(
        feats.train, feats.y_train, feats.test, num_classes, cfg.knn_k, cfg.knn_temperature
    )
    return {
        "linear_top1": topk_accuracy(linear, feats.y_test, 1),
        "linear_weight_decay": wd,
        "knn_top1": topk_accuracy(knn, feats.y_test, 1),
    }


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Seconds of one call of ``fn`` and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")
    params = load_params(ROOT / "params.yaml")
    cpu = torch.device("cpu")

    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared"
        data = DataConfig(
            source="npz", path=str(train_file), test_path=str(test_file), image_size=32
        )
        prepare(data, params.seed, prepared)
        manifest = load_manifest(prepared)
        classes, num_classes = manifest["classes"], manifest["num_classes"]
        splits = {s: load_split(prepared, s) for s in ("train", "val", "test")}
        torch.manual_seed(params.seed)
        encoder = build_encoder(ModelConfig(), 32)
        mean, std, batch = manifest["mean"], manifest["std"], params.probe.batch_size
        start = time.perf_counter()
        f = {s: extract_features(encoder, x, mean, std, cpu, batch) for s, (x, _) in splits.items()}
        extract_s = time.perf_counter() - start
        y = {s: torch.from_numpy(labels) for s, (_, labels) in splits.items()}
        random_feats = Features(f["train"], f["val"], f["test"], y["train"], y["val"], y["test"])
        feature_sets = {"random-init": random_feats, "raw pixels": _pixel_features(splits)}

        print(machine_line("probe stage"))
        cfg = params.probe
        print(
            f"# {len(random_feats.y_train)} train / {len(random_feats.y_val)} val / "
            f"{len(random_feats.y_test)} test images of 32x32; weight decays "
            f"{cfg.weight_decays}, max_iter {cfg.max_iter}; project: tolerance "
            f"{cfg.tolerance:g}, tsne_points {cfg.tsne_points}; random-init small_cnn features "
            f"extracted in {extract_s:.1f} s",
            flush=True,
        )
        totals = {"reference": 0.0, "project": 0.0}
        project_s: dict[str, float] = {}
        wrong = []
        for name, feats in feature_sets.items():
            ref_s, ref = timed(reference_evaluate, feats, num_classes, params)
            new_s, (new, _, _) = timed(evaluate_features, feats, num_classes, params)
            totals["reference"] += ref_s
            totals["project"] += new_s
            project_s[name] = new_s
            line(
                f"fits + kNN, {name}",
                f"reference {ref_s:6.1f} s",
                f"project {new_s:5.1f} s",
                f"ratio {ref_s / new_s:5.1f}x",
                f"linear top-1 {ref['linear_top1']:.4f} vs {new['linear_top1']:.4f}",
                f"wd {ref['linear_weight_decay']:g} vs {new['linear_weight_decay']:g}",
                f"kNN top-1 {ref['knn_top1']:.4f} vs {new['knn_top1']:.4f}",
            )
            if abs(ref["linear_top1"] - new["linear_top1"]) > TOLERANCE:
                wrong.append(
                    f"{name}: linear top-1 {new['linear_top1']:.4f} against the reference's "
                    f"{ref['linear_top1']:.4f} (more than {TOLERANCE} apart)"
                )

        test, y_test = random_feats.test, random_feats.y_test
        # Untimed, so that neither side pays for importing matplotlib and scikit-learn.
        plot_embedding(tmp / "warm-up.png", test[:10], y_test[:10], classes, params.seed)
        ref_s, _ = timed(plot_embedding, tmp / "ref.png", test, y_test, classes, params.seed,
                         tsne_points=len(test))
        new_s, _ = timed(plot_embedding, tmp / "new.png", test, y_test, classes, params.seed,
                         tsne_points=cfg.tsne_points)
        totals["reference"] += ref_s
        totals["project"] += new_s
        line("PCA + t-SNE map", f"reference {ref_s:6.1f} s", f"project {new_s:5.1f} s",
             f"ratio {ref_s / new_s:5.1f}x", f"t-SNE of {len(test)} vs "
             f"{min(len(test), cfg.tsne_points)} points")
        ref_total, new_total = totals["reference"], totals["project"]
        line("total", f"reference {ref_total:6.1f} s", f"project {new_total:5.1f} s",
             f"ratio {ref_total / new_total:5.1f}x")
        # The stage: pretrained and random-init features extracted, fitted like random-init's;
        # raw pixels fitted; one map.
        stage = 2 * extract_s + 2 * project_s["random-init"] + project_s["raw pixels"] + new_s
        line("stage estimate (project)", f"{stage:.1f} s", "target <= 60 s")
        if wrong:
            raise WrongResult("; ".join(wrong))


if __name__ == "__main__":
    run(main)
