"""``jacmatch evaluate``, ``check-model`` and ``config``: what a checkpoint, a model and the
settings hold. Each is a thin layer over the library (:func:`~jacmatch.training.checkpoint_eval.evaluate_checkpoint`,
:func:`~jacmatch.training.compat.check_model`, :func:`~jacmatch.training.config.config_keys`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.objective import TEACHER_OBJECTIVE
from ..data import dataset_name
from ..training import resolve
from ..training.config import EvalConfig
from ..training.recipes import rule
from .args import positive_int, shape_arg, sigma_arg
from .exits import EXIT_INCOMPATIBLE

__all__ = ["add_inspect_commands", "NOISE_SIGMAS"]

#: What `jacmatch evaluate` measures under noise unless told: a run's own default (eval.noise_sigmas).
NOISE_SIGMAS = EvalConfig().noise_sigmas


def _evaluate(args) -> None:
    from ..training.checkpoint_eval import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, teacher=args.teacher,
                                 model=args.model, teacher_model=args.teacher_model, device=args.device,
                                 noise_sigmas=args.noise_sigmas, data_changed=args.data_changed, json_out=args.json)
    print(json.dumps(result, indent=1))


def _check_model(args) -> int:
    from ..training.compat import check_model, describe
    from ..training.run_folder import check_spared, data_reads
    shape, num_classes = args.input_shape, args.num_classes
    cfg = resolve(None, [("data.name", dataset_name(args.dataset)), ("data.val_size", 0)],
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


def add_inspect_commands(sub) -> None:
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


