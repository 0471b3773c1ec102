"""Where a result came from: versions, platform, machine, git commit, config and data hashes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["provenance", "machine", "git_commit", "config_sha256", "file_sha256"]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout jacmatch runs from (with ``+dirty`` when it has
    uncommitted changes); None for an installed package. Read once per process: the CLI
    reads it at start, so a long run records the code it loaded, not a later commit."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    """SHA-256 of a resolved config, as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:  # Linux names the processor here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict:
    """The hardware a number was measured on. The same code and seed give bit-identical
    weights on one machine, not across processors: kernels differ by instruction set
    (``cpu_capability``) and by thread count, so a record says which it had."""
    info = {"processor": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def provenance(config: dict | None, data_sha256: str | list | None,
               device: torch.device | str | None = None) -> dict:
    """The provenance keys every result file carries. ``data_sha256``: the hash of the
    data a run read (``DataSplits.data_sha256``: every image and label loaded), or
    the list of distinct hashes of a section's runs; ``device``: the one it ran on."""
    from .. import __version__
    return {"jacmatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "machine": machine(device), "git_commit": git_commit(),
            "config_sha256": config_sha256(config) if config is not None else None, "data_sha256": data_sha256}
