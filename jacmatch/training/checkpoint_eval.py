"""A checkpoint evaluated on the data it was trained on, or on data named instead: what
``jacmatch evaluate`` runs, for any caller (a notebook, an integration). The data are read
as the checkpoint records them (every source option, the whole training pool); a change in
their contents since training is refused unless allowed, and both hashes are recorded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..atomic import write_json_atomic
from ..data import dataset_kind, dataset_name
from .config import ConfigError, RunConfig, config_from_dict
from .distributed import DistInfo, resolve_device
from .evaluate import evaluate
from .loading import check_input_shape, check_teacher_for, load_data, load_model
from .run_folder import check_spared, data_reads

__all__ = ["DataMismatchWarning", "recorded_data_config", "evaluate_checkpoint"]


class DataMismatchWarning(UserWarning):
    """A teacher trained on other data than the student it is evaluated beside."""


def recorded_data_config(state: dict, checkpoint: str, dataset: str | None = None,
                         data_dir: str | None = None) -> RunConfig:
    """The config of the data a checkpoint was trained on, as it records it (every source
    option included), the whole training pool; ``dataset``/``data_dir`` replace the recorded
    ones. A data set built by an import path is imported only when ``dataset`` names that
    same path (as for models)."""
    cfg = config_from_dict(json.loads(state["config"]))
    recorded = cfg.data.name
    if dataset:
        cfg.data.name = dataset_name(dataset)
        if cfg.data.name != recorded and not data_dir:
            cfg.data.data_dir = None
    if data_dir:
        cfg.data.data_dir = data_dir
    if dataset_kind(cfg.data.name)[0] == "import" and cfg.data.name == recorded and dataset != recorded:
        raise ConfigError(f"{checkpoint} was trained on the data set {recorded!r}, which evaluating would "
                          f"import and run: pass --dataset {recorded} to trust it")
    cfg.data.samples_per_class = None
    return cfg


def evaluate_checkpoint(checkpoint: str, *, dataset: str | None = None, data_dir: str | None = None,
                        teacher: str | None = None, model: str | None = None, teacher_model: str | None = None,
                        device: str = "auto", noise_sigmas=(0.1, 0.3), data_changed: bool = False,
                        json_out: str | None = None) -> dict:
    """Test accuracy (clean and under ``noise_sigmas``), beside ``teacher`` its fidelity and
    the Jacobian cosine, of ``checkpoint``. ``model``/``teacher_model``: the import path a
    checkpoint's model was built from, given to trust it. ``json_out``: also written there
    (refused before anything is read if it would write over what this reads, or a run's files)."""
    run_device = resolve_device(device, DistInfo())
    net, state = load_model(checkpoint, run_device, trust=model)
    data_config = recorded_data_config(state, checkpoint, dataset, data_dir)
    if json_out:
        check_spared([("--json", Path(json_out), False)],
                     [("the checkpoint", Path(checkpoint))] + ([("the teacher", Path(teacher))] if teacher else [])
                     + data_reads(data_config.data))
    data = load_data(data_config)
    trained_on = (state.get("inputs") or {}).get("data_sha256")
    if trained_on and trained_on != data.data_sha256 and not (dataset or data_dir) and not data_changed:
        raise ConfigError(f"the data {data.name} has changed since {checkpoint} was trained (SHA-256 "
                          f"{data.data_sha256[:12]}…, trained on {trained_on[:12]}…): its test set may now hold training "
                          "images; restore the data, or pass --data-changed to evaluate on it as it is (the output "
                          "records both hashes)")
    outputs = check_input_shape(net, data, checkpoint, "the checkpoint's model")
    if outputs != data.num_classes:
        raise ConfigError(f"class-count mismatch: {checkpoint} has {outputs} outputs but {data.name} has "
                          f"{data.num_classes} classes here: evaluate it on the data it was trained for")
    beside = None
    if teacher:
        beside, teacher_state = load_model(teacher, run_device, trust=teacher_model)
        note = check_teacher_for(beside, teacher_state, outputs, data, state, teacher)
        if note:
            warnings.warn(note, DataMismatchWarning, stacklevel=2)
    result = evaluate(net, data.test, run_device, noise_sigmas=noise_sigmas, teacher=beside)
    result["data_sha256"] = data.data_sha256
    if trained_on and trained_on != data.data_sha256:  # other data, named by dataset or allowed by data_changed
        result["trained_on_data_sha256"] = trained_on
    if json_out:
        write_json_atomic(json_out, result)
    return result
