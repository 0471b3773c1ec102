"""Recipes: complete run configs for a student, named after what they train, with the values
the converged section of the report (``results/REPORT.md`` §2b, ``results/paper/converge.json``)
chose on validation and measured. One home for them: the command line (``jacmatch distill
--recipe NAME``, ``jacmatch config --recipes``), Python (:func:`recipe`), ``jacmatch tune``
(each recipe's search space) and the converged section's rows are built from these.

A recipe covers the objective, the data options (crops, flips, mixup), the optimiser and
schedule, and evaluation with early stopping: every student trains until ``eval.patience``
evaluations without a better validation accuracy, inside a maximum of ``optim.max_steps``,
and is tested with its best weights. A config file and ``--set`` go on top of it.

``auto`` chooses the recipe from the training set's samples per class (:func:`choose`):
function matching with the Jacobian term up to :data:`FEW_SAMPLES`, the paper's recipe above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from .config import MAX_EPOCHS, RunConfig, config_from_dict, merge_values

__all__ = ["Recipe", "RECIPES", "AUTO", "NONE", "FEW_SAMPLES", "recipe", "recipe_values", "choose", "rule",
           "list_recipes", "describe", "check_recipe"]

AUTO = "auto"  # chosen from the training set's samples per class
NONE = "none"  # no recipe: the config file and --set over jacmatch's dataclass defaults

#: How the converged section trained every student (converge.json's "rule"): Adam at a
#: constant rate, batch 128, at least 20 steps an epoch, evaluated every 2 epochs, better by
#: more than 0.1 point, the best weights kept and tested. The maximum is in steps.
TRAINING = {
    "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant", "batch_size": 128,
              "min_steps_per_epoch": 20, "epochs": MAX_EPOCHS},
    "eval": {"every": 2, "keep_best": True, "min_delta": 0.001},
}
JM = {"jm_form": "normalized", "jm_outputs": "teacher_top1"}  # the Jacobian term of every row (docs/method.md)
NO_VIEWS = {"augment": False, "mixup": 0.0, "cutmix": 0.0}
FM_VIEWS = {"augment": True, "crop_padding": 2, "mixup": 1.0, "cutmix": 0.0}  # function matching's views


@dataclass(frozen=True)
class Recipe:
    """A named, complete student config: ``values`` over the dataclass defaults.

    ``row``: the report's row that measured it; ``evidence``: its test accuracy there,
    ``{n: (mean %, 95 % interval)}`` at each samples per class (checked against the result
    file by the tests); ``space``: what ``jacmatch tune`` searches, ``{key: (kind, low, high)}``
    with kind ``log`` or ``float``. ``schedule``: the Jacobian term's schedule it takes (objective
    settings, in ``values`` too) where report §2e's scheduled row lay within the full row's 95 %
    interval at every n measured, and ``schedule_evidence`` that row's test accuracy."""

    name: str
    summary: str
    row: str
    values: dict
    evidence: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    schedule_evidence: dict = field(default_factory=dict)


def _values(objective: dict, data: dict, max_steps: int, patience: int) -> dict:
    return merge_values(TRAINING, {"objective": objective, "data": data, "optim": {"max_steps": max_steps},
                                   "eval": {"patience": patience}})


#: The Jacobian term every 4 steps (times 4), in both recipes that have it: report §2e's
#: CE+KD+JM (every k) and FM+JM (every k) lay within their full rows' 95 % intervals at n = 1, 10
#: and 100 (results/paper/schedules.json), at 0.52-0.63 and 0.58-0.63 of their step times there.
SCHEDULE = {"jacobian_every": 4}

# The values are the converged section's choices (converge.json: "chosen" and "fm.chosen"):
# lr 0.01, τ 16, γ 10 on the paper's rows, mixup α 1 for function matching. Each maximum is the
# largest its row's cells needed (a cell's maximum doubled while it bound), each patience the
# largest its row's cells trained with (its baseline's budget check grew it).
RECIPES = {r.name: r for r in (
    Recipe("paper", "CE+KD+JM, the paper's objective", "CE+KD+JM",
           _values({"alpha": 1.0, "beta": 1.0, "gamma": 10.0, "temperature": 16.0, **JM, **SCHEDULE}, NO_VIEWS,
                   6400, 20),
           evidence={1: (50.9, 5.7), 5: (71.7, 2.7), 10: (77.6, 1.5), 50: (85.8, 0.2), 100: (87.3, 0.5),
                     500: (88.9, 0.6)},
           space={"optim.lr": ("log", 0.001, 0.03), "objective.temperature": ("log", 2.0, 32.0),
                  "objective.gamma": ("log", 0.1, 100.0)},
           schedule=SCHEDULE, schedule_evidence={1: (49.3, 5.0), 10: (77.3, 1.3), 100: (87.4, 0.4)}),
    Recipe("kd", "CE+KD, distillation without the Jacobian term", "CE+KD",
           _values({"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "temperature": 16.0}, NO_VIEWS, 6400, 20),
           evidence={1: (45.7, 5.1), 5: (67.1, 2.0), 10: (72.0, 1.9), 50: (82.1, 1.0), 100: (84.7, 0.4),
                     500: (88.4, 0.5)},
           space={"optim.lr": ("log", 0.001, 0.03), "objective.temperature": ("log", 2.0, 32.0)}),
    Recipe("fm", "function matching (Beyer et al. 2022): KD alone on crops, flips and mixup, trained long", "FM",
           _values({"alpha": 0.0, "beta": 1.0, "gamma": 0.0, "temperature": 16.0}, FM_VIEWS, 51200, 80),
           evidence={1: (60.1, 4.8), 5: (80.7, 1.6), 10: (83.7, 0.9), 50: (87.0, 0.8), 100: (87.4, 1.3),
                     500: (87.3, 1.7)},
           space={"optim.lr": ("log", 0.001, 0.03), "objective.temperature": ("log", 2.0, 32.0),
                  "data.mixup": ("float", 0.1, 2.0)}),
    Recipe("fm+jm", "function matching with the Jacobian term", "FM+JM",
           _values({"alpha": 0.0, "beta": 1.0, "gamma": 10.0, "temperature": 16.0, **JM, **SCHEDULE}, FM_VIEWS, 25600,
                   80),
           evidence={1: (69.6, 3.6), 5: (82.5, 1.5), 10: (84.7, 0.9), 50: (86.8, 0.6), 100: (86.8, 0.4),
                     500: (86.8, 0.3)},
           space={"optim.lr": ("log", 0.001, 0.03), "objective.temperature": ("log", 2.0, 32.0),
                  "objective.gamma": ("log", 0.1, 100.0), "data.mixup": ("float", 0.1, 2.0)},
           schedule=SCHEDULE, schedule_evidence={1: (67.9, 2.7), 10: (84.4, 0.9), 100: (86.6, 0.4)}),
)}

#: auto's rule: FM+JM up to this many samples per class, the paper's recipe above. In the
#: report, with FM trained to its own convergence (patience 80 at n = 1-50), FM+JM leads CE+KD+JM
#: by +18.7, +10.8, +7.1 and +1.0 points at n = 1, 5, 10, 50 and FM by +9.5, +1.7, +1.0 at n = 1,
#: 5, 10; at n = 50 it ties FM (86.8 against 87.0 ± 0.8); at n = 100 CE+KD+JM (87.3) ties the
#: best row (FM, 87.4 ± 1.3) at a third of FM+JM's step time, and at n = 500 it leads (88.9
#: against 86.8).
FEW_SAMPLES = 50


def list_recipes() -> list[str]:
    """The names ``--recipe`` takes: ``auto``, the recipes, and ``none``."""
    return [AUTO, *RECIPES, NONE]


def check_recipe(name: str) -> None:
    if name not in list_recipes():
        raise UsageError(f"unknown recipe {name!r}: choose one of {', '.join(list_recipes())} "
                         "(`jacmatch config --recipes`)")


def _why(name: str) -> str:
    """The report's evidence for auto's choice of ``name`` (the numbers from the recipes';
    the step times' ratio is pinned against converge.json by the tests)."""
    fm_jm, fm, paper = RECIPES["fm+jm"].evidence, RECIPES["fm"].evidence, RECIPES["paper"].evidence
    if name == "fm+jm":
        return (f"FM+JM is the best student up to n = 10 and ties the best at n = {FEW_SAMPLES} in the report "
                f"({fm_jm[1][0]} % against {paper[1][0]} % for CE+KD+JM and {fm[1][0]} % for FM at n = 1, "
                f"{fm_jm[10][0]} % against {paper[10][0]} % and {fm[10][0]} % at n = 10)")
    return (f"CE+KD+JM ties the best student at n = 100 and leads at n = 500 in the report ({paper[500][0]} % against "
            f"{fm_jm[500][0]} % for FM+JM), at a third of FM+JM's step time")


def rule() -> str:
    """auto's rule in one line, with its evidence."""
    return f"fm+jm up to {FEW_SAMPLES} samples per class ({_why('fm+jm')}), paper above ({_why('paper')})"


def choose(samples_per_class: float) -> tuple[str, str]:
    """auto's choice for a training set of ``samples_per_class`` (its mean over the classes):
    (recipe name, the reason in one line, with the report's numbers)."""
    n = samples_per_class
    shown = f"{n:g}" if float(n).is_integer() else f"{n:.1f}"
    name = "fm+jm" if n <= FEW_SAMPLES else "paper"
    return name, f"n = {shown} samples per class {'<=' if name == 'fm+jm' else '>'} {FEW_SAMPLES}: {_why(name)}"


def recipe_values(name: str) -> dict:
    """A recipe's settings as a nested dict over the dataclass defaults (``none``: none)."""
    check_recipe(name)
    if name == AUTO:
        raise UsageError("auto is chosen from the training set: call choose(samples_per_class), or "
                         "recipe('auto', samples_per_class=N)")
    return {} if name == NONE else merge_values(RECIPES[name].values, {})


def recipe(name: str, samples_per_class: float | None = None, **overrides) -> RunConfig:
    """The run config of recipe ``name`` (``jm.recipe("fm+jm")``); ``auto`` needs the training
    set's ``samples_per_class``. ``overrides``: nested settings on top, e.g.
    ``recipe("fm", data={"name": "digits"}, teacher="t/last.pt")``."""
    reason = None
    if name == AUTO:
        if samples_per_class is None:
            raise UsageError("recipe('auto') chooses from the training set: pass samples_per_class=N")
        name, reason = choose(samples_per_class)
    values = merge_values(recipe_values(name), {"recipe": name, "recipe_reason": reason})
    return config_from_dict(merge_values(values, overrides))


def describe(name: str) -> str:
    """One line: the recipe, what it trains, and its test accuracy in the report."""
    r = RECIPES[name]
    o, v = r.values["objective"], r.values
    numbers = ", ".join(f"n={n}: {m} ± {ci}" for n, (m, ci) in r.evidence.items())
    views = "crops+flips, mixup α={:g}".format(v["data"]["mixup"]) if v["data"]["augment"] else "no augmentation"
    return (f"{name:<6} {r.summary}; τ={o['temperature']:g}" + (f", γ={o['gamma']:g}" if o.get("gamma") else "")
            + (f", the Jacobian term every {r.schedule['jacobian_every']} steps" if r.schedule else "")
            + f", {views}, {v['optim']['name']} lr={v['optim']['lr']:g} {v['optim']['schedule']}, patience "
            f"{v['eval']['patience']} evaluations, "
            f"at most {v['optim']['max_steps']} steps. Report row {r.row}, test % (95 % interval): {numbers}"
            + ("; with its schedule (§2e): " + ", ".join(f"n={n}: {m} ± {ci}" for n, (m, ci) in r.schedule_evidence.items())
               if r.schedule_evidence else ""))


def samples_per_class(cfg: RunConfig, data_cache: dict | None = None) -> float:
    """The training set's samples per class: ``data.samples_per_class`` when set, else its
    size over its classes, read from the data (``data_cache``: shared with the run)."""
    if cfg.data.samples_per_class:
        return cfg.data.samples_per_class
    from .loading import load_data
    data = load_data(cfg, data_cache)
    return len(data.train) / max(data.num_classes, 1)


def resolve_recipe(path: str | None, overrides: list, name: str | None = None,
                   data_cache: dict | None = None) -> RunConfig:
    """A student's config: defaults ← recipe ← YAML file ← ``overrides``. The recipe is
    ``name``, else the file's ``recipe:``, else ``auto``, which reads the training set's
    samples per class (:func:`choose`) and records its choice and reason in the config."""
    from .config import load_config, resolve_values
    file_values = load_config(path)
    if name is None:  # a file's `recipe: null` (a run's own config.yaml, trained without one) is none
        name = (file_values["recipe"] or NONE) if "recipe" in file_values else AUTO
    if not isinstance(name, str):
        raise UsageError(f"recipe must be a recipe's name, got {name!r}: one of {', '.join(list_recipes())}")
    check_recipe(name)
    extra: list = [("recipe", None if name == NONE else name)]
    if name == AUTO:
        probe = resolve_values(file_values, [*overrides, ("recipe", None), ("recipe_reason", None)],
                               recipe_values("paper"), check=False)  # the data it names (checked before they are read)
        if not probe.data.samples_per_class:
            probe.check()
        name, reason = choose(samples_per_class(probe, data_cache))
        extra = [("recipe", name), ("recipe_reason", f"auto: {reason}")]
    elif name != file_values.get("recipe"):
        extra.append(("recipe_reason", None))
    return resolve_values(file_values, [*overrides, *extra], recipe_values(name))
