"""The training commands of the CLI: train-teacher, distill, evaluate, demo, bench."""

from __future__ import annotations

import json

from .training import ConfigError, resolve

EXIT_NONFINITE = 3


def _add_run_options(p, kind: str) -> None:
    p.add_argument("--config", metavar="YAML", help="experiment config (configs/*.yaml); defaults in code")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a setting, e.g. --set optim.epochs=20 --set objective.gamma=0.5")
    p.add_argument("--out", metavar="DIR", help="output folder (checkpoints, metrics, results)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: auto")
    p.add_argument("--dataset", help="data set name (fashion-mnist, mnist, cifar10, cifar100, digits, synthetic)")
    p.add_argument("--data-dir", help="folder with the data set's files")
    p.add_argument("--model", help="model name (see jacmatch.models.list_models())")
    p.add_argument("--seed", type=int)
    if kind == "distill":
        p.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (from train-teacher)")
        p.add_argument("--samples-per-class", type=int, help="few-sample training set: n per class")


def _overrides(args) -> list[str]:
    sets = []
    for flag, key in (("out", "out_dir"), ("device", "device"), ("dataset", "data.name"),
                      ("data_dir", "data.data_dir"), ("model", "model.name"), ("seed", "seed"),
                      ("teacher", "teacher"), ("samples_per_class", "data.samples_per_class")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return sets + list(args.set)


def _run_training(args, kind: str) -> None:
    from .training import train
    from .training.trainer import NonFiniteError
    base = {"objective": {"alpha": 1.0}} if kind == "teacher" else {}
    cfg = resolve(args.config, _overrides(args), base)
    if kind == "teacher" and cfg.teacher:
        raise ConfigError("train-teacher takes no --teacher; use distill")
    if kind == "distill" and not cfg.teacher:
        raise ConfigError("distill needs --teacher CKPT (a checkpoint written by train-teacher)")
    try:
        results = train(cfg, resume=args.resume)
    except NonFiniteError as exc:
        import sys
        print(f"jacmatch: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NONFINITE)
    test = results["final"]["test"] or {}
    print(f"{cfg.out_dir}: test accuracy {test.get('acc', float('nan')):.4f}"
          + "".join(f", σ={s}: {a:.4f}" for s, a in test.get("noisy_acc", {}).items())
          + (f", Jacobian cosine {test['jacobian_cosine']:.3f}" if "jacobian_cosine" in test else ""))


def _evaluate(args) -> None:
    from .data import create_dataset
    from .training import evaluate, load_model
    model, state = load_model(args.checkpoint)
    cfg = json.loads(state["config"])
    d = cfg["data"]
    data = create_dataset(args.dataset or d["name"], data_dir=args.data_dir or d["data_dir"],
                          val_size=d["val_size"], split_seed=d["split_seed"], classes=d["classes"])
    teacher = load_model(args.teacher)[0] if args.teacher else None
    result = evaluate(model, data.test, "cpu", noise_sigmas=args.noise_sigmas, teacher=teacher)
    print(json.dumps(result, indent=1))
    if args.json:
        from .io import write_json_atomic
        write_json_atomic(args.json, result)


def add_commands(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a teacher with cross-entropy",
                       description="Train a model with cross-entropy on the full training set (minus validation).")
    _add_run_options(p, "teacher")
    p.set_defaults(run=lambda a: _run_training(a, "teacher"))

    p = sub.add_parser("distill", help="distil a student from a teacher checkpoint",
                       description="Train a student with α·CE + β·KD + γ·JM + δ·AT (+ λ·penalty); "
                                   "weights and settings under objective.* (METHOD.md §3).")
    _add_run_options(p, "distill")
    p.set_defaults(run=lambda a: _run_training(a, "distill"))

    p = sub.add_parser("evaluate", help="clean and noisy accuracy of a checkpoint",
                       description="Test accuracy of a checkpoint, clean and under Gaussian input noise "
                                   "(σ in [0, 1] pixel units); with --teacher, the Jacobian cosine too.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--teacher", help="teacher checkpoint, for the Jacobian cosine")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")
    p.add_argument("--noise-sigmas", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("demo", help="the main job: teacher, students with CE / KD / KD+JM, table and plot",
                       description="Train a teacher, distil students with CE, KD and KD+JM at 1, 5 and 10 "
                                   "samples per class over 3 seeds; print a table, write JSON and a PNG.")
    p.add_argument("--dataset", default="digits", help="digits (default, bundled) or fashion-mnist")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.set_defaults(run=lambda a: __import__("jacmatch.experiments.demo", fromlist=["main"]).main(
        a.dataset, a.out, a.seeds, a.device))

    p = sub.add_parser("bench", help="cost of the Jacobian terms against KD (ratios in one run)",
                       description="Median step times and peak memory of CE, KD, KD+JM and the estimators, "
                                   "with and without the teacher cache; ratios measured in one run.")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="few steps, small shapes (a smoke test)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--plot", metavar="PATH", help="PNG of step time against batch, input size, classes")
    p.add_argument("--profile", action="store_true",
                   help="only profile kd_step, jm_step and jm_step_cached (torch.profiler's top operators)")
    p.set_defaults(run=lambda a: __import__("jacmatch.experiments.bench", fromlist=["main"]).main(
        a.json, a.quick, a.device, a.plot, a.profile))
    add_experiment_commands(sub)


def add_experiment_commands(sub) -> None:
    p = sub.add_parser("experiment", help="run a section of the paper's experiments (Fashion-MNIST)",
                       description="Sections: teacher, distill, robustness, transfer, verify, pictures, or all. "
                                   "Finished runs are reused and interrupted ones resumed; each section writes "
                                   "results/paper/SECTION.json.")
    p.add_argument("section", choices=["teacher", "distill", "robustness", "transfer", "verify", "pictures", "all"])
    p.add_argument("--quick", action="store_true", help="a smoke run on digits with tiny grids")
    p.set_defaults(run=lambda a: __import__("jacmatch.experiments.paper", fromlist=["main"]).main(a.section, a.quick))

    p = sub.add_parser("report", help="write results/REPORT.md, its plots and BENCHMARKS.md from the result JSONs",
                       description="Generate the report, the README's findings and BENCHMARKS.md from results/.")
    p.add_argument("--results", metavar="DIR", help="folder of the section JSONs (default results/paper)")
    p.set_defaults(run=lambda a: __import__("jacmatch.experiments.report", fromlist=["main"]).main(a.results))
