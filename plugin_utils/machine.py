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


# --- several nodes, as schedulers describe them -----------------------------------------------------------

DEFAULT_MAIN_PORT = 29500
# What a scheduler sets for a whole node (torchrun's names at node level), which must never reach the ranks'
# own launcher: accelerate sets them per rank, and a stray RANK or WORLD_SIZE makes a lone rank distributed.
NODE_LEVEL_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class Nodes:
    """The nodes of a multi-node run, from the scheduler's environment."""

    count: int
    rank: int
    main_ip: str
    main_port: int
    source: str  # the variables they came from
    # SLURM ran the task once for the whole allocation: it starts itself on every node with srun.
    needs_srun: bool = False


def _int(value: str | None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def slurm_hosts(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`node[01-03],gpu7`), expanded by `scontrol show hostnames` when it is here,
    else by the simple ranges."""
    exe = shutil.which("scontrol")
    if exe:
        try:
            out = subprocess.run(
                [exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
            ).stdout
            hosts = [line.strip() for line in out.splitlines() if line.strip()]
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass
    hosts: list[str] = []
    for part in _split_outside_brackets(nodelist):
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, _, ranges = part.partition("[")
        for item in ranges.rstrip("]").split(","):
            low, _, high = item.partition("-")
            if not high:
                hosts.append(prefix + low)
                continue
            hosts += [f"{prefix}{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p]


def nodes_from_env(env: dict[str, str] | None = None) -> Nodes | None:
    """Several nodes, as SkyPilot (SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS), SLURM (SLURM_NNODES,
    SLURM_NODEID, SLURM_JOB_NODELIST) or a torchrun-style launcher (MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES)
    describe them; None on a single node."""
    env = dict(os.environ if env is None else env)
    port = _int(env.get("MASTER_PORT")) or DEFAULT_MAIN_PORT
    count = _int(env.get("SKYPILOT_NUM_NODES"))
    if count and count > 1:
        ips = env.get("SKYPILOT_NODE_IPS", "").split()
        main_ip = ips[0] if ips else env.get("MASTER_ADDR", "")
        rank = _int(env.get("SKYPILOT_NODE_RANK")) or 0
        return Nodes(count, rank, main_ip, port, "SkyPilot (SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS)")
    count = _int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES"))
    if count and count > 1:
        hosts = slurm_hosts(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        main_ip = env.get("MASTER_ADDR") or (hosts[0] if hosts else "")
        # Inside a job step (ours through srun, or the user's own) each node runs us once; in the batch script
        # we run once for the whole allocation.
        in_step = bool(env.get("SLURM_STEP_ID")) or env.get("SFT_UNDER_SRUN") == "1"
        rank = _int(env.get("SLURM_NODEID")) or 0
        return Nodes(count, rank, main_ip, port, "SLURM (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST)", not in_step)
    count = _int(env.get("NNODES") or env.get("NUM_NODES"))
    if count is None and env.get("NODE_RANK") is not None:
        count = _int(env.get("WORLD_SIZE"))  # node-level, as SkyPilot-style launchers set it beside NODE_RANK
    if count and count > 1 and env.get("MASTER_ADDR"):
        rank = _int(env.get("NODE_RANK")) or 0
        return Nodes(count, rank, env["MASTER_ADDR"], port, "MASTER_ADDR, MASTER_PORT, NODE_RANK")
    return None
