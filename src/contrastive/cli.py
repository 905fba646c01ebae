"""The ``contrastive`` command: one sub-command per pipeline stage.

Each stage reads ``params.yaml``, calls one library function with the project's standard paths, and
writes its outputs. DVC runs these commands; Prefect runs DVC; tests call the same functions.
Bad params or data end with one line on stderr and exit status 2; a failed check ends with exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from contrastive.config import ConfigError, Params, StageFailed, load_params


def _prepare(params: Params) -> dict[str, Any]:
    from contrastive.data import prepare

    manifest = prepare(params.data, params.seed)
    return {"counts": manifest["totals"], "classes": manifest["num_classes"]}


def _pretrain(params: Params) -> dict[str, Any]:
    from contrastive.train import pretrain

    return pretrain(params)


def _probe(params: Params) -> dict[str, Any]:
    from contrastive.evaluate import probe_stage

    return probe_stage(params)


def _export(params: Params) -> dict[str, Any]:
    from contrastive.export import export_encoder

    return export_encoder(
        "models/encoder.pt",
        "models/probe.pt",
        "data/prepared",
        "models/encoder.onnx",
        "metrics/export.json",
        params.export,
    )


STAGES: dict[str, tuple[Callable[[Params], dict[str, Any]], str]] = {
    "prepare": (_prepare, "load, clean and split the dataset into data/prepared"),
    "pretrain": (_pretrain, "contrastive pretraining of the encoder -> models/encoder.pt"),
    "probe": (_probe, "linear probe and kNN on frozen features, with baselines"),
    "export": (_export, "export the encoder to ONNX and check it with onnxruntime"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        result = STAGES[args.command][0](params)
    except ConfigError as exc:
        print(f"contrastive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"contrastive {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
