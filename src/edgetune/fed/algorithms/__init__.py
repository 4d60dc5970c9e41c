"""Federated algorithms: one module each, registered once by name (`registry.py`).

Importing this package registers every built-in algorithm (the import line below is an
algorithm's one registry line) and every installed plugin: a package that declares an
entry point in the `edgetune.algorithms` group names a module that registers its
algorithms when imported, so the simulator, the Flower server and every device that has
the package installed know them. `build_algorithm(fed)` makes the run's algorithm from
its spec and its own sections of the config; the round loop, the session, the attacks
and the report then use only the `FedAlgorithm` protocol (`base.py`) and the spec.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.fed.algorithms import (  # noqa: F401 (register)
    fedit,
    fedkseed,
    fedproj,
    fedspine,
    fwdllm,
)
from edgetune.fed.algorithms.base import FedAlgorithm
from edgetune.fed.algorithms.registry import (
    ALGORITHMS,
    AlgorithmSetup,
    AlgorithmSpec,
    algorithm_spec,
    register,
)

PLUGIN_GROUP = "edgetune.algorithms"


def load_plugins() -> None:
    """Import every installed algorithm plugin (entry point group `PLUGIN_GROUP`).

    Raises:
        EdgetuneError: a plugin failed to import; names it and the fix.
    """
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as err:  # a third-party module: any error is the plugin's
            raise EdgetuneError(
                f"the federated algorithm plugin {point.name!r} ({point.value}) failed to "
                f"import: {type(err).__name__}: {err}; fix or uninstall the package that "
                "provides it"
            ) from err


load_plugins()


def build_algorithm(fed: Any) -> FedAlgorithm:
    """The algorithm of `fed.cfg.fed.algorithm` over the federation `fed` (a
    `Federation`: its adapter, fleet and parameter count)."""
    cfg = fed.cfg
    spec = algorithm_spec(cfg.fed.algorithm)
    setup = AlgorithmSetup(
        fed=cfg.fed,
        section=getattr(cfg, spec.section) if spec.section else None,
        peft=cfg.peft,
        seed=cfg.seed,
        lr=float(cfg.optim.lr),
        adapter=fed.adapter,
        num_params=fed.num_params,
        fleet=fed.fleet,
        privacy=fed.privacy,
    )
    return spec.build(setup)


__all__ = [
    "ALGORITHMS",
    "AlgorithmSetup",
    "AlgorithmSpec",
    "FedAlgorithm",
    "algorithm_spec",
    "build_algorithm",
    "load_plugins",
    "register",
]
