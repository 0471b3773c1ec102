"""``jacmatch train-teacher`` and ``jacmatch distill``: a run config resolved from a recipe,
a config file and the options, trained by :func:`jacmatch.training.train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.objective import TEACHER_OBJECTIVE, ObjectiveConfig
from ..data import dataset_name
from ..training import ConfigError, resolve
from ..training.recipes import FEW_SAMPLES, list_recipes, resolve_recipe, rule
from .args import non_negative_float, non_negative_int, positive_float, positive_int
from .exits import EXIT_NONFINITE

__all__ = ["add_run_commands", "add_run_options", "overrides"]


def add_run_options(p, kind: str) -> None:
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


def overrides(args) -> list:
    """The options as ``(key, value)`` pairs (taken as typed, not re-parsed), then ``--set``."""
    sets: list = []
    if getattr(args, "dataset", None):
        args.dataset = dataset_name(args.dataset)
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
    implicit = args.resume and not args.config  # a resume starts from the run's own config; the options change it
    if implicit:
        from ..training.config import RunConfig
        own = Path(args.out or RunConfig().out_dir) / "config.yaml"
        args.config = str(own) if own.is_file() else None
    cfg = resolve_recipe(args.config, overrides(args), args.recipe, data_cache) if kind == "distill" else \
        resolve(args.config, overrides(args), {"objective": dict(TEACHER_OBJECTIVE)})
    if kind == "teacher" and (cfg.teacher or cfg.teacher_weights):
        raise ConfigError("train-teacher takes no --teacher; use distill")
    if kind == "distill" and not (cfg.teacher or cfg.teacher_weights):
        raise ConfigError("distill needs --teacher CKPT (a checkpoint written by train-teacher), or "
                          "--teacher-model SPEC --teacher-weights FILE")
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if kind == "distill" and main_process:
        if cfg.recipe:
            print(f"recipe: {cfg.recipe}" + (f" ({cfg.recipe_reason})" if cfg.recipe_reason else ""), flush=True)
        print(f"objective: {cfg.objective.describe()}", flush=True)
    if args.resume and args.overwrite:
        raise ConfigError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    # (read implicitly, the run's config.yaml is rewritten with what the run now trains with)
    config_file = str(find_config(args.config)) if args.config and not implicit else None
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


def add_run_commands(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a teacher with cross-entropy",
                       description="Train a model with cross-entropy on the full training set (minus validation): "
                    "objective.beta=0 and objective.gamma=0 under the config, which may set other terms.")
    add_run_options(p, "teacher")
    p.set_defaults(run=lambda a: _run_training(a, "teacher"))

    p = sub.add_parser(
        "distill", help="distil a student from a teacher (default: the recipe auto chooses for the training set)",
        description=f"Train a student with α·CE + β·KD + γ·JM + δ·AT (+ λ·penalty), weights and settings under "
                    f"objective.* (docs/method.md), starting from a recipe (--recipe; `jacmatch config --recipes`). "
                    f"The default, auto, trains function matching with the Jacobian term (fm+jm) up to {FEW_SAMPLES} "
                    f"samples per class and the paper's CE+KD+JM (paper) above, each early-stopped on validation "
                    f"inside a maximum and tested with its best weights. --recipe none keeps jacmatch's dataclass "
                    f"defaults ({ObjectiveConfig().describe()}, SGD) under --config and --set.")
    add_run_options(p, "distill")
    p.set_defaults(run=lambda a: _run_training(a, "distill"))
