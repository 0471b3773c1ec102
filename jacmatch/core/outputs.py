"""The logits of a model's output, whatever container the model returns it in.

jacmatch's own models return a tensor [B, k]. Others return a tuple (auxiliary heads),
a dict or a Hugging Face-style object with a ``logits`` field. :func:`logits_of` takes
the logits where they are unambiguous and otherwise stops with one line that names the
``output`` option (a key or an index) that chooses them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from ..errors import UsageError

__all__ = ["logits_of"]


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"a dict with keys {list(out)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


def logits_of(out: Any, output: str | int | None = None) -> Tensor:
    """The [B, k] logits in ``out``: ``output`` names them (a key, a field or an index);
    ``None`` takes a tensor as it is, a ``logits`` key or field, or the one 2-D tensor
    of a tuple."""
    if output is not None:
        try:
            if isinstance(output, int) or (isinstance(output, str) and output.lstrip("-").isdigit()):
                chosen = out[int(output)]
            elif isinstance(out, dict):
                chosen = out[output]
            else:
                chosen = getattr(out, output)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise UsageError(f"the model's output is {_describe(out)}: it has no {output!r} "
                             "(set model.output to a key, a field or an index it has)") from None
        return _check(chosen, f"output {output!r}")
    if isinstance(out, Tensor):
        return _check(out, "the model's output")
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out.keys():
            return _check(out["logits"], "output 'logits'")
    elif hasattr(out, "logits"):  # a named tuple or dataclass with a logits field
        return _check(out.logits, "output 'logits'")
    elif isinstance(out, (tuple, list)):
        matrices = [o for o in out if isinstance(o, Tensor) and o.dim() == 2]
        if len(matrices) == 1:
            return matrices[0]
    raise UsageError(f"the model returns {_describe(out)} and which part holds the logits is ambiguous: "
                     "set model.output (teacher_model.output for the teacher) to its key or index")


def _check(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise UsageError(f"{what} must be logits [B, k], got {shape}: set model.output to the part that is")
    return t
