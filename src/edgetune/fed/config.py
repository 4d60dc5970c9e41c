"""Federated settings: the fleet, rounds, selection, local training and aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.config import check_choice, check_positive, option
from edgetune.errors import ConfigError
from edgetune.fed.aggregate import AGGREGATORS
from edgetune.fed.attacks import parse_attack
from edgetune.fed.hetlora import RANK_AGGREGATIONS

FED_ALGORITHMS = ("fedit", "fedkseed", "fedkseed-pro", "fwdllm")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
CLIENT_METHODS = ("fo", "zo", "prge", "auto")
AUTO_PARTITION = "auto"  # resolved by the recipe once the task is known
_REAL_FIELDS = (
    "participation",
    "deadline_s",
    "host_gflops",
    "server_lr",
    "server_momentum",
    "trim",
    "clip",
    "max_update_norm",
    "max_abs_scalar",
    "fwd_threshold",
)


@dataclass
class FedConfig:
    """How the federation runs."""

    algorithm: str = option("fedit", "fedit | fedkseed | fedkseed-pro | fwdllm")
    clients: int = option(10, "number of clients")
    participation: float = option(0.5, "fraction of clients selected per round (0, 1]")
    partition: str = option(
        AUTO_PARTITION,
        "auto (dirichlet:0.5 for classification, else iid) | iid | dirichlet:A | shards:K "
        "| quantity:A",
    )
    fleet: str = option("mixed", "built-in fleet or profile name, or a YAML file")
    export: str = option(
        "",
        "export folder (edgetune export --lora-rank R, or --adapter) whose graph the fleet's "
        "devices with a runtime (ort | executorch) train through ('' = none)",
    )
    rounds: int = option(5, "federated rounds")
    local_steps: int = option(5, "local steps per client per round")
    method: str = option("auto", "client training: fo | zo | prge | auto (by device memory)")
    min_clients: int = option(
        1, "aggregate a round only if this many updates arrived; else the model stays"
    )
    deadline_s: float = option(0.0, "simulated round deadline in seconds (0 = none)")
    host_gflops: float = option(140.0, "this machine's sustained GFLOP/s, to scale work")
    server_optimizer: str = option("fedavg", "fedit: fedavg | fedavgm | fedadam | fedyogi")
    server_lr: float = option(1.0, "server learning rate applied to the aggregated delta")
    server_momentum: float = option(0.9, "fedavgm momentum / fedadam beta1")
    aggregator: str = option("mean", "mean | median | trimmed-mean | clip-mean")
    trim: float = option(0.1, "trimmed-mean: fraction dropped at each end")
    clip: float = option(1.0, "clip-mean: max update norm (fedit) or |scalar| (fedkseed)")
    ranks: str = option(
        "",
        "heterogeneous LoRA ranks: '' = all at peft.rank; 'device' = each profile's "
        "lora_rank; or a list like 2,4,8 cycled over clients (each <= peft.rank)",
    )
    rank_aggregation: str = option("padded", "mixed ranks: padded (HetLoRA) | svd")
    max_update_norm: float = option(100.0, "reject fedit updates with a larger norm")
    max_abs_scalar: float = option(1e4, "reject fedkseed traces with a larger |scalar|")
    pool_size: int = option(1024, "fedkseed: K candidate seeds shared by all clients")
    fwd_max_queries: int = option(8, "fwdllm: cap on directions per local step")
    fwd_threshold: float = option(1.0, "fwdllm: stop sampling when var/||g||^2 <= this")
    fwd_candidates: int = option(4, "fwdllm: seeds considered per draw (1 = no steering)")
    attack: str = option(
        "",
        "simulator only: KIND:FRACTION malicious clients, KIND = signflip | scale | noise | "
        "nan | lie-count | big-scalar (fedkseed), e.g. signflip:0.2 ('' = none)",
    )

    def __post_init__(self) -> None:
        check_choice("fed", "algorithm", self.algorithm, FED_ALGORITHMS)
        check_choice("fed", "server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        check_choice("fed", "aggregator", self.aggregator, AGGREGATORS)
        check_choice("fed", "method", self.method, CLIENT_METHODS)
        check_choice("fed", "rank_aggregation", self.rank_aggregation, RANK_AGGREGATIONS)
        if self.ranks and self.algorithm not in ("fedit", "fwdllm"):
            raise ConfigError(
                f"fed.ranks: heterogeneous LoRA ranks need an adapter-averaging algorithm "
                f"(fedit or fwdllm); {self.algorithm} replays one shared seed pool, so every "
                "client must train the same tensors. Drop fed.ranks"
            )
        if self.rank_aggregation == "svd" and (
            self.server_optimizer != "fedavg" or self.aggregator not in ("mean", "clip-mean")
        ):
            raise ConfigError(
                "fed.rank_aggregation=svd rebuilds the global adapter from the mean weight "
                "update, so it needs fed.server_optimizer=fedavg and fed.aggregator=mean or "
                "clip-mean; use rank_aggregation=padded for the others"
            )
        for name in (
            "clients",
            "min_clients",
            "rounds",
            "local_steps",
            "pool_size",
            "fwd_max_queries",
            "fwd_candidates",
        ):
            check_positive("fed", name, getattr(self, name))
        for name in ("server_lr", "clip", "max_update_norm", "max_abs_scalar", "host_gflops"):
            check_positive("fed", name, getattr(self, name))
        check_positive("fed", "deadline_s", self.deadline_s, allow_zero=True)
        for name in _REAL_FIELDS:  # NaN passes every comparison above
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"fed.{name}: expected a finite number, got {value!r}")
        parse_attack(self.attack, self.algorithm)
        if not 0.0 < self.participation <= 1.0:
            raise ConfigError(f"fed.participation: expected (0, 1], got {self.participation}")
        # The simulator and the Flower server select this many clients per round.
        selected = max(1, round(self.participation * self.clients))
        if self.min_clients > selected:
            raise ConfigError(
                f"fed.min_clients={self.min_clients} but only {selected} of fed.clients="
                f"{self.clients} are selected per round (fed.participation="
                f"{self.participation}), so no round would ever aggregate; set "
                f"fed.min_clients to at most {selected} or raise fed.participation"
            )
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"fed.trim: expected [0, 0.5), got {self.trim}")
        if self.algorithm != "fedit" and self.method == "fo":
            raise ConfigError(
                f"fed.method=fo: {self.algorithm} clients train with forward passes only; "
                "use zo or auto"
            )
