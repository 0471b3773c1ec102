"""``jacmatch tune``: a recipe's values chosen on the user's validation split by Optuna
(:func:`jacmatch.training.tune.tune`)."""

from __future__ import annotations

from ..training import ConfigError
from ..training.recipes import resolve_recipe
from .args import positive_int
from .run import add_run_options, overrides

__all__ = ["add_tune_command"]


def _tune(args) -> None:
    from ..training.tune import parse_space, space_of, tune
    if not args.out:
        raise ConfigError("tune needs --out DIR: the study's folder (its trials, database and best values)")
    if args.resume or args.overwrite:
        raise ConfigError("tune continues its study by itself: run the same command again (no --resume or --overwrite)")
    data_cache: dict = {}
    settings = [item for item in overrides(args)  # the study's folder and time budget are not a trial's
                if not (isinstance(item, tuple) and item[0] in ("out_dir", "time_budget"))]
    cfg = resolve_recipe(args.config, settings, args.recipe, data_cache)
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


def add_tune_command(sub) -> None:
    p = sub.add_parser(
        "tune", help="choose a recipe's values (lr, τ, γ, mixup α) on your validation split with Optuna",
        description="Trials of a recipe (default: the one auto chooses) with values drawn by Optuna's TPE sampler, "
                    "each an ordinary run folder OUT/trials/NNNN, pruned by the median of the trials' validation "
                    "accuracy at the same step, once a trial has had its run's early-stopping patience in evaluations "
                    "(eval.patience; 10 without early stopping). The study lives in OUT/study.db (SQLite) or "
                    "--storage URL, which workers on several machines share (the same command on each). Run again "
                    "after an interruption, "
                    "the same command continues the study: a cut trial is failed after the heartbeat's grace period "
                    "and retried from its folder's checkpoint. Writes OUT/best.yaml (`jacmatch distill --config "
                    "OUT/best.yaml` trains it), OUT/best.pt (the best trial's student), OUT/trials.csv, "
                    "OUT/history.png and OUT/tune.json.")
    add_run_options(p, "distill")
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


