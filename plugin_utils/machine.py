"""What this machine offers, found without importing torch: GPUs (NVML, else nvidia-smi), packages, free disk."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Gpu:
    index: int  # as nvidia-smi numbers GPUs; a MIG device has its GPU's
    name: str
    memory_mib: int
    compute_capability: float
    uuid: str = ""  # GPU-...; a MIG device's MIG-...
    # A MIG device: its GPU's uuid and "<GPU instance>/<compute instance>" (CUDA's older MIG-GPU-<uuid>/gi/ci name).
    parent_uuid: str = ""
    instance: str = ""
    # A GPU in MIG mode is used only through its MIG devices.
    mig_mode: bool = False
    mig_devices: tuple[Gpu, ...] = ()
    # Free memory when it was read (another process may hold some); None when unknown.
    free_mib: int | None = None

    @property
    def available_mib(self) -> int:
        """The memory this run can count on: the free memory when known, else the total."""
        return self.memory_mib if self.free_mib is None else min(self.free_mib, self.memory_mib)

    @property
    def ampere_or_newer(self) -> bool:
        return self.compute_capability >= 8.0

    @property
    def supports_bf16(self) -> bool:
        return self.ampere_or_newer

    @property
    def is_mig(self) -> bool:
        return bool(self.parent_uuid)


def _matching(entry: str, gpus: list[Gpu]) -> Gpu | None:
    """The GPU one CUDA_VISIBLE_DEVICES entry names, as CUDA reads it: an index, a GPU- UUID or a prefix of one
    that only one GPU has, a MIG- id (or a unique prefix), or the older MIG-GPU-<uuid>/<gi>/<ci>; None if none."""
    if entry.isdigit():
        return next((g for g in gpus if g.index == int(entry)), None)
    if entry.startswith("MIG-GPU-") and "/" in entry:
        parent, _, instance = entry.removeprefix("MIG-").partition("/")
        found = [m for g in gpus for m in g.mig_devices if (m.parent_uuid, m.instance) == (parent, instance)]
    elif entry.startswith("MIG-"):
        found = [m for g in gpus for m in g.mig_devices if m.uuid.startswith(entry)]
    elif entry.startswith("GPU-"):
        found = [g for g in gpus if g.uuid.startswith(entry)]
    else:
        found = []
    return found[0] if len(found) == 1 else None


@dataclass
class Machine:
    gpus: list[Gpu] = field(default_factory=list)
    # CUDA_VISIBLE_DEVICES's entries as written (indices, GPU- UUIDs or prefixes, MIG- ids), up to a -1 that
    # hides the rest; None when unset.
    visible: list[int | str] | None = None
    cpu_count: int = 1
    ram_bytes: float | None = None

    def _named(self) -> tuple[list[tuple[str, Gpu]], str]:
        """The devices CUDA gives this process, in its order, each with the CUDA_VISIBLE_DEVICES entry that names
        it; and the first entry that names no GPU here ('' if none), where CUDA stops reading the list."""
        unknown = ""
        if self.visible is None:
            listed = [(str(g.index), g) for g in self.gpus]
        else:
            listed = []
            for entry in map(str, self.visible):
                gpu = _matching(entry, self.gpus)
                if gpu is None:
                    unknown = entry
                    break
                if all(gpu != seen for _, seen in listed):
                    listed.append((entry, gpu))
        named, mig_taken = [], False
        for entry, gpu in listed:
            devices = [(m.uuid, m) for m in gpu.mig_devices] if gpu.mig_mode else [(entry, gpu)]
            for name, device in devices:
                # CUDA gives one process one MIG device at most: the first it is shown.
                if device.is_mig and mig_taken:
                    continue
                mig_taken = mig_taken or device.is_mig
                named.append((name, device))
        return named, unknown

    @property
    def usable_gpus(self) -> list[Gpu]:
        return [gpu for _, gpu in self._named()[0]]

    @property
    def unknown_visible(self) -> str:
        """The first CUDA_VISIBLE_DEVICES entry that names no GPU here ('' if none): CUDA hides the GPUs listed
        from it on."""
        return self._named()[1]

    def cuda_id(self, gpu: Gpu) -> str:
        """How a rank's CUDA_VISIBLE_DEVICES names this GPU: as this process's own names it (a UUID stays that
        UUID), a MIG device by its id, else by its index."""
        named = next((name for name, device in self._named()[0] if device == gpu), "")
        return named or (gpu.uuid if gpu.is_mig else str(gpu.index))


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def package_version(distribution: str) -> tuple[int, ...] | None:
    """An installed distribution's release as numbers ((0, 50, 2)), read from its metadata without importing it;
    None when it is not installed."""
    from importlib import metadata  # imported by the rules that ask, not by every `--check`

    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_gpu(nvml, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    gpu = Gpu(
        index,
        _text(nvml.nvmlDeviceGetName(handle)),
        memory.total // 2**20,
        float(f"{major}.{minor}"),
        _text(nvml.nvmlDeviceGetUUID(handle)),
        free_mib=memory.free // 2**20,
    )
    try:
        mig_on = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # a GPU without MIG
        return gpu
    if not mig_on:
        return gpu
    devices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # an empty slot
            continue
        instance = f"{nvml.nvmlDeviceGetGpuInstanceId(mig)}/{nvml.nvmlDeviceGetComputeInstanceId(mig)}"
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        devices.append(
            Gpu(
                index,
                _text(nvml.nvmlDeviceGetName(mig)),
                memory.total // 2**20,
                gpu.compute_capability,
                _text(nvml.nvmlDeviceGetUUID(mig)),
                parent_uuid=gpu.uuid,
                instance=instance,
                free_mib=memory.free // 2**20,
            )
        )
    return replace(gpu, mig_mode=True, mig_devices=tuple(devices))


# What a loaded NVIDIA driver makes (the control device; WSL's GPU device; the driver's /proc folder, also seen
# inside containers): without any of them NVML has nothing to find.
DRIVER_FILES = ("/dev/nvidiactl", "/dev/dxg", "/proc/driver/nvidia")


def _nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA driver can be there. Asked before NVML, whose import and failed start (no driver
    library) are most of what `--check` spends on a machine without GPUs; elsewhere than Linux, NVML answers."""
    return not sys.platform.startswith("linux") or any(os.path.exists(path) for path in DRIVER_FILES)


def _query_nvml() -> list[Gpu] | None:
    """The GPUs as NVML (nvidia-ml-py) reports them; None when it cannot: no driver, not installed, or no driver
    library."""
    if not _nvidia_driver_loaded():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        return [_nvml_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _nvidia_smi(exe: str, *args: str) -> str:
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# `nvidia-smi -L`'s lines for a GPU and for its MIG devices.
_GPU_LINE = re.compile(r"^GPU (\d+):.*\(UUID: (GPU-[^)\s]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+:\s+\(UUID: (MIG-[^)\s]+)\)")
_PROFILE_GB = re.compile(r"(\d+)gb$")


def _mig_devices_from_smi(exe: str, gpus: list[Gpu]) -> list[Gpu]:
    """The MIG devices `nvidia-smi -L` lists under the GPUs in MIG mode. Their memory is the nominal size their
    profile names (1g.10gb: 10 GB), within a few percent of NVML's figure."""
    by_index = {g.index: g for g in gpus}
    found: dict[int, list[Gpu]] = {}
    parent = None
    for line in _nvidia_smi(exe, "-L").splitlines():
        if match := _GPU_LINE.match(line):
            parent = by_index.get(int(match.group(1)))
        elif (match := _MIG_LINE.match(line)) and parent is not None and parent.mig_mode:
            profile, uuid = match.groups()
            size = _PROFILE_GB.search(profile)
            memory = int(size.group(1)) * 1000 if size else parent.memory_mib
            name = f"{parent.name} MIG {profile}"
            mig = Gpu(parent.index, name, memory, parent.compute_capability, uuid, parent_uuid=parent.uuid)
            found.setdefault(parent.index, []).append(mig)
    return [replace(g, mig_devices=tuple(found.get(g.index, ()))) if g.mig_mode else g for g in gpus]


def _query_nvidia_smi() -> list[Gpu]:
    """The GPUs as nvidia-smi reports them; none when it is missing or fails (no driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    fields = "index,name,memory.total,compute_cap,uuid,mig.mode.current,memory.free"
    out = _nvidia_smi(exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits")
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            gpu = Gpu(int(parts[0]), parts[1], int(float(parts[2])), float(parts[3]), parts[4])
        except ValueError:
            continue
        free = int(float(parts[6])) if len(parts) > 6 and parts[6].replace(".", "", 1).isdigit() else None
        gpus.append(replace(gpu, mig_mode=len(parts) > 5 and parts[5] == "Enabled", free_mib=free))
    return _mig_devices_from_smi(exe, gpus) if any(g.mig_mode for g in gpus) else gpus


def _visible_devices() -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES's entries, up to the first -1 (or empty entry): CUDA shows nothing from there on."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries: list[int | str] = []
    for part in raw.split(","):
        part = part.strip()
        if not part or re.fullmatch(r"-\d+", part):
            break
        entries.append(int(part) if part.isdigit() else part)
    return entries


def _ram_bytes() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def detect_gpus() -> list[Gpu]:
    """Every GPU here: from NVML, else from nvidia-smi; none without a driver."""
    found = _query_nvml()
    return _query_nvidia_smi() if found is None else found


def detect() -> Machine:
    return Machine(
        gpus=detect_gpus(), visible=_visible_devices(), cpu_count=os.cpu_count() or 1, ram_bytes=_ram_bytes()
    )


GIB = 2**30


def existing_parent(path: str) -> str:
    """The path, or its nearest parent that exists (a folder not made yet is on its parent's disk)."""
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def free_disk_gib(path: str) -> float:
    return shutil.disk_usage(existing_parent(path)).free / GIB


def filesystem(path: str) -> int:
    """The filesystem a path is (or would be) on: folders on the same one share its free space."""
    return os.stat(existing_parent(path)).st_dev


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


def preparation_processes() -> list:
    """This process's children that prepare data (a worker pool and its manager), as psutil processes: those in
    its own session. The ranks, started while the data is prepared, run in a session of their own."""
    import psutil

    session = os.getsid(0)
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(child.pid) == session:
                found.append(child)
    return found
