"""Where a run's numbers go besides its own folder: TensorBoard (``tensorboard: true``),
MLflow and Weights & Biases (``tracking: [mlflow, wandb]``), each a well-kept library of its
own, each an optional extra.

Every tracker gets the same things from a run, in the main process only (under DDP, rank
0): the resolved config as parameters when the run starts, every ``metrics.jsonl`` record
as metrics at its epoch, and at the end ``results.json``, the per-epoch record, the config
and the student (``best.pt``, else ``last.pt``) as artifacts, the final test numbers (the
fidelity figures among them) and the run's provenance as tags. A resumed run continues the
tracked run it started (its ids are kept in the run folder's ``tracking.json``), and a run
that fails is marked failed.

- MLflow: to ``tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else a local SQLite store,
  ``./mlflow.db``, its artifacts in ``mlartifacts/`` beside it), in the experiment
  ``tracking_project``; ``tracking_group`` is a tag.
- W&B: the project ``tracking_project`` and the group ``tracking_group``, under the run
  folder; ``WANDB_MODE=offline`` is honoured (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .._extras import require
from ..atomic import write_json_atomic
from ..errors import UsageError
from .config import RunConfig, config_to_dict

__all__ = ["TRACKERS", "TRACKING_FILE", "open_loggers", "numbers", "flat_config"]

TRACKERS = ("mlflow", "wandb")
TRACKING_FILE = "tracking.json"  # the tracked runs' ids, so that a resume continues them


def numbers(prefix: str, values: dict) -> dict[str, float]:
    """The numbers of a nested record by path: ``{"fidelity": {"noisy": {"0.1": {"kl": x}}}}``
    under ``test`` is ``test/fidelity/noisy/0.1/kl``; what is not a number is left out."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(numbers(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = v
    return out


def epoch_numbers(record: dict) -> dict[str, float]:
    """What a tracker plots of an epoch's record: the training means, the rate, validation
    and test (when measured) and the epoch's seconds."""
    found = {"train/lr": record["lr"], "train/epoch_seconds": record.get("epoch_seconds", 0.0),
             **numbers("train", record["train"])}
    for split in ("val", "test"):
        found.update(numbers(split, record.get(split, {})))
    return found


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as ``section.key`` parameters (lists and mappings as JSON)."""
    def flat(values: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in values.items():
            if isinstance(v, dict) and v and k not in ("options", "terms"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = json.dumps(v) if isinstance(v, (list, dict)) else v
        return out
    return flat(config_to_dict(cfg))


class TensorBoardLogger:
    """An epoch's numbers as TensorBoard scalars under ``out/tensorboard``."""

    def __init__(self, out: Path):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        for tag, v in epoch_numbers(record).items():
            self.writer.add_scalar(tag, v, record["epoch"])
        self.writer.flush()

    def finish(self, results: dict, out: Path) -> None:
        self.writer.close()

    def close(self, failed: bool) -> None:
        self.writer.close()  # (closing twice is harmless)


def _artifacts(out: Path) -> list[Path]:
    student = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
    return [p for p in (out / "results.json", out / "metrics.jsonl", out / "config.yaml", student) if p.is_file()]


def _final_numbers(results: dict) -> dict[str, float]:
    final = results.get("final") or {}
    return {**numbers("final/test", final.get("test") or {}), **numbers("final/val", final.get("val") or {})}


class MLflowLogger:
    """A run of the experiment ``tracking_project`` in MLflow's store (its client API: no
    global state, so that several runs of one process, a sweep's, stay apart)."""

    def __init__(self, cfg: RunConfig, out: Path, run_id: str | None):
        require("mlflow", "mlflow")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        if run_id is not None:  # a resume: the run it started
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        project = cfg.tracking_project
        found = self.client.get_experiment_by_name(project)
        store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None  # a local store: its
        artifacts = (Path(store).resolve().parent / "mlartifacts").as_uri() if store else None  # files beside it
        experiment = found.experiment_id if found is not None else self.client.create_experiment(
            project, artifact_location=artifacts)
        tags = {"jacmatch.out_dir": str(out.resolve()), **({"jacmatch.group": cfg.tracking_group}
                                                           if cfg.tracking_group else {})}
        self.run_id = self.client.create_run(experiment, run_name=out.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # (MLflow takes at most 100 parameters a call)
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("jacmatch.recipe", str(cfg.recipe))])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log(self, record: dict) -> None:
        self._metrics(epoch_numbers(record), record["epoch"])

    def finish(self, results: dict, out: Path) -> None:
        from mlflow.entities import RunTag
        self._metrics(_final_numbers(results), results.get("epochs", 0))
        tags = {f"provenance.{k}": str(v)[:5000] for k, v in (results.get("provenance") or {}).items()}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for path in _artifacts(out):
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self, failed: bool) -> None:
        if not getattr(self, "finished", False):
            self.client.set_terminated(self.run_id, "FAILED" if failed else "KILLED")


class WandbLogger:
    """A run of the W&B project ``tracking_project`` (group ``tracking_group``), its files
    under the run folder; offline when ``WANDB_MODE=offline``."""

    def __init__(self, cfg: RunConfig, out: Path, run_id: str | None):
        wandb = require("wandb", "wandb")
        self.wandb = wandb
        self.run_id = run_id or uuid.uuid4().hex[:12]  # (W&B takes any id of letters and digits)
        try:
            self.run = wandb.init(project=cfg.tracking_project, group=cfg.tracking_group, name=out.name,
                                  id=self.run_id, resume="allow", dir=str(out), config=flat_config(cfg),
                                  reinit="create_new")
        except (wandb.errors.UsageError, wandb.errors.CommError) as exc:
            raise UsageError(f"W&B could not start the run ({str(exc).splitlines()[0]}): run `wandb login`, or set "
                             "WANDB_MODE=offline to log under the run folder and `wandb sync` it later") from None

    def log(self, record: dict) -> None:
        self.run.log(epoch_numbers(record), step=record["epoch"])

    def finish(self, results: dict, out: Path) -> None:
        self.run.summary.update({**_final_numbers(results), **{f"provenance/{k}": str(v) for k, v in
                                                               (results.get("provenance") or {}).items()}})
        artifact = self.wandb.Artifact(f"{out.name}-run", type="model")
        for path in _artifacts(out):
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)
        self.run.finish()
        self.finished = True

    def close(self, failed: bool) -> None:
        if not getattr(self, "finished", False):
            self.run.finish(exit_code=1 if failed else 0)


def open_loggers(cfg: RunConfig, out: Path, resume: bool) -> list:
    """The run's loggers (main process): TensorBoard when asked, then each tracker, continuing
    the tracked runs of ``out/tracking.json`` on a resume and recording new ones there."""
    loggers: list = [TensorBoardLogger(out)] if cfg.tensorboard else []
    if not cfg.tracking:
        return loggers
    path = out / TRACKING_FILE
    ids = json.loads(path.read_text()) if resume and path.is_file() else {}
    kinds = {"mlflow": MLflowLogger, "wandb": WandbLogger}
    try:
        for name in cfg.tracking:
            tracker = kinds[name](cfg, out, ids.get(name))
            ids[name] = tracker.run_id
            loggers.append(tracker)
        write_json_atomic(path, ids)
    except BaseException:  # a tracker that could not start: those started end failed, not left running
        close_loggers(loggers, failed=True)
        raise
    return loggers


def close_loggers(loggers: list, failed: bool) -> None:
    """End every logger of a run that stopped before its results (``failed``: an error, not a
    signal's stop, which a resume continues)."""
    for logger in loggers:
        logger.close(failed=failed)
