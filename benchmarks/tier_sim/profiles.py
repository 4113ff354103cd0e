"""Hardware profiles for the tier simulator: tier capacities and bandwidths of one node.

A profile describes one node: `devices` identical accelerators (each with on-chip
SRAM, device memory "HBM", and a link from host memory "DDR" into its HBM) and the
node's host memory. Sizes are decimal gigabytes (1 GB = 1e9 bytes) and bandwidths
decimal GB/s, the units the hardware papers and datasheets use. Every number carries
its source in the profile's `sources` mapping, which validation requires.

Profiles ship as YAML beside this module (`profiles/<name>.yaml`, read with
yaml.safe_load): `sn40l`, `dgx-h100`, `dgx-a100`, and `this-machine`, which
`measure_this_machine` writes from a numpy.copyto measurement of the local host.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.config import StrictModel, describe_pydantic_errors, read_yaml

GB = 1e9
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ProfileError(ValueError):
    """A hardware profile that cannot be used; the message names every problem."""


class DeviceSpec(StrictModel):
    """One accelerator of the node (an SN40L socket, one GPU, or a host arena on a CPU node)."""

    kind: str = Field(min_length=1, description="What the device is, in words.")
    sram_gb: float | None = Field(
        None, ge=0, description="Software-managed on-chip SRAM per device; None if not modelled."
    )
    hbm_gb: float = Field(gt=0, description="Device memory (HBM) per device, GB.")
    hbm_gb_per_s: float = Field(
        gt=0, description="Device memory read bandwidth, GB/s (bounds batch-1 decode speed)."
    )
    host_link_gb_per_s: float = Field(
        gt=0, description="Host memory (DDR) -> this device's HBM copy bandwidth, GB/s."
    )


class HardwareProfile(StrictModel):
    """One node's memory tiers, as the tier simulator models them."""

    name: str = Field(description="Profile name; lowercase letters, digits, '.', '_', '-'.")
    description: str = Field("", description="What this profile models, in words.")
    devices: int = Field(ge=1, description="Accelerators per node.")
    device: DeviceSpec = Field(description="The (identical) accelerator.")
    host_memory_gb: float = Field(
        gt=0, description="Host memory (DDR) of the whole node that can hold expert weights, GB."
    )
    node_host_to_device_gb_per_s: float | None = Field(
        None,
        gt=0,
        description="Cap on the node's aggregate DDR -> HBM bandwidth when several devices "
        "load at once, GB/s; None means devices x host_link_gb_per_s.",
    )
    expert_shards: int = Field(
        1,
        ge=1,
        description="Devices one expert is spread over (tensor-parallel degree); its shards "
        "load in parallel over that many host links. Must divide `devices`.",
    )
    hbm_reserved_gb: float = Field(
        0.0, ge=0, description="HBM per device kept for other uses (router, KV cache), GB."
    )
    sources: dict[str, str] = Field(
        description="Where each number comes from: field path (e.g. 'device.hbm_gb') -> citation."
    )

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if not PROFILE_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must match {PROFILE_NAME.pattern}")
        if self.devices % self.expert_shards:
            raise ValueError(
                f"expert_shards ({self.expert_shards}) must divide devices ({self.devices})"
            )
        if self.hbm_reserved_gb >= self.device.hbm_gb:
            raise ValueError(
                f"hbm_reserved_gb ({self.hbm_reserved_gb}) leaves no room in "
                f"device.hbm_gb ({self.device.hbm_gb})"
            )
        missing = [path for path in self.numbers_needing_sources() if path not in self.sources]
        if missing:
            raise ValueError(f"sources has no citation for {missing}")
        return self

    def numbers_needing_sources(self) -> list[str]:
        """Field paths whose values must be cited in `sources`."""
        paths = [
            "devices",
            "device.hbm_gb",
            "device.hbm_gb_per_s",
            "device.host_link_gb_per_s",
            "host_memory_gb",
            "expert_shards",
        ]
        if self.device.sram_gb is not None:
            paths.append("device.sram_gb")
        if self.node_host_to_device_gb_per_s is not None:
            paths.append("node_host_to_device_gb_per_s")
        if self.hbm_reserved_gb:
            paths.append("hbm_reserved_gb")
        return paths

    def with_shards(self, shards: int) -> HardwareProfile:
        """The same node with experts spread over `shards` devices (validated)."""
        data = self.model_dump()
        data["expert_shards"] = shards
        return parse_profile(data, f"{self.name} with expert_shards={shards}")

    @property
    def groups(self) -> int:
        """Independent device groups: each holds whole experts, split over its shards."""
        return self.devices // self.expert_shards

    @property
    def group_hbm_bytes(self) -> int:
        """Usable HBM bytes of one device group (experts' bytes it can hold)."""
        per_device = (self.device.hbm_gb - self.hbm_reserved_gb) * GB
        return int(per_device * self.expert_shards)

    @property
    def host_memory_bytes(self) -> int:
        return int(self.host_memory_gb * GB)

    @property
    def switch_bytes_per_s(self) -> float:
        """Bandwidth of one switch: the expert's shards load in parallel, each over its own
        host link, up to the node's aggregate cap."""
        parallel = self.expert_shards * self.device.host_link_gb_per_s
        if self.node_host_to_device_gb_per_s is not None:
            parallel = min(parallel, self.node_host_to_device_gb_per_s)
        return parallel * GB

    @property
    def decode_read_bytes_per_s(self) -> float:
        """HBM read bandwidth one expert's decode can use (all its shards together)."""
        return self.expert_shards * self.device.hbm_gb_per_s * GB


def parse_profile(data: Any, source: str = "<profile>") -> HardwareProfile:
    """Validate already-parsed profile data; ProfileError names each bad field and value."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as error:
        raise ProfileError(f"{source} is invalid:\n{describe_pydantic_errors(error)}") from None


def available_profiles() -> list[str]:
    """Names of the profiles shipped in PROFILE_DIR."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name (e.g. 'sn40l') or a YAML file by path."""
    candidate = Path(name_or_path).expanduser()
    is_name = isinstance(name_or_path, str) and PROFILE_NAME.match(name_or_path) is not None
    if is_name and not candidate.exists():
        candidate = PROFILE_DIR / f"{name_or_path}.yaml"
        if not candidate.exists():
            raise ProfileError(
                f"unknown profile {name_or_path!r}; shipped: {', '.join(available_profiles())} "
                "(or give a path to a YAML file)"
            )
    return parse_profile(read_yaml(candidate, ProfileError, "profile"), str(candidate))


def write_profile(profile: HardwareProfile, path: str | Path, header: str = "") -> Path:
    """Write `profile` as YAML (readable by load_profile), `header` as leading comments."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(profile.model_dump(), sort_keys=False, allow_unicode=True)
    target.write_text(comments + body, encoding="utf-8")
    return target


# --- measuring this machine ---------------------------------------------------------------


def host_memory_bytes() -> int:
    """Physical memory of this host: MemTotal from /proc/meminfo, else os.sysconf."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB = KiB
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def measure_copy_bytes_per_s(size_bytes: int, repeats: int = 5) -> float:
    """Median numpy.copyto rate between two preallocated, pre-faulted buffers (bytes/s).

    Both buffers are written once before timing so first-touch page faults, which
    would dominate a fresh buffer, are not charged to the copy.
    """
    if size_bytes <= 0 or repeats <= 0:
        raise ValueError(f"size_bytes and repeats must be positive, got {size_bytes}, {repeats}")
    source = np.ones(size_bytes, dtype=np.uint8)
    target = np.zeros(size_bytes, dtype=np.uint8)
    np.copyto(target, source)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - start)
    return size_bytes / float(np.median(seconds))


def measure_read_bytes_per_s(size_bytes: int, repeats: int = 5) -> float:
    """Median rate of reading a pre-faulted buffer once (a float32 dot product), bytes/s."""
    if size_bytes < 4 or repeats <= 0:
        raise ValueError(f"size_bytes >= 4 and repeats > 0 needed, got {size_bytes}, {repeats}")
    values = np.ones(size_bytes // 4, dtype=np.float32)
    float(np.dot(values, values))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(np.dot(values, values))
        seconds.append(time.perf_counter() - start)
    return values.nbytes / float(np.median(seconds))


def measure_this_machine(
    size_mib: int = 512, repeats: int = 5, arena_fraction: float = 0.25
) -> HardwareProfile:
    """A profile of this host, measured: one device whose "HBM" is a host arena.

    On a CPU-only node a switch is numpy.copyto from the object store into the arena,
    so the host link is the measured copy rate; the arena budget is a choice
    (`arena_fraction` of physical memory), not a hardware limit.
    """
    if not 0 < arena_fraction < 1:
        raise ValueError(f"arena_fraction must be in (0, 1), got {arena_fraction}")
    size = size_mib * 1024 * 1024
    copy_gb_s = measure_copy_bytes_per_s(size, repeats) / GB
    read_gb_s = measure_read_bytes_per_s(size, repeats) / GB
    memory_gb = host_memory_bytes() / GB
    cores = os.cpu_count() or 1
    when = time.strftime("%Y-%m-%d")
    method = f"measured {when} by benchmarks.tier_sim.profiles.measure_this_machine"
    return parse_profile(
        {
            "name": "this-machine",
            "description": f"This host ({cores} CPU cores): the device is a host arena in DRAM.",
            "devices": 1,
            "device": {
                "kind": "host arena (CPU-only node)",
                "sram_gb": None,
                "hbm_gb": round(memory_gb * arena_fraction, 3),
                "hbm_gb_per_s": round(read_gb_s, 2),
                "host_link_gb_per_s": round(copy_gb_s, 2),
            },
            "host_memory_gb": round(memory_gb, 3),
            "expert_shards": 1,
            "sources": {
                "devices": "one host arena per CPU node (the tiers design)",
                "device.hbm_gb": f"arena budget = {arena_fraction} x MemTotal (a choice)",
                "device.hbm_gb_per_s": f"{method}: float32 dot over {size_mib} MiB, "
                f"median of {repeats}",
                "device.host_link_gb_per_s": f"{method}: numpy.copyto {size_mib} MiB between "
                f"preallocated buffers, median of {repeats}",
                "host_memory_gb": f"{method}: MemTotal of /proc/meminfo",
                "expert_shards": "one device per node",
            },
        },
        "this-machine (measured)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tier_sim.profiles", description="Hardware profiles."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="names of the shipped profiles")
    show = commands.add_parser("show", help="print one profile as YAML")
    show.add_argument("profile", help="name or path")
    measure = commands.add_parser("measure", help="measure this host and write its profile")
    measure.add_argument("--out", default=str(PROFILE_DIR / "this-machine.yaml"))
    measure.add_argument("--size-mib", type=int, default=512)
    measure.add_argument("--repeats", type=int, default=5)
    measure.add_argument("--arena-fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(available_profiles()))
        elif args.command == "show":
            profile = load_profile(args.profile)
            print(yaml.safe_dump(profile.model_dump(), sort_keys=False), end="")
        else:
            print(f"measuring {args.size_mib} MiB x {args.repeats} ...", file=sys.stderr)
            profile = measure_this_machine(args.size_mib, args.repeats, args.arena_fraction)
            header = (
                "Measured on this host; every number's method is in `sources`.\n"
                "Rerun on a quiet machine: python -m benchmarks.tier_sim.profiles measure"
            )
            path = write_profile(profile, args.out, header)
            link = profile.device.host_link_gb_per_s
            print(f"wrote {path}: copy {link} GB/s, read {profile.device.hbm_gb_per_s} GB/s")
    except (ProfileError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
