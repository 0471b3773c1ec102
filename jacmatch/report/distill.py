"""The report's sections on students: the teacher, distillation with few samples (section
2, its equal-compute rows and budget check) and distillation at convergence (2b)."""

from __future__ import annotations

from ..experiments import rows as R
from ..experiments.common import CONVERGED_GAIN, converged
from ..experiments.records import Section
from ..experiments.figures import main_rows
from ..experiments.report_text import (check_gain, chosen_values, cores, holds, img, missing, paired, paired_by_n, pm,
                                       reached_text, signed, table)

__all__ = ["teacher_text", "teacher_findings", "distill_rows", "distill_text", "converge_text", "small_over_large",
           "budget_pair", "budget_findings", "equal_time_pairs", "at_time", "EQUAL_TIME_PAIRS"]


def teacher_text(t: dict | None) -> str:
    if t is None:
        return missing("jacmatch experiment teacher")
    noisy = ", ".join(f"σ={s}: {100 * a:.1f}%" for s, a in t["test"].get("noisy_acc", {}).items())
    size = f" ({t['num_train']:,} images; {t['num_val']:,} held out for validation)" if "num_val" in t else ""
    return (f"A {t['model']} ({t['parameters']:,} parameters) trained on the full training set{size} for "
            f"{t['epochs']} epochs: **test accuracy "
            f"{100 * t['test']['acc']:.2f}%** (validation {100 * t['val']['acc']:.2f}%), trained in "
            f"{t['train_seconds'] / 60:.1f} min. Checkpoint: `{t['checkpoint']}`. Under Gaussian input noise "
            f"(trained without noise): {noisy}.{_teacher_check(t)}\n")


def _teacher_check(t: dict) -> str:
    c = t.get("check")
    if c is None:
        return ""
    commit = (t.get("provenance") or {}).get("git_commit") or "an installed package"
    same = "every accuracy above came out identical" if c["reproduced"] else \
        f"**it differs from the record**: test {100 * c['test']['acc']:.2f}%, validation {100 * c['val']['acc']:.2f}%"
    return (f" Re-evaluated from the committed checkpoint (SHA-256 {c['checkpoint_sha256'][:12]}…) by "
            f"`jacmatch experiment teacher` at commit {commit[:12]}: {same}.")


def teacher_findings(t: dict | None) -> list[str]:
    if t is None:
        return []
    noisy = t["test"].get("noisy_acc", {})
    worst = f"; under input noise of σ = 0.1 it falls to {100 * noisy['0.1']:.1f}%" if "0.1" in noisy else ""
    return [f"Teacher: {t['model']} reaches {100 * t['test']['acc']:.2f}% test accuracy on Fashion-MNIST{worst}."]


def distill_rows(d: dict) -> dict:
    """The section's row groups as its JSON names them (older JSONs: the rows run at every n)."""
    if "rows" in d:
        return d["rows"]
    main = main_rows(d)
    return {"paper": main, "ablations": [r for r in dict.fromkeys(c["row"] for c in d["cells"].values())
                                         if r not in main]}


def distill_text(d: dict | None, folder: str) -> tuple[str, list[str]]:
    if d is None:
        return missing("jacmatch experiment distill"), []
    cells, samples, rows = d["cells"], d["samples"], distill_rows(d)
    done = f"**Partial: {len(cells)} cells have run so far**; `jacmatch experiment distill` resumes the rest. " \
        if not d.get("complete", True) else ""
    chosen = chosen_values(d["selection"], (
        ("lr", "the learning rate on CE, with the rule's step budget at that n"),
        ("check_steps", "that n's own step budget on CE"),
        ("steps", "the step budget on CE+KD (optimizer steps per student)"), ("tau", "τ on CE+KD"),
        ("gamma", "γ on CE+KD+JM (also used by KD+JM, label and projection)"), ("gamma_ce", "γ on CE+JM"),
        ("gamma_sq", "γ on CE+KD+JM sq"), ("sigma", "σ of noisy KD (one draw)")))
    budget = (f"every student takes about {d['steps']} optimizer steps (Adam, cosine schedule), whatever n" if
              "budgets" not in d else "a student of n samples per class takes " + ", ".join(
                  f"{s} steps at n={n}" for n, s in d["budgets"].items()) + f" (the budget chosen on validation, or "
              f"{d['budget_rule']['min_epochs']} passes over its data, at most {d['budget_rule']['max_steps']} "
              "steps: the time the section may take)" + _budget_at_check(d) + _step_cap(d))
    lines = [done + f"Student: {d['student']}; {len(d['seeds'])} seeds per cell; {budget}. Test accuracy (%), mean ± "
             f"std over seeds. Chosen on the validation split, in this order: {chosen}.\n"]
    lines += table(cells, rows["paper"], samples, lambda c: pm(c["acc"]))
    lines += ["", "95% interval half-widths of those means (Student's t over the seeds), in points:", ""]
    lines += table(cells, rows["paper"], samples, lambda c: f"±{100 * c['acc']['ci95']:.1f}")
    lines += _equal_compute(d, rows) + _budget_check(d)
    if rows.get("ablations"):
        ns = sorted({c["samples_per_class"] for c in cells.values() if c["row"] in rows["ablations"]})
        lines += ["", "Ablations (form and which Jacobians):", ""]
        lines += table(cells, [R.CE_KD_JM] + rows["ablations"], ns, lambda c: pm(c["acc"]))
    lines += ["", "Mean cosine between teacher and student input-gradients (test set, teacher's top-1):", ""]
    lines += table(cells, rows["paper"], samples, lambda c: f"{c['jacobian_cosine']['mean']:.3f}")
    return "\n".join(lines) + f"\n\n![distillation]({img(folder, 'distill')})\n", _distill_findings(d)


def converge_text(c: dict | None, folder: str) -> tuple[str, list[str]]:
    """The converged view: every student early-stopped inside a maximum that never binds."""
    if c is None:
        return missing("jacmatch experiment converge"), []
    cells, ns, rows, rule = c["cells"], c["samples"], c["rows"], c["rule"]
    done = "" if c.get("complete", True) else \
        f"**Partial: {len(cells)} cells have run so far**; `jacmatch experiment converge` resumes the rest. "
    chosen = c["chosen"]
    lines = [done + f"Every student trains at a constant learning rate ({chosen['lr']:g}, τ = {chosen['tau']:g}, "
             f"γ = {chosen['gamma']:g}, γ for CE+JM = {chosen['gamma_ce']:g}: section 2's choices on validation) up "
             f"to a maximum of {rule['first_max_steps']} steps, is evaluated on validation every "
             f"{rule['eval_every_epochs']} epochs, and "
             f"stops after {rule['patience']} evaluations (more where its baseline's check asks, below) "
             "without a validation accuracy better by more than "
             f"{100 * rule.get('min_delta', 0):g} point; its best weights "
             "are tested. A maximum where a seed's best point lies (or that stops no seed) is doubled, up to "
             f"{rule['growths']} times." + _fm_text(c) + f" Test accuracy (%), mean ± std over {len(c['seeds'])} "
             "seeds:\n"]
    lines += table(cells, rows, ns, lambda x: pm(x["acc"]))
    lines += ["", "Where the best validation accuracy was: mean step (of the maximum); ✓ when every seed's best point "
              "lies strictly inside its maximum and the run stopped early:", ""]
    lines += table(cells, rows, ns, lambda x: f"{x['best_step']['mean']:.0f} of {x['max_steps']} "
                    + ("✓" if x["inside"] else "**✗ binds**"))
    lines += ["", f"Budget check: {_and(c['checked_rows'])} again with twice the patience and maximum; the change in "
              "validation accuracy (points); a student that has converged gains under 0.5:", ""]
    lines += ["| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for row in c["checked_rows"]:
        lines.append(f"| {row} | " + " | ".join(check_gain(cells.get(R.key(R.twice_patience(row), n))) for n in ns) + " |")
    lines += _patience_grown(c)
    cost = (" Training seconds are steps times the row's step cost at that n, measured back to back in one process "
            "(without evaluation)" + (f", the fastest of {c['step_cost_measurements']} such measurements (one per invocation "
            "of the section)" if c.get("step_cost_measurements", 1) > 1 else "")
            + ", so that what else the machine ran while a cell trained does not enter them: "
            + "; ".join(f"{row} " + ", ".join(f"{1000 * v:.1f}" for v in by_n.values()) + " ms"
                        for row, by_n in c["step_seconds"].items()) + f" at n = {', '.join(map(str, ns))}."
            if "step_seconds" in c else "")
    lines += ["", f"Time to accuracy: training seconds (and steps) to reach {100 * rule['reach']:.0f}% of the row's own "
              "best validation accuracy, mean over seeds" + ("." + cost if cost else ":"), ""]
    lines += table(cells, rows, ns, lambda x: reached_text(x["to_own_99"], None))
    lines += ["", "… and to reach CE+KD's converged validation accuracy at that n (seeds that reach it):", ""]
    lines += table(cells, rows, ns, lambda x: reached_text(x["to_kd"], x["to_kd"]) if "to_kd" in x else "—")
    if R.FM in rows:
        lines += ["", "At equal training time: per seed, both rows' validation accuracy at the time the quicker of the "
                  "two took to reach its best point; the difference in points (seeds won):", ""]
        lines += ["| difference | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for a, b in EQUAL_TIME_PAIRS:
            found = {n: (m, w, k) for n, m, w, k in equal_time_pairs(c, a, b)}
            lines.append(f"| {b} − {a} | " + " | ".join(f"{signed(found[n][0])} ({found[n][1]}/{found[n][2]})"
                                                        if n in found else "—" for n in ns) + " |")
    lines += ["", f"![validation accuracy against training time]({img(folder, 'converge_curves')})"]
    return "\n".join(lines) + "\n", _converge_findings(c)


def _patience_grown(c: dict) -> list[str]:
    """Where a baseline's check gained, the patience it (and its Jacobian row) trained with."""
    rule = c["rule"]
    if "patience_growths" not in rule:
        return []
    grown = [(row, n, cell) for row in c["checked_rows"] for n in c["samples"]
             if (cell := c["cells"].get(R.key(row, n))) and cell.get("patience_grown_from")]
    text = (f"A baseline whose check gains {CONVERGED_GAIN:g} point or more is trained again with twice the patience and first "
            f"maximum (at most {rule['patience_growths']} times"
            + "".join(f", {row} at most {cap}" for row, cap in rule.get("patience_growths_of", {}).items())
            + (f" at n = {', '.join(map(str, rule['patience_growths_samples']))}" if rule.get("patience_growths_samples")
               else "")
            + "): the check's students become its own, checked in turn "
            "at twice theirs (the table shows the last check), and its Jacobian row takes the same patience. ")
    if not grown:
        return ["", text + "No baseline's patience grew."]
    return ["", text + "Grown: " + "; ".join(
        f"{row} at n={n}: patience {cell['patience']} (" + ", ".join(
            f"{signed(g['val_gain'])} at patience {g['patience']}" for g in cell["patience_grown_from"]) + ")"
        for row, n, cell in grown) + "."]


def at_time(curve: list, seconds: float) -> float:
    """The best validation accuracy a run had reached within ``seconds`` of training (0
    before its first evaluation)."""
    return max((acc for _, sec, acc in curve if sec <= seconds + 1e-9), default=0.0)


def _best_time(curve: list) -> float:
    """The training seconds at which a run first reached its best validation accuracy."""
    best = max(acc for _, _, acc in curve)
    return next(sec for _, sec, acc in curve if acc == best)


def equal_time_pairs(c: dict, a: str, b: str) -> list[tuple]:
    """(n, mean of b − a in points, seeds where b wins, seeds): per seed, both rows'
    validation accuracy at the time the quicker of the two took to its best point (the
    best either had reached by then), at every n where both ran."""
    out = []
    for n in c["samples"]:
        x, y = c["cells"].get(R.key(a, n)), c["cells"].get(R.key(b, n))
        if x and y:
            diff = []
            for cx, cy in zip(x["curves"], y["curves"]):
                t = min(_best_time(cx), _best_time(cy))
                diff.append(at_time(cy, t) - at_time(cx, t))
            out.append((n, 100 * sum(diff) / len(diff), sum(v > 0 for v in diff), len(diff)))
    return out


#: The equal-time comparisons of the converged view: (a, b) for b − a
EQUAL_TIME_PAIRS = ((R.FM, R.CE_KD_JM), (R.FM, R.FM_JM), (R.CE_KD, R.CE_KD_JM))


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _fm_text(c: dict) -> str:
    """How FM and FM+JM were trained and their values chosen (none before they ran)."""
    fm = c.get("fm")
    if not fm:
        return ""
    return (f" {R.FM} is function matching (Beyer et al. 2022): KD alone, the teacher on the student's own view (random "
            f"crops, flips and mixup), trained as long as it needs like every row; {R.FM_JM} adds the Jacobian term "
            f"(γ = {c['chosen']['gamma']:g}). Their values, chosen on validation in this order with the same early "
            "stopping: " + chosen_values(fm["selection"], (("mixup", "mixup α"), ("fm_tau", "τ"),
                                                            ("fm_lr", "learning rate"))) + ".")


def small_over_large(c: dict) -> tuple[float, int, int, list, list] | None:
    """Is JM's gain over CE+KD larger at n ≤ 10 than at n ≥ 100? Per seed: the mean gain
    over the small n minus that over the large n; (mean, seeds where positive, seeds, small, large)."""
    record = Section.from_json("converge", c)
    small = [n for n in c["samples"] if n <= 10 and record.cell(R.CE_KD_JM, n)]
    large = [n for n in c["samples"] if n >= 100 and record.cell(R.CE_KD_JM, n)]
    if not small or not large:
        return None

    def gain(n):
        kd, jm = record.cell(R.CE_KD, n), record.cell(R.CE_KD_JM, n)
        assert kd is not None and jm is not None
        return [b - a for a, b in zip(kd.acc.values, jm.acc.values)]
    seeds = len(gain(small[0]))
    per_seed = [sum(gain(n)[s] for n in small) / len(small) - sum(gain(n)[s] for n in large) / len(large)
                for s in range(seeds)]
    return 100 * sum(per_seed) / seeds, sum(d > 0 for d in per_seed), seeds, small, large


def _converge_findings(c: dict) -> list[str]:
    # JM's gain at convergence is the verdict "Claim (b), at convergence"; said once, there
    if not paired_by_n(c, R.CE_KD, R.CE_KD_JM):
        return []
    binding = [k for k, x in c["cells"].items() if not x["inside"]]
    checks = [(x["row"].split(" (")[0], x["samples_per_class"], x) for x in c["cells"].values() if "val_gain" in x]
    rule_patience = c["rule"]["patience"]

    def patience(row, n) -> str:  # where it grew: the patience the check doubled
        p = c["cells"][R.key(row, n)]["patience"]
        return f" (from patience {p})" if p != rule_patience else ""
    def gain(x: float) -> str:  # one that rounds up to the tolerance shows the digit that keeps it under
        return signed(x, 2) if not converged(float(signed(x))) and converged(x) else signed(x)
    gains = ", ".join(f"{row} n={n}{patience(row, n)}: {gain(x['val_gain'])}" for row, n, x in checks)
    unsettled = [f"{row} n={n}" for row, n, x in checks if not converged(x["val_gain"])]
    where = " at the largest patience the rule allows" if "patience_growths" in c["rule"] else ""
    return ["Budgets at convergence: " + ("every best point lies inside its maximum" if not binding else
            f"**the maximum still binds for {', '.join(binding)}**") + f"; with twice the patience, "
            f"{_and(c['checked_rows'])} change validation accuracy by {gains} points"
            + (f"; **not converged{where}: {', '.join(unsettled)}**" if unsettled else "") + "."]


def _budget_at_check(d: dict) -> str:
    """Where the budget is checked, its own budget chosen on validation (not the rule's)."""
    if "check_steps" not in d["selection"]:
        return ""
    return (f"; at n={d['budget_check_samples']}, where the budget is checked, its own budget is chosen on validation "
            "among the rule's and its doublings (below)")


def _step_cap(d: dict) -> str:
    """Whether the cap on the chosen budget bound: validation preferred more steps than the
    section's time allows at small n."""
    cap, chosen = d["budget_rule"].get("max_chosen_steps"), d["selection"]["steps"]["chosen"]
    if cap is None or chosen <= cap:
        return ""
    capped = ", ".join(f"n={n}" for n, steps in d["budgets"].items() if steps == cap)
    return (f"; **validation chose {chosen} steps, capped at {cap}**: at {capped} the budget is bounded by the time "
            f"the section may take ({cores(d)} cores), a natural bound, not a choice inside the grid")


def _equal_compute(d: dict, rows: dict) -> list[str]:
    """Test accuracy, accuracy under noise σ = 0.3 and training seconds of the rows that
    cost what JM costs: noisy KD (M draws) and CE+KD trained for CE+KD+JM's time."""
    if not rows.get("equal_compute"):
        return []
    cells, ns, group = d["cells"], d["samples"], rows["equal_compute"]
    secs = lambda c: f"{c['loop_seconds']['mean']:.0f}" if "loop_seconds" in c else "—"  # noqa: E731
    m = d["noise_draws_equal"]
    draws = (f"M = 1 and M = {m} draws, the M at which noisy KD costs what a KD + JM step costs" if m > 1 else
             "M = 1 draw, which is also the M at JM's cost: one draw already takes longer than a CE+KD+JM step, "
             "since the teacher's outputs and Jacobians on the fixed training inputs are cached while noisy inputs "
             "need the teacher every step (seconds below)")
    return (["", f"At equal compute (Proposition 1 read as a recipe: CE+KD on noisy inputs, σ chosen on validation, "
             f"{draws}; and CE+KD trained for as long as CE+KD+JM took). Test accuracy (%):", ""]
            + table(cells, group, ns, lambda c: pm(c["acc"]))
            + ["", "Test accuracy under Gaussian input noise σ = 0.3 (%):", ""]
            + table(cells, group, ns, lambda c: pm(c["noisy_acc"]["0.3"]) if "0.3" in c["noisy_acc"] else "—")
            + ["", f"Training seconds per student (the epochs' own time, mean over seeds; {cores(d)}-core CPU):", ""]
            + table(cells, group, ns, secs))


def budget_pair(d: dict) -> tuple | None:
    """(n, CE cell, CE at twice its budget, difference in points) where the budget is checked."""
    n = d.get("budget_check_samples")
    ce, doubled = (d["cells"].get(R.key(r, n)) for r in distill_rows(d).get("budget_check", ["", ""]))
    return (n, ce, doubled, 100 * (doubled["acc"]["mean"] - ce["acc"]["mean"])) if ce and doubled else None


def _budget_check(d: dict) -> list[str]:
    if (pair := budget_pair(d)) is None:
        return []
    n, ce, doubled, diff = pair
    verdict = (f"converged (it gains under {CONVERGED_GAIN:g} point)" if converged(diff) else
               f"**not converged** (it gains {CONVERGED_GAIN:g} point or more)")
    val = (f" (validation: {pm(ce['val_acc'])}% and {pm(doubled['val_acc'])}%)"
           if "val_acc" in ce and "val_acc" in doubled else "")
    return ["", f"Is the budget enough? CE at n = {n}: {pm(ce['acc'])}% with {ce['steps']} steps, "
            f"{pm(doubled['acc'])}% with {doubled['steps']} steps: {signed(diff)} points, {verdict}{val}."]


def _distill_findings(d: dict) -> list[str]:
    out = []
    for n in d["samples"]:
        kd, jm = d["cells"].get(R.key(R.CE_KD, n)), d["cells"].get(R.key(R.CE_KD_JM, n))
        if kd and jm:
            out.append((n, *paired(kd["acc"]["values"], jm["acc"]["values"])))
    if not out:
        return []
    best = max(out, key=lambda t: t[1])
    text = ", ".join(f"n={n}: {t}" for n, _, t in out)
    partial = "" if d.get("complete", True) else " (partial run: only these n so far)"
    findings = [f"Distillation on Fashion-MNIST{partial}: adding Jacobian matching to CE+KD changes test accuracy "
                f"by {text} (points, paired by seed); the largest gain is at n={best[0]} samples per class."]
    alone = [(n, d["cells"][R.key(R.CE_JM, n)]["acc"]["mean"] - d["cells"][R.key(R.CE, n)]["acc"]["mean"])
             for n in d["samples"] if R.key(R.CE_JM, n) in d["cells"] and R.key(R.CE, n) in d["cells"]]
    if alone:
        findings.append("Jacobian matching without KD (CE+JM against CE, γ chosen for CE+JM on validation): "
                        + ", ".join(f"n={n}: {signed(100 * m)}" for n, m in alone) + " points.")
    return findings + _compute_findings(d)


def _compute_findings(d: dict) -> list[str]:
    """Is JM worth its cost? CE+KD+JM against each row that costs as much (paired by seed);
    worth it at an n where it beats every one of them on average, in at least 4 of 5 seeds."""
    rivals = [r for r in distill_rows(d).get("equal_compute", []) if r not in (R.CE_KD, R.CE_KD_JM)]
    pairs = {r: {n: (m, w, k) for n, m, w, k in paired_by_n(d, r, R.CE_KD_JM)} for r in rivals}
    ns = [n for n in d["samples"] if rivals and all(n in pairs[r] for r in rivals)]
    if not ns:
        return []
    worth = [n for n in ns if all(holds(*pairs[r][n]) for r in rivals)]
    against = "; ".join(f"against {r}: " + ", ".join(f"n={n}: {signed(pairs[r][n][0])} ({pairs[r][n][1]}/{pairs[r][n][2]})"
                                                      for n in ns) for r in rivals)
    where = (f"worth its cost at {', '.join(f'n={n}' for n in worth)}" if worth else "not worth its cost at any n")
    rest = [n for n in ns if n not in worth]
    return [f"At equal compute, CE+KD+JM − the rows that cost as much, test points (seeds won) {against}: Jacobian "
            f"matching is {where}" + (f", not at {', '.join(f'n={n}' for n in rest)}" if worth and rest else "") + "."]


def budget_findings(d: dict | None, r: dict | None) -> list[str]:
    """Whether the step budget, rather than n, limits the students: CE at the n where the
    budget is checked, with its budget and twice it; against the same network trained
    with CE on the full set (section 3)."""
    if d is None or r is None:
        return []
    full, pair = r["cells"].get(R.key(R.CE, "full")), budget_pair(d)
    if pair is None or full is None:
        return []
    n, ce, doubled, diff = pair
    return [f"Step budgets: a CE student at n={n} reaches {pm(ce['acc'])}% with its budget of {ce['steps']} steps "
            f"and {pm(doubled['acc'])}% with twice as many ({signed(diff)} points): "
            + ("the students have converged at their budget" if converged(diff) else "the budget still limits them")
            + f"; the same network trained on the full set for longer (section 3) reaches {pm(full['acc'])}%."]
