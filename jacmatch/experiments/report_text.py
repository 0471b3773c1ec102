"""The report's small pieces of text: values with their spreads, tables by row and n,
choices made on validation, and paired differences over seeds."""

from __future__ import annotations

from collections.abc import Callable

from . import rows as R
from .common import CONVERGED_GAIN, converged
from .records import Cell, Section, Summary

__all__ = ["cores", "span", "chosen_values", "pm", "signed", "img", "missing", "table", "check_gain", "check_flag",
           "reached_text", "paired", "paired_by_n", "holds", "evidence", "verdict_of"]


def cores(*sections: dict | None) -> int | None:
    """The CPU cores of the machine the first of ``sections`` that names one ran on (its provenance)."""
    for s in sections:
        machine = ((s if isinstance(s, dict) else {}).get("provenance") or {}).get("machine") or {}
        if machine.get("cpus"):
            return int(machine["cpus"])
    return None


def span(classes: list[int]) -> str:
    """Classes as a reader says them: ``0–4`` for a run, else ``0, 2, 7``."""
    if len(classes) > 2 and list(classes) == list(range(classes[0], classes[0] + len(classes))):
        return f"{classes[0]}–{classes[-1]}"
    return ", ".join(map(str, classes))


def chosen_values(sel: dict, labels: tuple[tuple[str, str], ...]) -> str:
    """The values chosen on validation, in order, each with its validation scores, and
    whether the choice lies inside its grid (grown past an edge that won, when it did)."""
    def where(s: dict) -> str:
        if "inside" not in s:
            return ""
        grown = f"; grid grown past its edge to {', '.join(f'{v:g}' for v in s['extended'])}" if s["extended"] else ""
        if s["inside"]:
            return grown
        if s["extended"] and s["chosen"] == min(s["grid"]) and len(s["grid"]) > 1:
            return grown + "; **still at its low edge: the weight goes to 0, a natural bound (the term does not help " \
                           "on validation)**"
        return grown + "; **at the edge of its grid**"
    return "; ".join(f"{label} = {sel[key]['chosen']:g} (validation accuracy at n = {sel[key]['samples_per_class']}, "
                     f"seeds {sel[key]['seeds']}: "
                     + ", ".join(f"{float(k):g}: {100 * v:.1f}%" for k, v in sel[key]["val_acc"].items())
                     + where(sel[key]) + ")" for key, label in labels if key in sel)


def pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def signed(x: float, digits: int = 1) -> str:
    """A difference with its sign, ``+1.2`` or ``-0.3``; one that rounds to zero is ``0.0``,
    whichever side of zero it fell on (never ``-0.0`` or ``+0.0``)."""
    text = f"{x:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def img(folder: str, name: str) -> str:
    """A plot's link, relative to the report (written beside the results folder)."""
    return f"{folder}/{name}.png"


def missing(command: str) -> str:
    return f"*Not run yet: `{command}` writes this section's JSON.*\n"


def table(cells: dict, rows: list[str], ns: list, value) -> list[str]:
    """A markdown table of ``value(cell)`` per row and n ("—" where a cell has not run)."""
    lines = ["| row | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(value(cells[R.key(r, n)]) if R.key(r, n) in cells else "—" for n in ns)
                     + " |")
    return lines


def check_gain(cell: dict | None) -> str:
    return "—" if cell is None else f"{signed(cell['val_gain'])}{check_flag(cell['val_gain'])}"


def check_flag(val_gain: float) -> str:
    """A budget check's verdict, one-sided as the growth rule is: a baseline that gains
    CONVERGED_GAIN or more at twice its budget has not converged; one that loses as much is
    named too (it is not "within" the bound), but its budget did not hold it back."""
    if not converged(val_gain):
        return " **not converged**"
    return " (lower when trained longer)" if val_gain <= -CONVERGED_GAIN else ""


def reached_text(to: dict, count: dict | None) -> str:
    if not to or to.get("seconds") is None:
        return "not reached"
    seeds = f" ({count['reached']}/{count['seeds']})" if count else ""
    seconds = to["seconds"]["mean"]
    return f"{seconds:.{0 if seconds >= 10 else 1}f} s ({to['steps']['mean']:.0f} steps){seeds}"


def paired(a: list[float], b: list[float]) -> tuple[float, str]:
    """b minus a over seeds paired by index: the mean, and a text in points with the wins."""
    diff = [y - x for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    return mean, f"{signed(100 * mean)} ({sum(x > 0 for x in diff)}/{len(diff)} seeds)"


def paired_by_n(section: dict, a: str, b: str, metric: Callable[[Cell], Summary | None] = lambda c: c.acc
                ) -> list[tuple]:
    """(n, mean of b − a in points, seeds where b wins, seeds) for every n where both ran
    (``metric``: which summary of a cell, its test accuracy by default)."""
    record, out = Section.from_json("", section), []
    for n in sorted(at for at in record.at() if isinstance(at, int)):
        x, y = record.cell(a, n), record.cell(b, n)
        if x and y:
            mx, my = metric(x), metric(y)
            assert mx is not None and my is not None, f"{a} or {b} at n={n} lacks the compared quantity"
            diff = [q - p for p, q in zip(mx.values, my.values)]
            out.append((n, 100 * sum(diff) / len(diff), sum(v > 0 for v in diff), len(diff)))
    return out


def holds(mean: float, wins: int, seeds: int) -> bool:
    """A gain that holds: positive on average and in at least 4 of 5 seeds."""
    return mean > 0 and wins >= 0.8 * seeds


def evidence(pairs: list[tuple]) -> str:
    return ", ".join(f"n={n}: {signed(m)} ({w}/{k})" for n, m, w, k in pairs)


def verdict_of(pairs: list[tuple]) -> str:
    """Confirmed: b wins on average at every n, in at least 4 of 5 seeds each; partly: at some n; else not."""
    strong = [holds(m, w, k) for _, m, w, k in pairs]
    return "confirmed" if pairs and all(strong) else "partly confirmed" if any(strong) else "not confirmed"
