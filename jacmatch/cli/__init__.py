"""The command line: ``jacmatch {demo,train-teacher,distill,evaluate,check-model,config,verify,
bench,experiment,report,compat}``.

Every command is a thin layer over a function of :mod:`jacmatch.experiments` or
:mod:`jacmatch.training`. A user error (bad file, unknown name, bad setting, a missing
optional dependency, a model that cannot run: :class:`~jacmatch.errors.UsageError`) ends in one
line on stderr and exit code 2, never a traceback; any other exception is a bug of jacmatch's
and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .. import __version__
from .._extras import MissingExtra
from ..core.objective import TEACHER_OBJECTIVE, ObjectiveConfig
from ..errors import UsageError
from ..training import ConfigError, resolve
from ..training.config import EvalConfig
from ..training.provenance import git_commit
from ..training.epoch import Preempted
from ..training.recipes import FEW_SAMPLES, list_recipes, resolve_recipe, rule
from .args import non_negative_float, non_negative_int, positive_float, positive_int, shape_arg, sigma_arg
from .experiments import add_experiment_commands, add_measurement_commands

EXIT_USAGE = 2
EXIT_IO = 1
EXIT_NONFINITE = 3
EXIT_INCOMPATIBLE = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; --resume continues
EXIT_TERMINATED = 143  # 128 + SIGTERM, outside training: every file written so far is complete


class DataMismatchWarning(UserWarning):
    """A teacher trained on other data than the student it is evaluated beside."""


class Terminated(BaseException):
    """SIGTERM outside a training loop (which checkpoints and exits 75 instead)."""


_MAIN_PID = os.getpid()


def _terminate(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked DataLoader worker: die as it would have before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated()

#: What `jacmatch evaluate` measures under noise unless told: a run's own default (eval.noise_sigmas).
NOISE_SIGMAS = EvalConfig().noise_sigmas


def _objective_text(o: dict) -> str:
    return (f"{o['alpha']:g}·CE + {o['beta']:g}·KD (τ = {o['temperature']:g}) + {o['gamma']:g}·JM "
            f"({o['jm_form']}, {o['jm_outputs']})")


# ---- training commands ----------------------------------------------------------------


def _add_run_options(p, kind: str) -> None:
    p.add_argument("--config", metavar="YAML",
                   help="a YAML file, or a shipped config by name (paper/distill, cifar/wrn_40_2_wrn_16_2; "
                        "`jacmatch config --files`); it says only what differs from the defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a setting, e.g. --set optim.epochs=20 --set objective.gamma=0.5 "
                        "(every key: `jacmatch config --list`)")
    p.add_argument("--out", metavar="DIR", help="output folder: config, metrics, checkpoints, results")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its checkpoint, config, metrics and results)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where to train (default: auto)")
    p.add_argument("--dataset", help="data set: a built-in name (fashion-mnist, mnist, cifar10, cifar100, digits, "
                                     "synthetic) is always that data set; npz:PATH, hf:PATH, imagefolder:PATH and "
                                     "package.module:callable are those sources; any other name is a path (a folder "
                                     "of class subfolders, an .npz file). A built-in name that is also a path here is "
                                     "refused: write ./NAME for the folder")
    p.add_argument("--data-dir", help="folder with a built-in data set's files (fashion-mnist, mnist, cifar10, cifar100)")
    p.add_argument("--image-size", type=positive_int, help="resize the images of a folder or source to this side")
    p.add_argument("--channels", type=int, choices=[1, 3], help="1 (grey) or 3 (RGB) for the images of a source")
    p.add_argument("--mixup", type=non_negative_float, metavar="ALPHA",
                   help="mixup with Beta(α, α) weights (data.mixup; the teacher sees the mixed view)")
    p.add_argument("--cutmix", type=non_negative_float, metavar="ALPHA", help="CutMix with Beta(α, α) (data.cutmix)")
    p.add_argument("--label-column", help="hf:PATH: the column holding the labels (default label)")
    p.add_argument("--model", metavar="SPEC",
                   help="model: a built-in name (jacmatch.models.list_models()), package.module:callable, "
                        "torchvision:NAME or timm:NAME")
    p.add_argument("--seed", type=non_negative_int, help="seeds the weights, data order and every draw (default 0)")
    p.add_argument("--time-budget", type=positive_float, metavar="MINUTES",
                   help="stop training at the end of the epoch that passes this many minutes (time_budget); "
                        "with eval.keep_best the best weights are tested")
    if kind == "distill":
        p.add_argument("--recipe", choices=list_recipes(), metavar="NAME",
                       help=f"the settings a student starts from, under --config and --set: {', '.join(list_recipes())} "
                            "(`jacmatch config --recipes`; default: the config file's recipe, else auto). auto: "
                            + rule().replace("%", "%%") + "; none: jacmatch's defaults alone")
        p.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (written by train-teacher)")
        p.add_argument("--teacher-model", metavar="SPEC",
                       help="the teacher's architecture, with --teacher-weights (same forms as --model)")
        p.add_argument("--teacher-weights", metavar="FILE",
                       help="a plain state_dict file for --teacher-model (loaded with weights_only=True)")
        p.add_argument("--samples-per-class", type=positive_int, help="few-sample training set: n samples per class")


def _dataset_name(value: str) -> str:
    """``--dataset`` as recorded: a built-in or import path as given; a folder, .npz or
    Hugging Face folder as its absolute path with its kind (``imagefolder:/abs/path``), so
    that the run, its resume and ``evaluate`` read it from any working directory."""
    from ..data import dataset_kind
    from ..data.formats import user_path
    kind, arg = dataset_kind(value)
    if kind in ("builtin", "import"):
        return value
    return f"{kind}:{os.path.abspath(user_path(arg))}"


def _overrides(args) -> list:
    """The options as ``(key, value)`` pairs (taken as typed, not re-parsed), then ``--set``."""
    sets: list = []
    if getattr(args, "dataset", None):
        args.dataset = _dataset_name(args.dataset)
    for flag, key in (("out", "out_dir"), ("device", "device"), ("dataset", "data.name"),
                      ("data_dir", "data.data_dir"), ("model", "model.name"), ("seed", "seed"),
                      ("teacher", "teacher"), ("teacher_model", "teacher_model.name"),
                      ("teacher_weights", "teacher_weights"), ("samples_per_class", "data.samples_per_class"),
                      ("image_size", "data.image_size"), ("channels", "data.channels"),
                      ("label_column", "data.label_column"), ("mixup", "data.mixup"), ("cutmix", "data.cutmix"),
                      ("time_budget", "time_budget")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append((key, value))
    return sets + list(args.set)


def _run_training(args, kind: str) -> None:
    from ..training import train
    from ..training.config import find_config
    from ..training.distributed import finish_distributed
    from ..training.step import NonFiniteError
    # a student from its recipe (auto: chosen from the training set); a teacher with CE only
    data_cache: dict = {}
    if args.resume and not args.config:  # a resume starts from the run's own config; the options change it
        from ..training.config import RunConfig
        own = Path(args.out or RunConfig().out_dir) / "config.yaml"
        args.config = str(own) if own.is_file() else None
    cfg = resolve_recipe(args.config, _overrides(args), args.recipe, data_cache) if kind == "distill" else \
        resolve(args.config, _overrides(args), {"objective": dict(TEACHER_OBJECTIVE)})
    if kind == "teacher" and (cfg.teacher or cfg.teacher_weights):
        raise ConfigError("train-teacher takes no --teacher; use distill")
    if kind == "distill" and not (cfg.teacher or cfg.teacher_weights):
        raise ConfigError("distill needs --teacher CKPT (a checkpoint written by train-teacher), or "
                          "--teacher-model SPEC --teacher-weights FILE")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if kind == "distill" and main_process:
        if cfg.recipe:
            print(f"recipe: {cfg.recipe}" + (f" ({cfg.recipe_reason})" if cfg.recipe_reason else ""), flush=True)
        o = cfg.objective
        print(f"objective: {_objective_text(vars(o))}" + (f" + {o.delta:g}·AT" if o.delta else "")
              + (f" + {o.penalty:g}·penalty" if o.penalty else ""), flush=True)
    if args.resume and args.overwrite:
        raise ConfigError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    config_file = str(find_config(args.config)) if args.config else None
    try:
        results = train(cfg, resume=args.resume, overwrite=args.overwrite, config_file=config_file,
                        data_cache=data_cache)
    except NonFiniteError as exc:
        print(f"jacmatch: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NONFINITE) from None
    finish_distributed()
    if not main_process:
        return
    test = results["final"]["test"] or {}
    print(f"{cfg.out_dir}: test accuracy {test.get('acc', float('nan')):.4f}"
          + "".join(f", σ={s}: {a:.4f}" for s, a in test.get("noisy_acc", {}).items())
          + (f", Jacobian cosine {test['jacobian_cosine']:.3f}" if "jacobian_cosine" in test else "")
          + (f"; no fidelity or Jacobian cosine: {test['teacher_not_compared']}" if "teacher_not_compared" in test
             else "")
          + f" (training {results['loop_seconds']:.1f} s, evaluation {results['eval_seconds']:.1f} s)")


def _tune(args) -> None:
    from ..training.tune import parse_space, space_of, tune
    if not args.out:
        raise ConfigError("tune needs --out DIR: the study's folder (its trials, database and best values)")
    if args.resume or args.overwrite:
        raise ConfigError("tune continues its study by itself: run the same command again (no --resume or --overwrite)")
    data_cache: dict = {}
    overrides = [item for item in _overrides(args)  # the study's folder and time budget are not a trial's
                 if not (isinstance(item, tuple) and item[0] in ("out_dir", "time_budget"))]
    cfg = resolve_recipe(args.config, overrides, args.recipe, data_cache)
    if not cfg.recipe:
        raise ConfigError("tune searches a recipe's space: give --recipe paper, kd, fm, fm+jm or auto, not none")
    space = space_of(cfg.recipe, parse_space(args.space))
    print(f"recipe: {cfg.recipe}" + (f" ({cfg.recipe_reason})" if cfg.recipe_reason else ""), flush=True)
    summary = tune(cfg, cfg.recipe, args.out, trials=args.trials, space=space, storage=args.storage,
                   study_name=args.study, minutes=args.time_budget or 0.0, heartbeat=args.heartbeat, seed=cfg.seed,
                   data_cache=data_cache)
    best = summary.get("best")
    print(f"{args.out}: {summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed trials"
          + (f"; best trial {best['number']}: validation {best['val_acc']:.4f} with "
             + ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
             + f" -> {args.out}/best.yaml" if best else ""))


def _evaluate(args) -> None:
    from ..atomic import write_json_atomic
    from ..training import evaluate, load_data, load_model
    from ..training.distributed import DistInfo, resolve_device
    from ..training.run_folder import check_spared, data_reads
    from ..training.loading import check_input_shape, check_teacher_for
    device = resolve_device(args.device, DistInfo())
    model, state = load_model(args.checkpoint, device, trust=args.model)
    data_config = _recorded_config(state, args)
    if args.json:  # before anything is written: never over what this command reads
        check_spared([("--json", Path(args.json), False)],
                     [("the checkpoint", Path(args.checkpoint))] + ([("the teacher", Path(args.teacher))]
                                                                  if args.teacher else []) + data_reads(data_config.data))
    data = load_data(data_config)
    trained_on = (state.get("inputs") or {}).get("data_sha256")
    changed = bool(trained_on) and trained_on != data.data_sha256 and not (args.dataset or args.data_dir)
    if changed and not args.data_changed:
        raise ConfigError(f"the data {data.name} has changed since {args.checkpoint} was trained (SHA-256 "
                          f"{data.data_sha256[:12]}…, trained on {trained_on[:12]}…): its test set may now hold training "
                          "images; restore the data, or pass --data-changed to evaluate on it as it is (the output "
                          "records both hashes)")
    outputs = check_input_shape(model, data, args.checkpoint, "the checkpoint's model")
    if outputs != data.num_classes:
        raise ConfigError(f"class-count mismatch: {args.checkpoint} has {outputs} outputs but {data.name} has "
                          f"{data.num_classes} classes here: evaluate it on the data it was trained for")
    teacher = None
    if args.teacher:
        teacher, teacher_state = load_model(args.teacher, device, trust=args.teacher_model)
        note = check_teacher_for(teacher, teacher_state, outputs, data, state, args.teacher)
        if note:
            warnings.warn(note, DataMismatchWarning, stacklevel=1)
    result = evaluate(model, data.test, device, noise_sigmas=args.noise_sigmas, teacher=teacher)
    result["data_sha256"] = data.data_sha256
    if trained_on and trained_on != data.data_sha256:  # other data, named by --dataset or allowed by --data-changed
        result["trained_on_data_sha256"] = trained_on
    print(json.dumps(result, indent=1))
    if args.json:
        write_json_atomic(args.json, result)


def _recorded_config(state: dict, args):
    """The config of the data a checkpoint was trained on, as it records it (every source
    option included), the whole training pool; ``--dataset``/``--data-dir`` replace the
    recorded ones. A data set built by an import path is imported only when ``--dataset``
    names that same path (as for models)."""
    from ..data import dataset_kind
    from ..training import config_from_dict
    cfg = config_from_dict(json.loads(state["config"]))
    recorded = cfg.data.name
    if args.dataset:
        cfg.data.name = _dataset_name(args.dataset)
        if cfg.data.name != recorded and not args.data_dir:
            cfg.data.data_dir = None
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    if dataset_kind(cfg.data.name)[0] == "import" and cfg.data.name == recorded and args.dataset != recorded:
        raise ConfigError(f"{args.checkpoint} was trained on the data set {recorded!r}, which evaluating would "
                          f"import and run: pass --dataset {recorded} to trust it")
    cfg.data.samples_per_class = None
    return cfg


def _check_model(args) -> int:
    from ..training.compat import check_model, describe
    from ..training.run_folder import check_spared, data_reads
    shape, num_classes = args.input_shape, args.num_classes
    cfg = resolve(None, [("data.name", _dataset_name(args.dataset)), ("data.val_size", 0)],
                  {"objective": dict(TEACHER_OBJECTIVE)}) if args.dataset else None  # the data only: no teacher
    if args.json:  # before anything is read or written
        check_spared([("--json", Path(args.json), False)], data_reads(cfg.data) if cfg else [])
    if cfg:  # the shape and class count of the data the model will train on
        from ..training import load_data
        data = load_data(cfg)
        shape, num_classes = tuple(data.train.sample_shape), data.num_classes
    options = {"output": args.output} if args.output is not None else {}
    result = check_model(args.spec, shape, num_classes, fix=args.fix, **options)
    print("\n".join(describe(result)))
    if args.json:
        from ..atomic import write_json_atomic
        write_json_atomic(args.json, result.to_dict())
    return 0 if result.student_ok or result.fix else EXIT_INCOMPATIBLE


def _config(args) -> None:
    from ..training.config import config_keys, packaged_configs
    if args.files:
        print("\n".join(packaged_configs()))
        return
    if args.recipes:
        from ..training.recipes import RECIPES, describe
        print("\n".join(describe(name) for name in RECIPES))
        print(f"auto   the default: {rule()}")
        print("none   no recipe: the config file and --set over jacmatch's defaults (`jacmatch config --list`)")
        return
    rows = config_keys()
    width = max(len(k) for k, *_ in rows)
    for key, kind, default, meaning in rows:
        print(f"{key:<{width}}  {kind:<10}  {json.dumps(default, ensure_ascii=False):<14}  {meaning}")


def add_training_commands(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a teacher with cross-entropy",
                       description="Train a model with cross-entropy on the full training set (minus validation): "
                    "objective.beta=0 and objective.gamma=0 under the config, which may set other terms.")
    _add_run_options(p, "teacher")
    p.set_defaults(run=lambda a: _run_training(a, "teacher"))

    p = sub.add_parser(
        "distill", help="distil a student from a teacher (default: the recipe auto chooses for the training set)",
        description=f"Train a student with α·CE + β·KD + γ·JM + δ·AT (+ λ·penalty), weights and settings under "
                    f"objective.* (docs/method.md), starting from a recipe (--recipe; `jacmatch config --recipes`). "
                    f"The default, auto, trains function matching with the Jacobian term (fm+jm) up to {FEW_SAMPLES} "
                    f"samples per class and the paper's CE+KD+JM (paper) above, each early-stopped on validation "
                    f"inside a maximum and tested with its best weights. --recipe none keeps jacmatch's dataclass "
                    f"defaults ({_objective_text(vars(ObjectiveConfig()))}, SGD) under --config and --set.")
    _add_run_options(p, "distill")
    p.set_defaults(run=lambda a: _run_training(a, "distill"))

    _add_tune_command(sub)

    p = sub.add_parser("evaluate", help="clean and noisy accuracy of a checkpoint",
                       description="Test accuracy of a checkpoint, clean and under Gaussian input noise "
                                   "(σ in [0, 1] pixel units); with --teacher, the Jacobian cosine too.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by jacmatch (last.pt)")
    p.add_argument("--teacher", help="teacher checkpoint, for the Jacobian cosine")
    p.add_argument("--model", metavar="SPEC", help="trust this import path when the checkpoint was built by one")
    p.add_argument("--teacher-model", metavar="SPEC", help="the same, for --teacher")
    p.add_argument("--dataset", help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", help="folder with the data set's files")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where to evaluate")
    p.add_argument("--noise-sigmas", type=sigma_arg, nargs="*", default=NOISE_SIGMAS,
                   help=f"σ of the Gaussian test noise, in [0, 1] pixel units (default {NOISE_SIGMAS})")
    p.add_argument("--data-changed", action="store_true",
                   help="evaluate although the data's files changed since training (the output records both hashes)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("check-model", help="can a model be a student (twice differentiable) and a teacher?",
                       description="One KD + JM step with the model as the student and one as the teacher, on a "
                                   "tiny batch. Names the first module whose backward has no derivative, and the "
                                   "fix where one exists. Exit 0: usable as a student; 1: not.")
    p.add_argument("spec", help="a built-in name, package.module:callable, torchvision:NAME or timm:NAME")
    p.add_argument("--input-shape", type=shape_arg, default=(3, 32, 32), help="C x H x W of one input (default 3x32x32)")
    p.add_argument("--dataset", help="take the input shape and class count from this data set (any --dataset form)")
    p.add_argument("--num-classes", type=positive_int, default=10, help="outputs of the model (default 10)")
    p.add_argument("--output", help="which part of the model's output holds the logits (key or index)")
    p.add_argument("--fix", action="store_true",
                   help="also try replace_hard_activations (Hardsigmoid/Hardswish -> twice-differentiable)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(run=_check_model)

    p = sub.add_parser("config", help="every --set key with its type, default and meaning",
                       description="List the settings of a run (--list) or the configs shipped with jacmatch (--files).")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="every --set key: type, default, meaning")
    group.add_argument("--files", action="store_true", help="the shipped configs, by the name --config takes")
    group.add_argument("--recipes", action="store_true",
                       help="the recipes distill --recipe takes, one line each, with their numbers from the report")
    p.set_defaults(run=_config)


def _add_tune_command(sub) -> None:
    p = sub.add_parser(
        "tune", help="choose a recipe's values (lr, τ, γ, mixup α) on your validation split with Optuna",
        description="Trials of a recipe (default: the one auto chooses) with values drawn by Optuna's TPE sampler, "
                    "each an ordinary run folder OUT/trials/NNNN, pruned by the median of the trials' validation "
                    "accuracy at each evaluation. The study lives in OUT/study.db (SQLite) or --storage URL, which "
                    "workers on several machines share (the same command on each). Run again after an interruption, "
                    "the same command continues the study: a cut trial is failed after the heartbeat's grace period "
                    "and retried from its folder's checkpoint. Writes OUT/best.yaml (`jacmatch distill --config "
                    "OUT/best.yaml` trains it), OUT/best.pt (the best trial's student), OUT/trials.csv, "
                    "OUT/history.png and OUT/tune.json.")
    _add_run_options(p, "distill")
    p.add_argument("--trials", type=positive_int, default=24,
                   help="complete or pruned trials the study holds when done (default 24)")
    p.add_argument("--space", metavar="KEY=KIND:LOW:HIGH", action="append", default=[],
                   help="search KEY over [LOW, HIGH], KIND log, float or int (e.g. optim.lr=log:0.001:0.03); over the "
                        "recipe's own space (`jacmatch config --recipes`)")
    p.add_argument("--storage", metavar="URL", help="the study's database: any URL Optuna takes (default: sqlite "
                                                    "in OUT/study.db)")
    p.add_argument("--study", default="jacmatch", help="the study's name in the database (default jacmatch)")
    p.add_argument("--heartbeat", type=positive_int, default=60, metavar="SECONDS",
                   help="a worker's heartbeat: a trial silent for twice this is failed and retried (default 60)")
    p.set_defaults(run=_tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacmatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"jacmatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_experiment_commands(sub)
    add_measurement_commands(sub)
    return parser


def _one_line(text: str) -> str:
    """A message as one line: control characters (a newline or form feed in a path) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _warning_line(command: str):
    """jacmatch's own warnings as one line on stderr, each text once (a section loads its
    teacher once per run); others as Python shows them."""
    default, shown = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jacmatch"):
            text = f"jacmatch {command}: warning: {_one_line(str(message))}"
            if text not in shown:
                shown.add(text)
                print(text, file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    git_commit()  # the commit of the code this process loaded, before anyone edits the checkout
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    before = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line(args.command)
            return _run(args)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _run(args) -> int:
    try:
        code = args.run(args)
    except (UsageError, MissingExtra, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc) or type(exc).__name__
        print(f"jacmatch {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a read-only folder, a directory where a file goes
        where = f" {_one_line(str(exc.filename))}" if exc.filename else ""
        print(f"jacmatch {args.command}: error: cannot write or read{where}: {exc.strerror or exc}; "
              "what was written before is kept", file=sys.stderr)
        return EXIT_IO
    except Preempted as exc:
        print(f"jacmatch {args.command}: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"jacmatch {args.command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except Terminated:
        print(f"jacmatch {args.command}: stopped by SIGTERM; every file written so far is complete (files are "
              "written atomically: each is its old or its new self)", file=sys.stderr)
        return EXIT_TERMINATED
    return code or 0
