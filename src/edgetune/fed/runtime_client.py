"""A federated client that trains through an exported runtime instead of PyTorch.

A device whose profile names a runtime (`DeviceProfile.runtime`: ort | executorch) runs
its forward passes in the graph of the run's export folder (`fed.export`, made by
`edgetune export --lora-rank R` or `--adapter DIR`), whose LoRA tensors are graph inputs.
`RuntimeLink.attach` wraps the client's PEFT adapter in a `RuntimeAdapter` whose tensors
are detached views of the adapter's own LoRA parameters (same storage, slot order, A then
B), so the ZO estimators perturb and update exactly the tensors a PyTorch client would,
in the same order with the same seeds: the uploaded traces, the deltas and everything the
algorithms do downstream are a PyTorch client's, up to the runtime's float rounding.

The graph must be the federation's adapter: `check_export` compares the export's slots
(module, shape, scaling) with the PEFT adapter's LoRA layers before any training. A
session is opened once per process per (format, file, threads), not per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.export.graph import LoraSlot, slots_from_peft
from edgetune.export.manifest import ExportManifest, read_manifest
from edgetune.ondevice.adapter import LORA_METHODS, RuntimeAdapter, build_adapter
from edgetune.ondevice.runtime import RUNTIMES, RuntimeLM, Session, open_session
from edgetune.peft import Adapter

_SESSIONS: dict[tuple[str, str, int], Session] = {}


def cached_session(fmt: str, path: Path, threads: int) -> Session:
    """The runtime session for `path`, opened on first use in this process."""
    key = (fmt, str(Path(path).resolve()), threads)
    if key not in _SESSIONS:
        _SESSIONS[key] = open_session(fmt, path, threads)
    return _SESSIONS[key]


@dataclass(frozen=True)
class RuntimeLink:
    """How a runtime device computes its forward passes.

    Attributes:
        runtime: ort | executorch.
        folder: the export folder (`fed.export`).
        manifest: its export.json, already checked against the federation's adapter.
        threads: the runtime's intra-op threads.
    """

    runtime: str
    folder: Path
    manifest: ExportManifest
    threads: int

    def attach(self, adapter: Adapter) -> RuntimeAdapter:
        """A RuntimeAdapter over `adapter`'s LoRA parameters (shared storage), whose
        model is the runtime; build it after the round's tensors are in place (HetLoRA's
        `at_rank` swaps parameters)."""
        params = dict(adapter.model.named_parameters())
        tensors = {
            name: params[name].detach()
            for slot in self.manifest.slots
            for name in (slot.peft_a, slot.peft_b)
        }
        session = cached_session(
            RUNTIMES[self.runtime], self.folder / self.manifest.files["graph"], self.threads
        )
        model = RuntimeLM(session, self.manifest, list(tensors.values()))
        trained = build_adapter(model, adapter.method, tensors, self.manifest.peft_config or {})
        if trained.names != adapter.names:  # directions are drawn tensor by tensor in order
            raise EdgetuneError(
                f"the runtime adapter's tensors {trained.names[:2]}... are not the PEFT "
                f"adapter's {adapter.names[:2]}... in order; a bug (check_export passed)"
            )
        return trained


def open_link(
    folder: str, runtime: str, adapter: Adapter, task_name: str, threads: int
) -> RuntimeLink:
    """Read and check the export folder for devices running `runtime`.

    Raises:
        ConfigError: see `check_export`; also a damaged or truncated export.
    """
    manifest = read_manifest(Path(folder))
    check_export(manifest, folder, runtime, adapter, task_name)
    return RuntimeLink(runtime, Path(folder), manifest, threads)


def check_export(
    manifest: ExportManifest, folder: str, runtime: str, adapter: Adapter, task_name: str
) -> None:
    """Whether the export can stand in for `adapter`'s model on a `runtime` device.

    Raises:
        ConfigError: a format the runtime does not run, a graph without adapter inputs,
            a PEFT method other than LoRA / LoRA-FA, slots that differ from the adapter's
            LoRA layers (modules, shapes, scaling), or logits the task cannot use.
    """
    fmt = RUNTIMES[runtime]
    if manifest.format != fmt:
        raise ConfigError(
            f"fed.export={folder} is an export of format {manifest.format}, but the fleet's "
            f"devices with runtime {runtime} run {fmt}; export with --format {fmt} or change "
            "the devices' runtime in the fleet YAML"
        )
    if not manifest.adapter_inputs:
        raise ConfigError(
            f"the graph in fed.export={folder} has no adapter inputs (a plain or merged "
            "export), so runtime devices cannot train through it; export again with "
            "--lora-rank R lora_targets=[...] (the run's peft.rank and peft.target_modules)"
        )
    if adapter.method not in LORA_METHODS:
        raise ConfigError(
            f"peft.method={adapter.method}: runtime devices feed LoRA tensors to the graph, "
            f"so the federation must train {' or '.join(LORA_METHODS)}"
        )
    slots, _ = slots_from_peft(adapter.model)
    problem = _slot_mismatch(manifest.slots, slots)
    if problem:
        rank, targets = slots[0].rank, sorted({s.module.rsplit(".", 1)[-1] for s in slots})
        raise ConfigError(
            f"the graph in fed.export={folder} does not fit the federation's adapter: "
            f"{problem}; export the model again with --lora-rank {rank} "
            f"lora_targets=[{','.join(targets)}] (and lora_alpha = peft.alpha), or set "
            "--peft / peft.rank / peft.target_modules to the export's"
        )
    if manifest.logits == "last" and task_name != "classification":
        raise ConfigError(
            f"the graph in fed.export={folder} returns only the last position's logits "
            f"(--logits last), which serves classification; the {task_name} task reads "
            "every position: export with --logits all"
        )


def _slot_mismatch(exported: list[LoraSlot], federated: list[LoraSlot]) -> str:
    """What differs between the export's slots and the adapter's ("" if nothing)."""
    ours = {s.module: s for s in federated}
    theirs = {s.module: s for s in exported}
    only_export = [m for m in theirs if m not in ours]
    only_fed = [m for m in ours if m not in theirs]
    if only_export or only_fed:
        return (
            f"LoRA modules only in the export: {only_export[:3] or 'none'}, only in the "
            f"federation: {only_fed[:3] or 'none'}"
        )
    if [s.module for s in exported] != [s.module for s in federated]:
        return "the LoRA modules come in another order"
    for a, b in zip(exported, federated, strict=True):
        shape_a = (a.in_features, a.out_features, a.rank)
        shape_b = (b.in_features, b.out_features, b.rank)
        if shape_a != shape_b:
            return f"{a.module} is (in, out, rank) {shape_a} in the export, {shape_b} here"
        if not math.isclose(a.scaling, b.scaling, rel_tol=1e-6):
            return f"{a.module} scales by {a.scaling:g} in the export, {b.scaling:g} here"
    return ""


def runtime_threads(configured: int) -> int:
    """The runtime's threads: the run's `threads`, else this process's torch threads."""
    return configured or torch.get_num_threads()
