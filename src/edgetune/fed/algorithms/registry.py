"""The one list of federated algorithms: each module registers its `AlgorithmSpec` once.

A spec says everything the rest of edgetune needs to know about an algorithm without
naming it: how to build it (`build(setup)`, from its own settings, not the whole run
config), which `fed` settings it reads beyond the shared ones (`settings`), which
settings of the other sections only it reads (`reads`, dotted), its own config section
(`section`, e.g. FedSpine's `spine`), whether its clients never backpropagate
(`forward_only`), the update kinds its clients upload (`uploads`; attacks that corrupt
one kind apply to the algorithms that send it), whether it sizes its clients' models
itself (`prunes`: the static memory check is then its planner's), whether its
aggregation clips and noises updates under `fed.dp` (`private`), whether its clients
can clip and noise their own (`private_on_device`, dp.where=device), the `fed.aggregator`
rules it implements (`aggregators`), and an optional
`check(cfg)` for combinations only it can judge.

`fed/config.py` validates a run against the specs: a setting that some algorithm reads
and the chosen one does not is refused, with the algorithms that do read it. Adding an
algorithm is its module (with its `register(...)`) plus one import line in
`fed/algorithms/__init__.py` (HF PEFT's `register_peft_method` is the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgetune.config import check_choice
from edgetune.fed.aggregate import AGGREGATORS
from edgetune.fed.algorithms.base import FedAlgorithm
from edgetune.fed.payloads import LoraDelta, Projection, SeedTrace, ZOTrace
from edgetune.peft import Adapter

UPDATE_KINDS = (LoraDelta, ZOTrace, SeedTrace, Projection)  # what a client may upload


@dataclass(frozen=True)
class AlgorithmSetup:
    """What an algorithm is built from: its sections of the run config and the model."""

    fed: Any  # the `fed` section (FedConfig): rounds, aggregator, the settings it reads
    section: Any  # its own section (`spec.section`), or None
    peft: Any  # the adapter's settings (PeftConfig)
    seed: int  # the run seed (seed pools, sub-model adapters)
    lr: float  # the clients' learning rate (optim.lr)
    adapter: Adapter  # the global adapter, as attached from the run seed
    num_params: int  # the full model's parameter count
    fleet: list[Any]  # every client's device profile
    privacy: Any = None  # fed.dp's mechanism (`fed/privacy.py`), or None without DP


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm as the registry knows it (see the module docstring)."""

    name: str
    build: Callable[[AlgorithmSetup], FedAlgorithm]
    help: str
    settings: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    section: str | None = None
    forward_only: bool = False
    uploads: tuple[type, ...] = (LoraDelta, SeedTrace)
    prunes: bool = False
    private: bool = False
    private_on_device: bool = False
    aggregators: tuple[str, ...] = AGGREGATORS
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.uploads if kind not in UPDATE_KINDS]
        if unknown or not self.uploads:
            raise ValueError(f"{self.name}: uploads must be among {UPDATE_KINDS}, got {unknown}")


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add `spec` to the registry (a name registers once)."""
    if spec.name in ALGORITHMS:
        raise ValueError(f"federated algorithm {spec.name!r} is registered twice")
    ALGORITHMS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an algorithm (tests that register one of their own)."""
    ALGORITHMS.pop(name, None)


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registered spec of `name`.

    Raises:
        ConfigError: no algorithm has that name; names the closest and the choices.
    """
    check_choice("fed", "algorithm", name, ALGORITHMS)
    return ALGORITHMS[name]


def readers(setting: str) -> list[str]:
    """The algorithms that read `setting` (a `fed` field name, or a dotted key of
    another section)."""
    return [
        name
        for name, spec in ALGORITHMS.items()
        if setting in spec.settings or setting in spec.reads
    ]
