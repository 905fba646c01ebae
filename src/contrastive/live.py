"""Live tracking: the pretraining run in MLflow while it trains.

:class:`LiveRun` is a training-loop callback (the loop itself imports no tracker). When training
starts it opens an MLflow run in ``registry.experiment``, tagged with the checkpoint's run key,
and logs the params, the prepared dataset as the run's input and, through MLflow, the machine's
system metrics; after every epoch it queues the epoch's loss, learning rate, images/s, kNN
top-1 and temperature for MLflow's asynchronous logging (the epoch does not wait for the store);
at the end it flushes the queue and closes the run as FINISHED, or as FAILED when training
stopped early. A resumed pretraining continues its unfinished run. The ``register`` stage later
adopts the finished run (:func:`contrastive.tracking.find_or_log_run`) instead of creating a
second one.

Tracking never stops training: if the store fails, one warning line is printed and training goes
on untracked; ``register`` then logs the whole history itself. ``CONTRASTIVE_LIVE_TRACKING=0``
turns it off.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contrastive import paths
from contrastive.callbacks import Callback, TrainState
from contrastive.config import Params
from contrastive.data import load_manifest

ENV = "CONTRASTIVE_LIVE_TRACKING"
RUN_KEY_TAG = "pretrain.run_key"  # what tracking.find_or_log_run looks for (tracking.LIVE_TAG)


def enabled() -> bool:
    """Whether live tracking is on (``CONTRASTIVE_LIVE_TRACKING``, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class LiveRun(Callback):
    """Logs a pretraining run to MLflow as it trains; see the module docstring."""

    def __init__(self, params: Params, prepared_dir: str | Path = paths.PREPARED) -> None:
        self.params, self.prepared_dir = params, Path(prepared_dir)
        self.manifest: dict[str, Any] = {}
        self.active = False
        self.run_id: str | None = None

    def _guard(self, action: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; on a store failure, say so once and stop tracking this run."""
        try:
            fn()
        except Exception as exc:  # tracking is a convenience: it must never stop training
            from contrastive.store import first_line

            if self.active or action == "opening the run":
                print(f"contrastive pretrain: warning: live MLflow tracking is off ({action} "
                      f"failed: {first_line(exc)}); register will log the history",
                      file=sys.stderr)
            self.active = False

    def on_train_start(self, state: TrainState) -> None:
        if state.epoch < state.epochs:  # a finished checkpoint only writes the outputs again
            self._guard("opening the run", lambda: self._start(state))

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        if self.active:
            self._guard("logging an epoch", lambda: self._log_epoch(record))

    def on_train_end(self, state: TrainState) -> None:
        if self.active:
            import mlflow

            status = "FINISHED" if state.epoch >= state.epochs else "FAILED"
            self._guard("logging an epoch", mlflow.flush_async_logging)
            self._guard("closing the run", lambda: mlflow.end_run(status))
            self.active = False

    def _start(self, state: TrainState) -> None:
        import mlflow

        from contrastive.store import (
            connect,
            ensure_experiment,
            logged_params,
            store_lock,
            tracking_uri,
        )

        self.manifest = load_manifest(self.prepared_dir)
        uri = tracking_uri()
        with store_lock(uri):
            client = connect(uri)
            experiment_id = ensure_experiment(client, self.params.registry.experiment, uri)
        unfinished = [
            run for run in client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{state.run_key}'",
                order_by=["attributes.start_time DESC"])
            if run.info.status != "FINISHED"
        ]
        if state.epoch > 0 and unfinished:  # a resumed pretraining continues its run
            run = mlflow.start_run(run_id=unfinished[0].info.run_id, log_system_metrics=True)
        else:
            p, m = self.params, self.manifest
            name = (f"{m.get('source', 'data')}-{p.model.encoder}-{p.train.method}"
                    f"-e{p.train.epochs}-{state.run_key[:8]}")
            run = mlflow.start_run(experiment_id=experiment_id, run_name=name,
                                   tags={RUN_KEY_TAG: state.run_key,
                                         "data_hash": str(m.get("data_hash"))},
                                   log_system_metrics=True)
            mlflow.log_params(logged_params(p))
            mlflow.log_input(self._dataset(), context="training")
        self.run_id, self.active = run.info.run_id, True

    def _dataset(self) -> Any:
        """The prepared training split as an MLflow dataset: its name, source and content hash."""
        import mlflow
        import numpy as np

        m = self.manifest
        counts = m.get("totals", {})
        size = m.get("image_size", 0)
        shape_hint = np.zeros((1, size, size, 3), dtype=np.uint8)  # schema only, not the images
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            return mlflow.data.from_numpy(
                shape_hint, source=f"{self.prepared_dir.as_posix()}/train.npz",
                name=f"{m.get('source', 'data')}-{size}px-{counts.get('train', '?')}-train",
                digest=str(m.get("data_hash", ""))[:36],
            )

    def _log_epoch(self, record: dict[str, Any]) -> None:
        import mlflow

        values = {f"train/{k}": float(v) for k, v in record.items() if k != "epoch"}
        # queued and written by MLflow's logging thread: the next epoch need not wait for the
        # store; the run's end flushes the queue
        mlflow.log_metrics(values, step=int(record["epoch"]), synchronous=False)
