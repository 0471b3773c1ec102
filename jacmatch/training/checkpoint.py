"""Checkpoints: atomic, checksummed, versioned, loaded without unpickling code.

File layout: a magic line, a JSON header line (format, versions, payload size and
SHA-256), then the payload written by ``torch.save``. The SHA-256 covers the header's
other fields (as canonical JSON) and the payload, so an edited version is caught like an
edited weight (format 1, before this, hashed the payload only; it is still read).
Loading checks the magic, the format, the size and the hash before anything is
deserialised, and then deserialises with ``torch.load(weights_only=True)``, which builds
tensors and plain containers only. A truncated, altered, foreign or newer-format file is
refused with a clear message; one written by another jacmatch version loads with a
:class:`VersionWarning`.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic
from ..errors import UsageError

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "VersionWarning", "MAGIC"]

MAGIC = b"JACMATCH-CHECKPOINT\n"
FORMAT = 2
READS = (1, 2)  # the formats this version reads


class VersionWarning(UserWarning):
    """A checkpoint written by another jacmatch version (it loads)."""


def _digest(fields: dict, payload: bytes) -> str:
    """SHA-256 of the header's fields (canonical JSON) and the payload."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + b"\n" + payload).hexdigest()


class CheckpointError(UsageError):
    """A checkpoint that cannot be used."""


def _versions() -> dict:
    from .. import __version__
    return {"jacmatch": __version__, "torch": torch.__version__, "python": platform.python_version()}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    fields = {"format": FORMAT, "versions": _versions(), "size": len(payload)}
    header = {**fields, "sha256": _digest(fields, payload)}

    def write(f):
        f.write(MAGIC)
        f.write(json.dumps(header).encode() + b"\n")
        f.write(payload)
    write_atomic(path, write, mode="wb")


def read_header(path: str | Path) -> dict:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CheckpointError(f"{path} is not a jacmatch checkpoint (bad magic): pass a file written by jacmatch")
        line = f.readline(4096)
    try:
        header = json.loads(line)
        assert isinstance(header, dict) and {"format", "size", "sha256"} <= set(header)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{path} has a corrupt header: the file is damaged") from None
    return header


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    header = read_header(path)
    if header["format"] not in READS:
        newer = isinstance(header["format"], int) and header["format"] > FORMAT
        raise CheckpointError(f"{path} has checkpoint format {header['format']!r}, this jacmatch reads formats "
                              f"{', '.join(map(str, READS))}" + (": upgrade jacmatch to read it" if newer else ""))
    with open(path, "rb") as f:
        f.seek(len(MAGIC))
        f.readline(4096)
        payload = f.read(int(header["size"]) + 1)
    if len(payload) != header["size"]:
        raise CheckpointError(f"{path} is truncated ({len(payload)} of {header['size']} bytes): "
                              "use an earlier checkpoint or retrain")
    fields = {k: v for k, v in header.items() if k != "sha256"}
    expected = hashlib.sha256(payload).hexdigest() if header["format"] == 1 else _digest(fields, payload)
    if expected != header["sha256"]:
        raise CheckpointError(f"{path} fails its checksum: the file was altered or damaged")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read safely ({type(exc).__name__}): {exc}") from None
    versions = header.get("versions") if isinstance(header.get("versions"), dict) else {}
    from .. import __version__
    if versions.get("jacmatch") != __version__:
        warnings.warn(f"{path} was written by jacmatch {versions.get('jacmatch', 'of unknown version')}, "
                      f"this is {__version__}: it loads; results may differ where the code changed",
                      VersionWarning, stacklevel=2)
    state["_versions"] = versions
    return state
