"""The result files as typed records: a :class:`Section` (one ``results/paper/NAME.json``)
holds :class:`Cell` s by (row, at), each holding :class:`Summary` s over seeds.

Each record round-trips through JSON: ``Section.from_json(name, d).to_json() == d``, key
order included, for every committed section (a test holds it). The sections write dicts
and the report reads records: a cell is found by its row name and where it was measured
(:mod:`.rows`), never by a key spelled in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import rows as R

__all__ = ["Summary", "Cell", "Section"]


@dataclass(frozen=True)
class Summary:
    """A quantity over seeds: mean, sample std, 95% Student-t half-width, count, the values."""

    mean: float
    std: float
    ci95: float
    n: int
    values: list

    @classmethod
    def from_json(cls, d: dict) -> Summary:
        return cls(d["mean"], d["std"], d["ci95"], d["n"], list(d["values"]))

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "ci95": self.ci95, "n": self.n, "values": list(self.values)}


@dataclass
class Cell:
    """One row measured at one place (samples per class, or a training set)."""

    row: str
    at: Any
    fields: dict = field(default_factory=dict)  # every other field, as the section wrote it

    def summary(self, name: str) -> Summary | None:
        """The summary ``name`` (``acc``, ``val_acc``, ...), or None where the cell has none."""
        value = self.fields.get(name)
        return Summary.from_json(value) if isinstance(value, dict) and "mean" in value else None

    @property
    def acc(self) -> Summary:
        summary = self.summary("acc")
        assert summary is not None, f"cell {self.row} at {self.at} has no accuracy"
        return summary

    def noisy_acc(self, sigma: str) -> Summary | None:
        """The accuracy under test noise ``sigma`` (as the section names it: "0.3")."""
        value = (self.fields.get("noisy_acc") or {}).get(sigma)
        return Summary.from_json(value) if value is not None else None

    def to_json(self) -> dict:
        return dict(self.fields)


def _at(text: str):
    """Where a cell was measured, from its key: samples per class as a number, else the name."""
    return int(text) if text.isdigit() else text


@dataclass
class Section:
    """One section's result file: its cells by (row, at), and every other field (in the
    file's order, the cells where the file has them)."""

    name: str
    cells: dict[tuple[str, Any], Cell]
    fields: dict = field(default_factory=dict)

    def cell(self, row: str, at) -> Cell | None:
        return self.cells.get((row, at))

    def at(self) -> list:
        """Where the cells were measured, in order (samples per class, or training sets)."""
        return list(dict.fromkeys(at for _, at in self.cells))

    def rows(self) -> list[str]:
        return list(dict.fromkeys(row for row, _ in self.cells))

    @classmethod
    def from_json(cls, name: str, d: dict) -> Section:
        cells = {}
        for key, value in (d.get("cells") or {}).items():
            row, at = R.split_key(key)
            cells[(row, _at(at))] = Cell(row, _at(at), dict(value))
        return cls(name, cells, {k: (None if k == "cells" else v) for k, v in d.items()})

    def to_json(self) -> dict:
        return {k: ({R.key(row, at): c.to_json() for (row, at), c in self.cells.items()} if k == "cells" else v)
                for k, v in self.fields.items()}
