"""Run configuration: defaults in dataclasses, a YAML file says only what differs,
``--set section.key=value`` overrides on the command line. The resolved config is saved
with every run and inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.objective import ObjectiveConfig
from ..data.config import DataConfig
from ..errors import UsageError, check_once, check_range

__all__ = ["RunConfig", "ModelConfig", "OptimConfig", "EvalConfig", "ConfigError",
           "load_config", "apply_overrides", "config_to_dict", "config_from_dict", "merge_values", "resolve"]

#: Checked before any work starts (clear errors rather than out-of-memory crashes).
MAX_BATCH_SIZE = 65_536
MAX_EPOCHS = 100_000
#: A config file, and what its aliases expand to, may not be larger (bytes of scalars).
MAX_CONFIG_BYTES = 1 << 20


#: A config file or setting that cannot be used: the one type of a user's error (its old name).
ConfigError = UsageError


@dataclass
class ModelConfig:
    name: str = "small_cnn_16"    # a registered name, package.module:callable, torchvision:NAME or timm:NAME
    options: dict = field(default_factory=dict)   # the factory's keyword arguments, e.g. {width: 8}
    output: Any = None            # which part of a tuple/dict/object output holds the logits (key or index)
    normalize: bool = True        # the model normalises [0, 1] pixels with the data set's mean and std
    replace_hard_activations: bool = False  # Hardsigmoid/Hardswish -> twice-differentiable equivalents
    math_attention: bool = False  # attention always on the math kernel (a Jacobian term's student step uses it anyway)
    num_classes: int | None = None  # outputs of a teacher built from --teacher-weights (default: the data set's)


@dataclass
class OptimConfig:
    name: str = "sgd"            # sgd | adam
    lr: float = 0.05             # learning rate
    momentum: float = 0.9        # SGD momentum
    weight_decay: float = 5e-4   # L2 weight decay
    nesterov: bool = False       # Nesterov momentum (SGD)
    schedule: str = "cosine"     # cosine | step | constant
    milestones: list = field(default_factory=list)  # epochs, for step
    lr_decay: float = 0.1        # factor at each milestone (step schedule)
    epochs: int = 10             # training epochs (at most: optim.max_steps and eval.patience may end the run before)
    max_steps: int = 0           # at most this many optimizer steps, in whole epochs (0: optim.epochs alone bounds the run)
    batch_size: int = 64         # global batch (shared by DDP processes)
    min_steps_per_epoch: int = 1  # few-sample sets: repeat the data so an epoch has this many steps


@dataclass
class EvalConfig:
    every: int = 1                # evaluate each N epochs (and always after the last)
    test_each_time: bool = False  # the test set (noise, cosine) at every evaluation, not only after the last epoch
    noise_sigmas: list = field(default_factory=lambda: [0.1, 0.3])  # in [0, 1] pixel units
    noise_seed: int = 0           # seeds the test noise (the same for every model)
    jacobian_cosine: bool = True  # mean teacher/student cosine on (a part of) the test set
    cosine_samples: int = 1000    # test samples for the Jacobian cosine
    fidelity: bool = True         # beside a teacher: top-1 agreement and KL(teacher ‖ student), clean, noisy, interpolated
    interpolations: int = 1000    # fidelity's points between pairs of test images (fixed by interpolation_seed)
    interpolation_seed: int = 0   # seeds those pairs and mixing weights (the same for every model)
    batch_size: int = 500         # evaluation batch
    keep_best: bool = False       # keep the weights of the best validation accuracy (best.pt); test those at the end
    patience: int = 0             # with keep_best: stop after this many evaluations without a better one (0: never)
    min_delta: float = 0.0        # with keep_best: better means a validation accuracy above the best by more than this


@dataclass
class DDPConfig:
    sync_batchnorm: bool = False  # BatchNorm over the global batch of all processes (GlobalBatchNorm)


@dataclass
class RunConfig:
    """One training run: a teacher (``teacher=None``) or a student distilled from one."""

    out_dir: str = "runs/run"      # output folder: config, metrics, checkpoints, results
    seed: int = 0                 # seeds the weights, the data order and every random draw
    device: str = "auto"          # cpu | cuda | auto
    data: DataConfig = field(default_factory=DataConfig)  # the data set
    model: ModelConfig = field(default_factory=ModelConfig)  # the model trained (the student)
    teacher: str | None = None    # path of a teacher checkpoint (distillation)
    teacher_model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))  # with teacher_weights
    teacher_weights: str | None = None  # a plain state_dict file for teacher_model (weights_only load)
    init_from: str | None = None  # start from a checkpoint's weights (those whose shapes fit)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the loss terms and weights
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser and schedule
    eval: EvalConfig = field(default_factory=EvalConfig)  # what evaluation measures
    ddp: DDPConfig = field(default_factory=DDPConfig)  # multi-process training (torchrun)
    teacher_cache: bool = True    # compute the teacher once per sample when inputs are fixed
    nonfinite: str = "stop"       # stop | skip: what a NaN/Inf loss or gradient does
    skip_limit: int = 20          # nonfinite=skip stops (exit 3) past this many skipped steps in a row, or a whole epoch
    amp: str = "none"             # none | bf16 | fp16 (with a gradient scaler: an overflow skips that step)
    channels_last: bool = False   # the student's weights channels-last: faster small CNNs on CPU (jacmatch bench)
    progress: bool = True         # a progress bar on the terminal
    tensorboard: bool = False     # TensorBoard logs under out_dir/tensorboard (extra: jacmatch[tensorboard])
    tracking: list = field(default_factory=list)  # mlflow, wandb: config, metrics, results and student there (extras)
    tracking_uri: str | None = None  # MLflow's store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)
    tracking_project: str = "jacmatch"  # the MLflow experiment, the W&B project
    tracking_group: str | None = None  # a group of runs (jacmatch tune: its study); an MLflow tag, the W&B group
    checkpoint_every: int = 1     # write last.pt every N epochs (and after the last)
    time_budget: float = 0.0      # minutes of training: the run stops at the end of the epoch that passes them (0: none)
    recipe: str | None = None     # the recipe these settings start from (`jacmatch config --recipes`); auto records its choice
    recipe_reason: str | None = None  # why the recipe was chosen (auto's rule and the training set's n)

    def check(self) -> None:
        """Every setting, in one line each, before any work. A config is checked once for
        its values: checked again unchanged (the CLI resolves it, then trains), it returns at once."""
        check_once(self, self._check)

    def _check(self) -> None:
        o = self.optim
        if o.name not in ("sgd", "adam"):
            raise ConfigError(f"optim.name must be sgd or adam, got {o.name!r}")
        if o.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, step or constant, got {o.schedule!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        for key, spec in _LIST_ELEMENTS.items():  # (again here: a list may have changed in place since it was built)
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if value is None and key == "data.classes":  # (all classes)
                continue
            if not isinstance(value, list):
                raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
            _check_elements(key, value, *spec)
        check_noise_sigmas(self.eval.noise_sigmas)
        _check_ranges(self)
        unknown = [t for t in self.tracking if t not in ("mlflow", "wandb")]
        if unknown:
            raise ConfigError(f"tracking takes mlflow and wandb, got {unknown}: e.g. --set 'tracking=[mlflow]'")
        e = self.eval
        if not e.keep_best and (e.patience or e.min_delta):
            raise ConfigError(f"eval.patience ({e.patience}) and eval.min_delta ({e.min_delta:g}) act on the best "
                              "validation accuracy, which eval.keep_best=false does not keep: set eval.keep_best=true, "
                              "or leave them at 0")
        self.data.check()
        self.objective.check()
        if self.objective.needs_teacher and not (self.teacher or self.teacher_weights):
            o = self.objective
            raise ConfigError(f"this objective needs a teacher (β = {o.beta:g}, γ = {o.gamma:g}, δ = {o.delta:g}; the "
                              "defaults distil with β = 1, γ = 10): pass --teacher CKPT, or --teacher-model SPEC "
                              "--teacher-weights FILE; to train a teacher (CE only) set objective.beta=0 and "
                              "objective.gamma=0, as `jacmatch train-teacher` does")
        if self.teacher and self.teacher_weights:
            raise ConfigError("give either --teacher CKPT or --teacher-weights FILE, not both")
        if self.teacher_weights and not self.teacher_model.name:
            raise ConfigError("--teacher-weights needs --teacher-model SPEC: the architecture the weights fit")


def check_noise_sigmas(sigmas) -> None:
    """Test noise levels: finite numbers >= 0 (eval.noise_sigmas, `jacmatch evaluate --noise-sigmas`)."""
    if not isinstance(sigmas, list) or any(
            not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s < float("inf") for s in sigmas):
        raise ConfigError(f"eval.noise_sigmas must be finite numbers >= 0, got {sigmas}")


def _check_ranges(cfg: RunConfig) -> None:
    """The run's numeric settings: finite and in range (the objective's are its own check's)."""
    o, e = cfg.optim, cfg.eval
    for key, value, low, high, low_open, optional in (
            ("seed", cfg.seed, 0, 2**63 - 1, False, False),
            ("optim.batch_size", o.batch_size, 1, MAX_BATCH_SIZE, False, False),
            ("optim.epochs", o.epochs, 1, MAX_EPOCHS, False, False),
            ("optim.lr", o.lr, 0, 1e3, True, False),
            ("optim.momentum", o.momentum, 0, 1, False, False),
            ("optim.weight_decay", o.weight_decay, 0, 1e3, False, False),
            ("optim.lr_decay", o.lr_decay, 0, 1, True, False),
            ("optim.min_steps_per_epoch", o.min_steps_per_epoch, 1, 1e7, False, False),
            ("optim.max_steps", o.max_steps, 0, 1e12, False, False),
            ("time_budget", cfg.time_budget, 0, 1e7, False, False),
            ("eval.cosine_samples", e.cosine_samples, 0, 1e9, False, False),
            ("eval.interpolations", e.interpolations, 0, 1e9, False, False),
            ("eval.interpolation_seed", e.interpolation_seed, 0, 2**63 - 1, False, False),
            ("eval.batch_size", e.batch_size, 1, MAX_BATCH_SIZE, False, False),
            ("eval.every", e.every, 1, MAX_EPOCHS, False, False),
            ("eval.patience", e.patience, 0, MAX_EPOCHS, False, False),
            ("eval.min_delta", e.min_delta, 0, 1, False, False),
            ("checkpoint_every", cfg.checkpoint_every, 1, MAX_EPOCHS, False, False),
            ("skip_limit", cfg.skip_limit, 0, 1e9, False, False),
            ("model.num_classes", cfg.model.num_classes, 1, 1e7, False, True),
            ("teacher_model.num_classes", cfg.teacher_model.num_classes, 1, 1e7, False, True)):
        check_range(key, value, low, high, low_open=low_open, optional=optional)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"unknown config key {f'{where}{key}'!r}: known keys are {sorted(fields)}")
        sub = _dataclass_type(cls, key)
        kwargs[key] = _build(sub, value, f"{where}{key}.") if sub is not None \
            else _typed(fields[key], value, where + key)
    return cls(**kwargs)


#: The type of a setting whose default is None, read from its annotation ("int | None").
_OPTIONAL_TYPES = {"str | None": str, "int | None": int, "list | None": list}


def _typed(f: dataclasses.Field, value, key: str):
    """Check a value against its default's type (an int may stand for a float); a
    setting whose default is None against its annotation; list elements too."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if default is None:
        kind = _OPTIONAL_TYPES.get(str(f.type))
        if value is None or kind is None:
            return value
        default = kind()
    if value is None:
        raise ConfigError(f"config key {key!r} must be a {type(default).__name__}, got null (an empty value)")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key {key!r} must be a {type(default).__name__}, got {value!r}")
    if isinstance(value, list) and key in _LIST_ELEMENTS:
        _check_elements(key, value, *_LIST_ELEMENTS[key])
    return value


#: What the elements of a list setting must be: (type, a description, distinct).
_LIST_ELEMENTS = {
    "data.classes": (int, "class indices (integers >= 0)", True),
    "optim.milestones": (int, "epochs (integers >= 0)", False),
    "eval.noise_sigmas": (float, "numbers", False),
    "objective.at_layers": (str, "'student_module:teacher_module' strings", False),
    "tracking": (str, "trackers (mlflow, wandb)", True),
}


def _check_elements(key: str, values: list, kind: type, what: str, distinct: bool) -> None:
    for i, v in enumerate(values):
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) if kind is int else \
            numeric if kind is float else isinstance(v, kind)
        if not ok:
            raise ConfigError(f"config key {key!r} must be a list of {what}; element {i} is {v!r}")
    if distinct and len(set(values)) != len(values):
        raise ConfigError(f"config key {key!r} must list distinct {what}, got {values!r}")


def _dataclass_type(cls, key):
    default = next(f for f in dataclasses.fields(cls) if f.name == key)
    if default.default_factory is not dataclasses.MISSING:
        made = default.default_factory()
        if dataclasses.is_dataclass(made):
            return type(made)
    return None


def config_from_dict(values: dict) -> RunConfig:
    return _build(RunConfig, values or {}, "")


#: The configs shipped with the package (``jacmatch config --list-files``).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> list[str]:
    """The names of the shipped configs, e.g. ``paper/distill``, ``cifar/wrn_40_2_wrn_16_2``."""
    return sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.glob("*/*.yaml"))


def find_config(path: str) -> Path:
    """A config file: a path, or the name of a shipped config (``paper/distill``; a
    leading ``configs/`` and the ``.yaml`` may be given)."""
    p = Path(path)
    if p.is_file():
        return p
    name = path[len("configs/"):] if path.startswith("configs/") else path
    shipped = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file() and ".." not in Path(name).parts:
        return shipped
    raise ConfigError(f"config file {path} does not exist (nor a shipped config of that name: "
                      f"{', '.join(packaged_configs())})")


class _StrictLoader(yaml.SafeLoader):
    """``safe_load`` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"duplicate key {key!r} on lines {seen[key]} and {line}: keep one "
                                      "(YAML would silently use the last)")
                seen[key] = line
            except TypeError:  # an unhashable key: the constructor below says so
                continue
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict) -> int:
    """Bytes of scalars a YAML node stands for once every alias is expanded. Aliases are
    the same node object, so each node is sized once: time and memory follow the file's
    size, not the expansion's ("billion laughs")."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.ScalarNode):
        size = len(node.value) + 1
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    else:
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = size
    return size


def parse_yaml(text: str, where: str):
    """YAML text as plain data: safe types only, no duplicate keys, expansion bounded."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} expands (through its aliases) past {MAX_CONFIG_BYTES >> 20} MiB: "
                              "not a config; write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def load_config(path: str | None) -> dict:
    """A YAML file (or a shipped config's name) as a nested dict (empty without a path)."""
    if path is None:
        return {}
    p = find_config(path)
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than 1 MiB: not a config")
    try:
        values = parse_yaml(p.read_text(encoding="utf-8"), f"config file {path}")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings at the top")
    return values


def apply_overrides(values: dict, overrides: list) -> dict:
    """``section.key=value`` strings, values parsed as YAML (numbers, lists, true/false,
    null), or ``(key, value)`` pairs taken as they are (a command-line path stays the
    string it was typed as). A mapping merges into the section it names, key by key."""
    values = dict(values)
    for item in overrides or []:
        if isinstance(item, tuple):
            key, value = item
        elif "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        else:
            key, raw = item.split("=", 1)
            try:
                value = parse_yaml(raw, f"--set {key}")
            except yaml.YAMLError:
                value = raw
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        held = node.get(parts[-1])  # a mapping merges into its section, as a config file's does
        node[parts[-1]] = merge_values(held, value) if isinstance(value, dict) and isinstance(held, dict) else value
    return values


def resolve(path: str | None, overrides: list, base: dict | None = None) -> RunConfig:
    """Defaults ← ``base`` ← YAML file ← ``--set`` overrides; checked."""
    return resolve_values(load_config(path), overrides, base)


def resolve_values(file_values: dict, overrides: list, base: dict | None = None, check: bool = True) -> RunConfig:
    """:func:`resolve` of a config file's values already read; checked unless ``check`` is False.
    A file's ``recipe: none`` (a complete protocol of its own) is recorded as no recipe."""
    if file_values.get("recipe") == "none":
        file_values = {**file_values, "recipe": None}
    cfg = config_from_dict(apply_overrides(merge_values(base or {}, file_values), overrides))
    if check:
        cfg.check()
    return cfg


def merge_values(a: dict, b: dict) -> dict:
    """``b`` over ``a``, recursively for nested mappings: a new mapping that shares nothing
    mutable with either (a caller that changes it changes neither, e.g. a recipe's values)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def config_keys(obj: Any = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every ``--set`` key: (key, type, default, meaning). The meaning is the comment
    beside the field in its dataclass, so it lives in one place."""
    import inspect
    import re
    obj = RunConfig() if obj is None else obj
    meanings = dict(re.findall(r"^\s+(\w+): [^\n]*?#\s*(.*)$", inspect.getsource(type(obj)), re.M))
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_keys(value, f"{prefix}{f.name}.")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((prefix + f.name, kind, value, meanings.get(f.name, "")))
    return rows
