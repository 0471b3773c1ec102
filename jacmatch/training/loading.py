"""Loading models: a student built from its config, a teacher from a checkpoint or a
plain state_dict, a fine-tune's start from another run, and the one-line refusals of a
model that cannot take the data's inputs or a teacher that does not fit its student."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..data import DataSplits
from ..data import load_data as _load_data
from ..models import ExternalClassifier, create_model, dry_forward, input_side, is_import_path
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig
from .distributed import DistInfo, resolve_device

__all__ = ["load_model", "model_from_config", "check_input_shape", "check_teacher_for", "load_teacher", "init_from",
           "load_data"]


def load_data(cfg: RunConfig, cache: dict | None = None) -> DataSplits:
    """The data a run of ``cfg`` reads (:func:`jacmatch.data.load_data` of ``cfg.data``
    with the run's seed). ``cache``: the caller's, to keep a built-in data set's files
    parsed between runs."""
    device = resolve_device(cfg.device, DistInfo()) if cfg.device != "cpu" else torch.device("cpu")
    return _load_data(cfg.data, seed=cfg.seed, pin_memory=device.type == "cuda", cache=cache)


def load_model(path: str | Path, device="cpu", *, trust: str | None = None) -> tuple[nn.Module, dict]:
    """A model from a checkpoint (architecture and weights), and the checkpoint's state.

    A model built from an import path (``package.module:callable``) is rebuilt only when
    ``trust`` names that same path: loading it imports and runs that code."""
    state = load_checkpoint(path, map_location=device)
    arch = state.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise CheckpointError(f"{path} holds no model architecture: is it a jacmatch run checkpoint?")
    if is_import_path(str(arch["name"])) and trust != arch["name"]:
        raise CheckpointError(f"{path} was built by the import path {arch['name']!r}, which loading would import "
                              f"and run: pass --model {arch['name']} (--teacher-model for a teacher) to trust it")
    options = {k: v for k, v in arch.items() if k not in ("name", "num_classes", "in_channels")}
    model = create_model(arch["name"], arch["num_classes"], arch["in_channels"], **options)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit {arch['name']} ({str(exc).splitlines()[0]})") from None
    return model.to(device), state


def model_from_config(mc, num_classes: int, data: DataSplits) -> nn.Module:
    """``cfg.model`` (or ``cfg.teacher_model``) built for ``data``'s channels and pixel statistics."""
    return create_model(mc.name, num_classes, data.in_channels, mean=data.mean, std=data.std, output=mc.output,
                        normalize=mc.normalize, replace_hard_activations=mc.replace_hard_activations,
                        math_attention=mc.math_attention, **mc.options)


def check_input_shape(model: nn.Module, data: DataSplits, name: str, key: str) -> int:
    """One dry forward pass of a zero sample of the data set's shape; returns the number
    of outputs. A model that cannot take the shape is refused in one line that says the
    smallest input it takes."""
    shape = tuple(data.train.sample_shape)
    out = dry_forward(model, shape)
    if out is None:
        side, only = input_side(model, shape[0])
        c = shape[0]
        hint = (f"it takes no {c}-channel square input of the usual sizes; choose another model or data set"
                if side is None else
                f"it takes {c}x{side}x{side} only: resize the images with --image-size {side} "
                f"(data.image_size), or choose another model" if only else
                f"its smallest input is {c}x{side}x{side}; choose another model or data set"
                + (f", or resize the images with --image-size {side} (data.image_size)"
                   if data.train.sample_shape[1] < side else ""))
        raise ConfigError(f"{key} {name!r} cannot take {data.name} inputs of shape {'x'.join(map(str, shape))}: "
                          f"{hint}")
    return int(out.shape[-1])


def check_teacher_for(teacher: nn.Module, teacher_state: dict, student_outputs: int, data: DataSplits,
                      student_state: dict, name: str) -> str | None:
    """A teacher beside a student on ``data`` (``jacmatch evaluate``): refused (one line)
    unless it takes the data's inputs and has the student's number of outputs. Returns a
    warning when it was trained on other data, which may be a deliberate transfer."""
    outputs = check_input_shape(teacher, data, name, "teacher")
    if outputs != student_outputs:
        raise ConfigError(f"class-count mismatch: the teacher {name} has {outputs} outputs, the student "
                          f"{student_outputs}; the Jacobian cosine compares outputs one to one (use the "
                          "student's teacher)")

    def trained_on(state: dict) -> tuple:
        d = json.loads(state["config"])["data"] if "config" in state else {}
        digest = (state.get("inputs") or {}).get("data_sha256")
        return d.get("name"), d.get("classes"), digest
    (t_name, t_classes, t_hash), (s_name, s_classes, s_hash) = trained_on(teacher_state), trained_on(student_state)
    if (t_name, t_classes) != (s_name, s_classes) or (t_hash and s_hash and t_hash != s_hash):
        return (f"the teacher {name} was trained on {t_name}" + (f" classes {t_classes}" if t_classes else "")
                + (f" (data {t_hash[:12]})" if t_hash else "") + f", the student on {s_name}"
                + (f" classes {s_classes}" if s_classes else "") + (f" (data {s_hash[:12]})" if s_hash else "")
                + ": fine for a deliberate transfer, otherwise pass the student's teacher")
    return None


def load_teacher(cfg: RunConfig, data: DataSplits, device) -> nn.Module | None:
    """The frozen teacher: a jacmatch checkpoint, or ``teacher_model`` with a plain state_dict."""
    if cfg.teacher:
        teacher, _ = load_model(cfg.teacher, device, trust=cfg.teacher_model.name or None)
    elif cfg.teacher_weights:
        mc = cfg.teacher_model
        teacher = model_from_config(mc, mc.num_classes or data.num_classes, data).to(device)
        _load_state_dict(teacher, cfg.teacher_weights, device)
    else:
        return None
    outputs = check_input_shape(teacher, data, cfg.teacher_model.name or cfg.teacher, "teacher")
    if cfg.objective.compares_outputs and outputs != data.num_classes:
        raise ConfigError(f"class-count mismatch: the teacher has {outputs} outputs but {data.name} has "
                          f"{data.num_classes} classes here; KD and Jacobian matching compare outputs one to one "
                          "(use a teacher trained on these classes)")
    return teacher


def _load_state_dict(model: nn.Module, path: str, device) -> None:
    """Weights from a plain ``state_dict`` file (``torch.load(weights_only=True)``)."""
    if not Path(path).is_file():
        raise ConfigError(f"teacher weights {path} do not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"teacher weights {path} could not be read as a state_dict "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"teacher weights {path} hold a {type(state).__name__}, not a state_dict")
    target = model.net if isinstance(model, ExternalClassifier) else model
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"teacher weights {path} do not fit {model.arch['name']}: "
                          f"{str(exc).splitlines()[-1].strip()[:300]}") from None
    missing = [k for k in result.missing_keys if k not in ("mean", "std")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"teacher weights {path} do not fit {model.arch['name']}: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")


def init_from(model: nn.Module, path: str, device) -> None:
    """Copy the weights whose names and shapes fit (fine-tuning: a new classifier head
    keeps its fresh initialisation); at least one tensor must fit."""
    source = load_checkpoint(path, map_location=device)["model"]
    own = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and k not in ("mean", "std")}
    if not fitting:
        raise CheckpointError(f"init_from {path}: no weight fits {model.arch['name']}")
    model.load_state_dict(fitting, strict=False)
