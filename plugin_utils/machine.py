"""What this machine offers, found without importing torch: GPUs (nvidia-smi), packages, free disk."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int
    compute_capability: float

    @property
    def ampere_or_newer(self) -> bool:
        return self.compute_capability >= 8.0

    @property
    def supports_bf16(self) -> bool:
        return self.ampere_or_newer


@dataclass
class Machine:
    gpus: list[Gpu] = field(default_factory=list)
    # What CUDA_VISIBLE_DEVICES allows, as nvidia-smi indices; None when unset.
    visible: list[int] | None = None
    cpu_count: int = 1
    ram_bytes: float | None = None

    @property
    def usable_gpus(self) -> list[Gpu]:
        if self.visible is None:
            return list(self.gpus)
        by_index = {g.index: g for g in self.gpus}
        return [by_index[i] for i in self.visible if i in by_index]


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _query_nvidia_smi() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2])), float(parts[3])))
        except ValueError:
            continue
    return gpus


def _visible_devices() -> list[int] | None:
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    ids = []
    for part in raw.split(","):
        part = part.strip()
        if part.isdigit():
            ids.append(int(part))
        elif part:
            # UUID-style entries (GPU-...) or -1 hide the rest; keep what we understood.
            break
    return ids


def _ram_bytes() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def detect() -> Machine:
    return Machine(
        gpus=_query_nvidia_smi(), visible=_visible_devices(), cpu_count=os.cpu_count() or 1, ram_bytes=_ram_bytes()
    )


def free_disk_gib(path: str) -> float:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free / 2**30
