"""The ``contrastive`` command: one sub-command per pipeline stage, plus registry and model tools.

Each stage reads ``params.yaml`` and calls its stage function (:mod:`contrastive.stages`) with the
project's layout. DVC runs these commands; Prefect runs DVC; tests call the same functions.
``registry``, ``embed``, ``index``, ``search`` and ``anomaly`` serve people who use the registered
models; ``remote check`` checks the DVC remote before ``dvc push`` / ``dvc pull``.
Bad params or data end with one line on stderr and exit status 2; a failed check ends with exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from contrastive import paths
from contrastive.config import ConfigError, Params, StageFailed, load_params
from contrastive.cpu import configure_threads
from contrastive.layout import Layout


def _prepare(params: Params) -> dict[str, Any]:
    from contrastive.stages import prepare

    return prepare.run(params, Layout())


def _pretrain(params: Params, params_path: str = "params.yaml") -> dict[str, Any] | int:
    """Pretrain in this process, or, when ``train.devices`` asks for several and this is not
    already one of torchrun's processes, check everything and relaunch this command through
    ``torch.distributed.run``: its exit status."""
    from contrastive import distributed, live
    from contrastive.stages import pretrain

    layout = Layout()
    processes = distributed.requested_processes(params)
    if processes > 1 and distributed.env_world_size() == 1:
        on_cuda = pretrain.check_launch(params, layout, processes)
        return distributed.launch(["pretrain", "--params", params_path], processes, on_cuda)
    main_rank = distributed.env_rank() == 0
    tracked = live.enabled() and main_rank
    return pretrain.run(params, layout, callbacks=[live.LiveRun(params)] if tracked else [])


def _probe(params: Params) -> dict[str, Any]:
    from contrastive.stages import probe

    return probe.run(params, Layout())


def _export(params: Params) -> dict[str, Any]:
    from contrastive.stages import export

    return export.run(params, Layout())


def _register(params: Params) -> dict[str, Any]:
    from contrastive.stages import register

    return register.run(params, Layout())


STAGES: dict[str, tuple[Callable[[Params], dict[str, Any]], str]] = {
    "prepare": (_prepare, f"load, clean and split the dataset into {paths.PREPARED}"),
    "pretrain": (_pretrain, f"contrastive pretraining of the encoder -> {paths.ENCODER}"),
    "probe": (_probe, "linear probe and kNN on frozen features, with baselines"),
    "export": (_export, "export the encoder to ONNX and check it with onnxruntime"),
    "register": (_register, "log the run to MLflow, register the model, apply the promotion gate"),
}


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (double backquotes, ``:func:`x``` roles), as
    ``--help`` shows it in a terminal."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m[1].rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def version() -> str:
    """The installed package's version (``contrastive --version``)."""
    try:
        return installed_version("contrastive")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def use_store(args: argparse.Namespace) -> None:
    """Point MLflow at the store the command names, so that it runs from any folder:
    ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite file beside ``--params``
    (the project's folder) instead of one in the current folder."""
    from contrastive.store import DEFAULT_DB

    uri = getattr(args, "tracking_uri", None)
    params = getattr(args, "params", None)
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    elif not os.environ.get("MLFLOW_TRACKING_URI") and params:
        project = Path(params).resolve().parent
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / DEFAULT_DB}"


def _registry(args: argparse.Namespace) -> Any:
    from contrastive import registry

    params = load_params(args.params)
    if args.action == "list":
        return registry.list_versions(params)
    if args.action == "show":
        return registry.show(params, args.ref)
    if args.action == "promote":
        return registry.promote(params, args.version, args.reason)
    return registry.rollback(params, args.reason)


def _remote(args: argparse.Namespace) -> str:
    from contrastive.remote import check

    return check(args.project, args.remote)


def _embed(args: argparse.Namespace) -> dict[str, Any]:
    from contrastive.inference import embed

    return embed(args.model, args.inputs, args.out, args.batch_size)


def _search(args: argparse.Namespace) -> Any:
    from contrastive.gallery import format_hits, search

    results = search(args.model, args.queries, args.k, args.gallery, args.index, args.batch_size,
                     args.text)
    return results if args.json else format_hits(results)


def _classify(args: argparse.Namespace) -> Any:
    from contrastive.classify import classify, format_predictions

    result = classify(args.model, args.labels, args.inputs, args.top, args.batch_size)
    return result if args.json else format_predictions(result)


def _index(args: argparse.Namespace) -> dict[str, Any]:
    from contrastive.gallery import build_index

    return build_index(args.model, args.gallery, args.out, args.kind, args.batch_size)


def _anomaly(args: argparse.Namespace) -> Any:
    from contrastive.anomaly import anomaly, format_scores

    result = anomaly(args.model, args.inputs, args.data, args.fpr, args.k, args.batch_size)
    return result if args.json else format_scores(result)


def _rate(text: str) -> float:
    """argparse type for --fpr: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got '{text}'")
    return value


def _positive_int(text: str) -> int:
    """argparse type for counts (batch size, k): a whole number >= 1, else argparse's one-line
    error and exit status 2 (a batch size of 0 used to end in a traceback)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive",
                                     description=plain(__doc__.splitlines()[0]))
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    params_help = "params file (params.yaml)"
    store_help = ("MLflow tracking URI (default: MLFLOW_TRACKING_URI, else mlflow.db beside "
                  "--params)")
    for name, (fn, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--params", default="params.yaml", help=params_help)
        stage.set_defaults(run=lambda args, fn=fn: fn(load_params(args.params)))
    sub.choices["pretrain"].set_defaults(
        run=lambda args: _pretrain(load_params(args.params), args.params)
    )

    registry = sub.add_parser("registry", help="list, show, promote or roll back model versions")
    registry.set_defaults(run=_registry)
    actions = registry.add_subparsers(dest="action", required=True)
    commands = {
        "list": "versions, aliases, key metrics, git commit and run id",
        "show": "one version (by number or alias): tags, metrics, run",
        "promote": "make a version champion (recorded with your reason)",
        "rollback": "make previous-champion champion again (recorded with your reason)",
    }
    for action, help_text in commands.items():
        command = actions.add_parser(action, help=help_text, description=help_text)
        command.add_argument("--params", default="params.yaml", help=params_help)
        command.add_argument("--tracking-uri", help=store_help)
        if action == "show":
            command.add_argument("ref", metavar="ALIAS|VERSION")
        if action == "promote":
            command.add_argument("version", metavar="VERSION", help="version number or alias")
        if action in ("promote", "rollback"):
            command.add_argument("--reason", required=True, help="why; recorded on the version")

    remote = sub.add_parser("remote", help="check the DVC remote before dvc push / dvc pull")
    remote_actions = remote.add_subparsers(dest="action", required=True)
    remote_check = remote_actions.add_parser(
        "check",
        help="credentials resolve and the bucket answers (s3 remotes)",
        description="read the DVC remote from DVC's config; for an s3 remote, check that "
        "credentials resolve (the remote's own, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a "
        "profile) and that the bucket answers at the remote's endpointurl; one line and exit "
        "status 2 naming the setting to fix",
    )
    remote_check.add_argument("--remote", metavar="NAME", help="the remote (DVC's default)")
    remote_check.add_argument("--project", default=".", help="the DVC project's folder (.)")
    remote_check.set_defaults(run=_remote)

    model_help = "models:/NAME@ALIAS, models:/NAME/VERSION, or an .onnx file"
    champion = "models:/contrastive-encoder@champion"
    embed = sub.add_parser("embed", help="embed image files with a registered encoder",
                           description="embed image files and folders with onnxruntime")
    embed.add_argument("--model", default=champion, help=f"{model_help} ({champion})")
    embed.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER")
    embed.add_argument("--out", required=True, help=".npy (array) or .parquet (file, embedding)")
    embed.add_argument("--batch-size", type=_positive_int, default=256)
    embed.set_defaults(run=_embed)
    search_store = ("where models:/ names resolve: --tracking-uri, else MLFLOW_TRACKING_URI, else "
                    "mlflow.db beside --params, else in the current folder")

    index = sub.add_parser("index", help="gallery indexes published with a model")
    index_actions = index.add_subparsers(dest="action", required=True)
    build = index_actions.add_parser(
        "build", help="index a gallery with the model; log it on the model version",
        description="embed a gallery with the model, build a nearest-neighbour index (exact up "
        "to 20,000 images, FAISS HNSW above) and log it on the model version (models:/ URI) "
        "and/or write it to --out")
    build.add_argument("--model", default=champion, help=f"{model_help} ({champion})")
    build.add_argument("--gallery", required=True, metavar="FOLDER|NPZ",
                       help="image folder, or .npz with x uint8 (N, H, W[, C])")
    build.add_argument("--out", metavar="FOLDER", help="also write the index here")
    build.add_argument("--kind", default="auto", choices=("auto", "exact", "faiss-hnsw"))
    build.add_argument("--batch-size", type=_positive_int, default=256)
    build.set_defaults(run=_index)

    search = sub.add_parser("search", help="nearest gallery images to query images or texts",
                            description="the gallery images most similar to each QUERY image "
                            "and each --text (cosine): from --gallery, else --index, else the "
                            "model version's index; --text needs an image-text (clip) model")
    search.add_argument("--model", default=champion, help=f"{model_help} ({champion})")
    search.add_argument("--gallery", metavar="FOLDER|NPZ", help="embed this gallery now")
    search.add_argument("--index", metavar="FOLDER", help="an index folder (index build --out)")
    search.add_argument("queries", nargs="*", metavar="QUERY_IMAGE")
    search.add_argument("--text", action="append", default=[], metavar="SENTENCE",
                        help="a query sentence (repeat for more); needs a clip model")
    search.add_argument("-k", type=_positive_int, default=5, help="how many results (5)")
    search.add_argument("--json", action="store_true", help="JSON instead of a table")
    search.add_argument("--batch-size", type=_positive_int, default=256)
    search.set_defaults(run=_search)

    classify = sub.add_parser(
        "classify", help="zero-shot classification of images by label names (clip models)",
        description="each image's nearest label by cosine, each label the mean of its "
        "embeddings under CLIP's prompt templates; needs an image-text (clip) model")
    classify.add_argument("--model", default=champion, help=f"{model_help} ({champion})")
    classify.add_argument("--labels", required=True, metavar="A,B,...",
                          help="the label names, separated by commas (cat,dog,ship)")
    classify.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER")
    classify.add_argument("--top", type=_positive_int, default=1,
                          help="how many labels per image, best first (1)")
    classify.add_argument("--json", action="store_true", help="JSON instead of a table")
    classify.add_argument("--batch-size", type=_positive_int, default=256)
    classify.set_defaults(run=_classify)

    anomaly = sub.add_parser(
        "anomaly", help="deep-kNN anomaly score of images, against the train split",
        description="mean cosine distance of each image to its k nearest train images; "
        "anomalous above the threshold that a share --fpr of the val split exceeds")
    anomaly.add_argument("--model", default=champion, help=f"{model_help} ({champion})")
    anomaly.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER")
    anomaly.add_argument("--data", default=paths.PREPARED, help="prepared splits (train: normal, "
                         f"val: calibration) ({paths.PREPARED})")
    anomaly.add_argument("--fpr", type=_rate, default=0.05,
                         help="false-positive rate on val that sets the threshold (0.05)")
    anomaly.add_argument("-k", type=_positive_int, default=2, help="nearest train images (2)")
    anomaly.add_argument("--json", action="store_true", help="JSON instead of a table")
    anomaly.add_argument("--batch-size", type=_positive_int, default=256)
    anomaly.set_defaults(run=_anomaly)
    for command in (embed, search, build, anomaly, classify):
        command.add_argument("--params", help="the project's params file; " + search_store)
        command.add_argument("--tracking-uri", help="MLflow tracking URI; " + search_store)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``contrastive`` command. Sets the CPU thread policy first, before any stage imports
    torch (:func:`contrastive.cpu.configure_threads`): one thread per usable CPU, waiting threads
    yield, unless the user set ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY``."""
    configure_threads()
    args = build_parser().parse_args(argv)
    # one of torchrun's processes: rank 0 speaks for all of them (they share params and, through
    # the all-reduced loss, the same errors); a process that fails alone says so itself
    main_rank = os.environ.get("RANK", "0") == "0"
    use_store(args)
    try:
        result = args.run(args)
    except ConfigError as exc:
        if main_rank:
            print(f"contrastive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        if main_rank or getattr(exc, "rank_specific", False):
            print(f"contrastive {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, int):  # the exit status of the processes it launched
        return result
    if not main_rank:
        return 0
    if isinstance(result, str):
        print(result)
    else:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
