"""Device profiles, the simulated clock and the memory check.

A profile says what a device can do: memory budget, sustained compute, link speeds,
availability (probability it is reachable in a round) and mid-round dropout. A client's
simulated round time is its measured work scaled to the device plus its transfer time:

    t = host_seconds * host_gflops / device_gflops + 8 * bytes_down / down_bps
        + 8 * bytes_up / up_bps

`host_gflops` is this machine's sustained rate (about 140 GFLOP/s fp32 on the 2-core
build machines, measured on SmolLM2-135M forward passes; see shared/data/README.md).

Built-in profile numbers are order-of-magnitude figures from public specs; the source of
each is in its comment. Users define their own in YAML (a list of mappings with the
`DeviceProfile` fields, or `{fleet: [...]}`) and pass the file with --fleet.

A profile's `runtime` says how the device runs its forward passes: "" is PyTorch, "ort"
or "executorch" an exported graph (the run's `fed.export`) in that runtime, which has no
backward, so such a device trains zo or prge only (`choose_method` skips fo for it).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import yaml

from edgetune.errors import ConfigError
from edgetune.ondevice.runtime import RUNTIMES
from edgetune.train.memory import affordable, method_memory_mb


@dataclass(frozen=True)
class DeviceProfile:
    """What one kind of device can do."""

    name: str
    memory_mb: float  # memory the fine-tuning process may use
    gflops: float  # sustained fp32 GFLOP/s on transformer matmuls
    up_mbps: float  # uplink, megabits per second
    down_mbps: float  # downlink, megabits per second
    availability: float = 1.0  # probability of being reachable in a round
    dropout: float = 0.0  # probability of vanishing mid-round
    lora_rank: int = 0  # LoRA rank it trains with fed.ranks=device (0: the global rank)
    runtime: str = ""  # "" = PyTorch; ort | executorch = the export in fed.export

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(
                f"device profile name: expected a non-empty string, got {self.name!r}"
            )
        for name in ("memory_mb", "gflops", "up_mbps", "down_mbps"):
            _check_number(self.name, name, getattr(self, name), low=0.0, low_open=True)
        _check_number(
            self.name, "availability", self.availability, low=0.0, low_open=True, high=1.0
        )
        _check_number(self.name, "dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if (
            isinstance(self.lora_rank, bool)
            or not isinstance(self.lora_rank, int)
            or self.lora_rank < 0
        ):
            raise ConfigError(
                f"device {self.name!r}: lora_rank: expected an integer >= 0 (0 = the global "
                f"rank), got {self.lora_rank!r}"
            )
        if self.runtime != "" and self.runtime not in RUNTIMES:
            raise ConfigError(
                f"device {self.name!r}: runtime: expected '' (PyTorch) or one of "
                f"{', '.join(RUNTIMES)}, got {self.runtime!r}; fix the profile in the fleet YAML"
            )


def _check_number(
    device: str,
    field: str,
    value: object,
    low: float,
    low_open: bool = False,
    high: float = math.inf,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless `value` is a finite number in the given range."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    expected = f"> {low:g}" if high == math.inf else f"in {lo}{low:g}, {high:g}{hi}"
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        raise ConfigError(
            f"device {device!r}: {field}: expected a number {expected}, got {value!r}; fix the "
            f"profile in the fleet YAML"
        )


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    # Raspberry Pi 5 (8 GB): 4x Cortex-A76 @ 2.4 GHz, NEON peak ~150 GFLOP/s fp32
    # (4 cores x 2.4 GHz x 16 FLOP/cycle); ~30 sustained in PyTorch GEMM. Home Wi-Fi.
    "rpi5": DeviceProfile("rpi5", 6000, 30, 20, 100, 0.9, 0.05, 4),
    # Jetson Orin Nano 8 GB: 1024-core Ampere GPU, ~1.3 TFLOP/s fp32 peak (NVIDIA
    # datasheet); memory shared with the CPU, ~5 GB usable. Wired or Wi-Fi.
    "jetson-orin-nano": DeviceProfile("jetson-orin-nano", 5000, 600, 50, 200, 0.95, 0.02, 8),
    # Jetson AGX Orin 64 GB: 2048-core Ampere GPU, ~5.3 TFLOP/s fp32 peak (datasheet).
    "jetson-agx-orin": DeviceProfile("jetson-agx-orin", 48000, 2500, 100, 500, 0.98, 0.01),
    # Mid-range phone (Snapdragon 7-class): ~60 GFLOP/s sustained on CPU; an app may use
    # ~2 GB; LTE uplink ~10 Mbit/s, downlink ~50 Mbit/s; often unreachable (charging/idle).
    "phone-midrange": DeviceProfile("phone-midrange", 2000, 60, 10, 50, 0.7, 0.1, 2),
}

# `lora_rank` above (2 phone, 4 Pi, 8 Orin Nano, global for AGX Orin) is what each trains
# with fed.ranks=device: smaller devices train smaller adapters (HetLoRA's setting).

# Named fleets: the mix of profiles, cycled over the clients.
BUILTIN_FLEETS: dict[str, list[str]] = {
    "mixed": ["phone-midrange", "rpi5", "jetson-orin-nano", "phone-midrange", "jetson-agx-orin"],
    "phones": ["phone-midrange"],
    "jetsons": ["jetson-orin-nano", "jetson-agx-orin"],
    "uniform": ["jetson-orin-nano"],
}


def load_fleet(spec: str, num_clients: int) -> list[DeviceProfile]:
    """One profile per client, from a built-in fleet/profile name or a YAML file."""
    if spec in BUILTIN_FLEETS:
        names = BUILTIN_FLEETS[spec]
        profiles = [BUILTIN_PROFILES[n] for n in names]
    elif spec in BUILTIN_PROFILES:
        profiles = [BUILTIN_PROFILES[spec]]
    elif Path(spec).is_file():
        profiles = _read_yaml(Path(spec))
    elif spec.endswith((".yaml", ".yml")) or "/" in spec:
        raise ConfigError(
            f"fleet file {spec} does not exist; pass an existing YAML file or a built-in "
            f"fleet ({', '.join(BUILTIN_FLEETS)})"
        )
    else:
        raise ConfigError(
            f"fleet {spec!r} is not a built-in fleet ({', '.join(BUILTIN_FLEETS)}), a profile "
            f"({', '.join(BUILTIN_PROFILES)}) or a YAML file"
        )
    return [profiles[i % len(profiles)] for i in range(num_clients)]


def device_profile(name: str, fleet: str, client: int, num_clients: int) -> DeviceProfile:
    """The profile a real device declares (`device=NAME` in its node config): a built-in
    profile or one of the fleet YAML's; without a name, the fleet's profile for `client`."""
    if not name:
        return load_fleet(fleet, num_clients)[client]
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name]
    if Path(fleet).is_file():
        for profile in _read_yaml(Path(fleet)):
            if profile.name == name:
                return profile
    raise ConfigError(
        f"device {name!r} is neither a built-in profile ({', '.join(BUILTIN_PROFILES)}) nor in "
        f"the fleet {fleet!r}; fix the SuperNode's --node-config device=..."
    )


def _read_yaml(path: Path) -> list[DeviceProfile]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"fleet file {path} is not UTF-8 text ({exc.reason}); re-save it"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"fleet file {path} is not valid YAML ({exc}); it may be cut short: fix it, or "
            "pass a built-in fleet (e.g. --fleet mixed)"
        ) from None
    if data is None:
        raise ConfigError(
            f"fleet file {path} is empty; list device profiles in it (fleet: [...]) or pass "
            "a built-in fleet (e.g. --fleet mixed)"
        )
    items = data.get("fleet") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(
            f"fleet file {path}: the fleet is a {type(items).__name__}, not a list of device "
            "profiles; write fleet: followed by one '- {name: ..., memory_mb: ...}' per device"
        )
    if not items:
        raise ConfigError(
            f"fleet file {path}: the list of device profiles is empty; give at least one"
        )
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item in BUILTIN_PROFILES:
            out.append(BUILTIN_PROFILES[item])
            continue
        try:
            out.append(DeviceProfile(**_profile_fields(item)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: profile {i}: {exc}") from None
    return out


def _profile_fields(item: object) -> dict:
    """The fields of one YAML profile, or ConfigError naming unknown or missing ones."""
    valid = [f.name for f in fields(DeviceProfile)]
    required = [f.name for f in fields(DeviceProfile) if f.default is MISSING]
    if not isinstance(item, dict):
        raise ConfigError(
            f"expected a built-in profile name ({', '.join(BUILTIN_PROFILES)}) or a mapping "
            f"with the fields {', '.join(valid)}, got {item!r}"
        )
    for key in item:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown field {key!r}{hint}; valid fields: {', '.join(valid)}")
    missing = [name for name in required if name not in item]
    if missing:
        raise ConfigError(
            f"missing {', '.join(missing)}; every profile needs {', '.join(required)}"
        )
    return item


def round_seconds(
    profile: DeviceProfile, host_seconds: float, bytes_down: int, bytes_up: int, host_gflops: float
) -> float:
    """Simulated wall time of one client's round (see the module docstring)."""
    compute = host_seconds * host_gflops / profile.gflops
    transfer = 8 * bytes_down / (profile.down_mbps * 1e6) + 8 * bytes_up / (profile.up_mbps * 1e6)
    return compute + transfer


def choose_method(
    profile: DeviceProfile, num_params: int, requested: str, backprop_share: float = 1.0
) -> str | None:
    """The method this device runs: `requested` if it fits; with "auto" the cheapest
    that fits, preferring backprop (fo, through `backprop_share` of the blocks) then
    P-RGE then sequential ZO (a device with a runtime has no backward: P-RGE then ZO);
    None if nothing."""
    if requested == "auto":
        return affordable(num_params, profile.memory_mb, backprop_share, not profile.runtime)
    fits = method_memory_mb(num_params, requested, backprop_share) <= profile.memory_mb
    return requested if fits else None


def client_ranks(spec: str, fleet: list[DeviceProfile], global_rank: int) -> list[int | None]:
    """Each client's LoRA rank from `fed.ranks` (None = the global rank).

    Args:
        spec: "" (all global), "device" (each profile's lora_rank), or "r1,r2,..." cycled.
        fleet: one profile per client.
        global_rank: peft.rank, the rank of the server's adapter.
    """
    if not spec:
        return [None] * len(fleet)
    if spec == "device":
        ranks = [min(p.lora_rank, global_rank) if p.lora_rank else global_rank for p in fleet]
    else:
        try:
            cycle = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ConfigError(
                f"fed.ranks={spec!r}: expected 'device' or comma-separated ranks like 2,4,8"
            ) from None
        bad = [r for r in cycle if not 1 <= r <= global_rank]
        if bad:
            raise ConfigError(
                f"fed.ranks: {bad} outside 1..peft.rank={global_rank}; the server adapter has "
                "rank peft.rank, so set peft.rank to the largest client rank"
            )
        ranks = [cycle[i % len(cycle)] for i in range(len(fleet))]
    return [None if r == global_rank else r for r in ranks]


def describe(profile: DeviceProfile) -> dict:
    """A profile as a plain dict (for metrics and reports)."""
    return asdict(profile)
