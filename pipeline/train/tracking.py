"""Experiment tracking from rank 0 of a training run: TensorBoard event files (always on by default), MLflow and
Weights & Biases (offline by default) when configured. One record per epoch: every loss term, train/val (and, at
the end, test) top-1, mean weight per teacher, lr, samples/s, input wait. Values arrive already reduced (the
epoch's one host sync); tracking never adds a device sync. Sweeps get the same per trial (each trial is a run).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pipeline.store import storage

TRACKING_FILE = "tracking.json"  # the MLflow / W&B run ids, so a resumed run appends to the same run
SCALAR_PREFIXES = ("train_", "val_", "test_", "weight/", "feat_weight/")
SCALARS = ("lr", "samples_per_s", "input_wait_seconds", "epoch_seconds", "best_val_top1")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch record worth a chart."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (k.startswith(SCALAR_PREFIXES) or k in SCALARS)
    }


class Tracker:
    def __init__(self, tracking, run_dir: str, name: str, config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        ids_url = storage.join(run_dir, TRACKING_FILE)
        self.ids: dict[str, str] = storage.read_json(ids_url) if storage.exists(ids_url) else {}
        self.tb = self.tb_local = None
        if tracking.tensorboard:
            from tensorboardX import SummaryWriter

            remote = storage.join(run_dir, "tensorboard")
            self.tb_remote = None if storage.is_local(remote) else remote
            self.tb_local = remote if self.tb_remote is None else tempfile.mkdtemp(prefix="camkd-tb-")
            self.tb = SummaryWriter(logdir=self.tb_local)
        self.mlflow = None
        if tracking.mlflow is not None:
            import mlflow

            mlflow.set_tracking_uri(tracking.mlflow.uri)
            mlflow.set_experiment(tracking.mlflow.experiment or config.get("experiment", "default"))
            run = mlflow.start_run(run_id=self.ids.get("mlflow"), run_name=name)
            if "mlflow" not in self.ids:
                mlflow.log_params(_flat_params(config))
            self.ids["mlflow"] = run.info.run_id
            self.mlflow = mlflow
        self.wandb = None
        if tracking.wandb is not None:
            import wandb

            run = wandb.init(
                project=tracking.wandb.project,
                name=name,
                id=self.ids.get("wandb"),
                resume="allow",
                mode=tracking.wandb.mode,
                dir=tempfile.mkdtemp(prefix="camkd-wandb-"),
                config=config,
            )
            self.ids["wandb"] = run.id
            self.wandb = run
        if self.ids:
            storage.write_json(ids_url, self.ids)

    def log(self, record: dict[str, Any], step: int) -> None:
        values = scalars(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
            if self.tb_remote is not None:  # an object store: upload the (small) event files as they grow
                for name in os.listdir(self.tb_local):
                    with open(os.path.join(self.tb_local, name), "rb") as f:
                        storage.write_bytes_atomic(storage.join(self.tb_remote, name), f.read())
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat_params(v, f"{prefix}{k}."))
        elif k not in ("teachers", "tune"):
            out[f"{prefix}{k}"] = str(v)[:250]
    return out
