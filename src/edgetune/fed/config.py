"""Federated settings: the fleet, rounds, selection, local training and aggregation.

`FederateConfig` is a federated run (`edgetune federate`, `edgetune flower run`): the
`fed` section (`FedConfig`) plus the sections it shares with `finetune`. A client's local
round reads `train.batch_size`, `train.grad_accum` (first-order clients), `optim.*` (its
learning rate; the first-order optimizer) and the `zo` settings its algorithm's
estimator reads; everything else in those sections belongs to a single-device run, and
`check_read_by_federation` refuses it when given (differs from its default), as it does
the `fed` settings of other algorithms (each algorithm lists the ones it reads, beside
its module: `FED_SETTINGS`). A `fed` setting marked `simulator_only` (the simulated clock,
attacks) is refused on Flower by `check_read_by_flower`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from edgetune import threads
from edgetune.config import check_choice, check_positive, option
from edgetune.data import DataConfig
from edgetune.errors import ConfigError
from edgetune.fed.aggregate import AGGREGATORS
from edgetune.fed.algorithms import ALGORITHMS
from edgetune.fed.attacks import parse_attack
from edgetune.fed.fleet import BUILTIN_FLEETS, BUILTIN_PROFILES
from edgetune.fed.hetlora import RANK_AGGREGATIONS
from edgetune.fed.spine.config import SpineConfig
from edgetune.models.builtin import BUILTIN_MODELS
from edgetune.peft import PeftConfig
from edgetune.train import OptimConfig, TrainConfig
from edgetune.train.config import GUARD_SETTINGS
from edgetune.zo import ZOConfig

FED_ALGORITHMS = tuple(ALGORITHMS)  # the registry, beside the algorithms' modules
FORWARD_ONLY = tuple(n for n, cls in ALGORITHMS.items() if cls.FORWARD_ONLY)
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
)


@dataclass
class FedConfig:
    """How the federation runs."""

    algorithm: str = option("fedit", " | ".join(FED_ALGORITHMS))
    clients: int = option(10, "number of clients")
    participation: float = option(0.5, "fraction of clients selected per round (0, 1]")
    partition: str = option(
        AUTO_PARTITION,
        "auto (dirichlet:0.5 for classification, else iid) | iid | dirichlet:A | shards:K "
        "| quantity:A",
    )
    fleet: str = option(
        "mixed",
        "built-in fleet or profile name, or a YAML file",
        path=BUILTIN_FLEETS.keys() | BUILTIN_PROFILES.keys(),
    )
    export: str = option(
        "",
        "export folder (edgetune export --lora-rank R, or --adapter) whose graph the fleet's "
        "devices with a runtime (ort | executorch) train through ('' = none)",
        path=(),
    )
    rounds: int = option(5, "federated rounds")
    local_steps: int = option(5, "local steps per client per round")
    method: str = option("auto", "client training: fo | zo | prge | auto (by device memory)")
    min_clients: int = option(
        1, "aggregate a round only if this many updates arrived; else the model stays"
    )
    deadline_s: float = option(
        0.0,
        "simulated round deadline in seconds (0 = none)",
        simulator_only="a Flower round takes real time, and ends when the replies are in "
        "or --round-timeout passes; there is no simulated clock to miss a deadline on, so "
        "FedSpine's spine.deadline_penalty would never apply either",
    )
    host_gflops: float = option(
        140.0,
        "this machine's sustained GFLOP/s, to scale work",
        simulator_only="it scales this machine's compute time to the simulated devices' "
        "speeds; a Flower device trains at its own speed and its time is measured",
    )
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
    fwd_candidates: int = option(4, "fwdllm: seeds considered per draw (1 = no steering)")
    attack: str = option(
        "",
        "simulator only: KIND:FRACTION malicious clients, KIND = signflip | scale | noise | "
        "nan | lie-count | big-scalar (fedkseed), e.g. signflip:0.2 ('' = none)",
        simulator_only="a Flower federation's devices are real, and the server does not "
        "make their updates malicious",
    )

    def __post_init__(self) -> None:
        check_choice("fed", "algorithm", self.algorithm, FED_ALGORITHMS)
        check_choice("fed", "server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        check_choice("fed", "aggregator", self.aggregator, AGGREGATORS)
        check_choice("fed", "method", self.method, CLIENT_METHODS)
        check_choice("fed", "rank_aggregation", self.rank_aggregation, RANK_AGGREGATIONS)
        if self.ranks and self.algorithm.startswith("fedkseed"):
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
        if self.algorithm in FORWARD_ONLY and self.method == "fo":
            raise ConfigError(
                f"fed.method=fo: {self.algorithm} clients train with forward passes only; "
                "use zo or auto"
            )


@dataclass
class FederateConfig:
    """Everything a federated run needs (YAML sections = the nested fields)."""

    model: str = option(
        "smollm2-135m", "built-in name, HF folder, .gguf file or hub id", path=BUILTIN_MODELS
    )
    seed: int = option(0, "run seed: split, partition, selection, adapter init, seeds")
    out: str = option("runs/federate", "run directory")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    fed: FedConfig = dataclasses.field(default_factory=FedConfig)
    spine: SpineConfig = dataclasses.field(default_factory=SpineConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zo: ZOConfig = dataclasses.field(default_factory=ZOConfig)
    threads: int = option(
        0, "torch threads per process (0 = chosen at start from the free cores and recorded)"
    )

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        if self.optim.lr is None:
            self.optim.lr = 1e-3
        check_read_by_federation(self)


# What `federate --resume` (and `flower run --resume`) may change: the number of rounds
# (no setting decays over them) and the evaluation batch. Everything else shaped the
# rounds already aggregated.
RESUME_MAY_CHANGE = ("threads", "fed.rounds", "train.eval_batch_size")

# Settings of single-device training that a federated run never reads, and what to use.
_NOT_READ = {
    "train.method": "a federated client's method comes from fed.method and its device",
    "train.steps": "clients run fed.local_steps per round, for fed.rounds rounds",
    "train.eval_every": "the global adapter is evaluated after every round",
    "train.eval_at_start": "round 0 is always the evaluation before training",
    "train.checkpoint_every": "the server state is saved after every round",
    "train.keep_checkpoints": "the two newest rounds are kept",
    "train.explode_factor": "robust aggregation (fed.aggregator) guards the global model",
    "train.guard": "robust aggregation (fed.aggregator) guards the global model",
    **{
        f"train.{name}": "robust aggregation (fed.aggregator) guards the global model"
        for name in GUARD_SETTINGS
    },
    "train.keep": "the global adapter after the last round is the result",
    "optim.schedule": "every local round runs at optim.lr",
    "optim.warmup_steps": "every local round runs at optim.lr",
    "zo.optimizer": "ZO clients send seeds and scalars that others replay as ZO-SGD steps",
    "zo.beta1": "ZO clients run ZO-SGD (their steps are replayed from seeds)",
    "zo.beta2": "ZO clients run ZO-SGD (their steps are replayed from seeds)",
    "zo.estimator": "the algorithm sets the estimator (MeZO, the seed pool, or fwdgrad)",
    "zo.exact_restore": "federated ZO clients always restore exactly, so traces replay",
    "zo.scale": "federated ZO clients send raw scalars (the default recipe is single-device)",
}
# zo settings read only by FwdLLM's forward-gradient clients.
_FWDGRAD = ("zo.max_queries", "zo.var_threshold")


def _given(cfg: FederateConfig, dotted: str) -> object | None:
    """The value of `section.name` if it differs from its default, else None."""
    section, name = dotted.split(".")
    obj = getattr(cfg, section)
    value = getattr(obj, name)
    default = getattr(type(obj)(), name)
    return value if value != default else None


def check_read_by_federation(cfg: FederateConfig) -> None:
    """Refuse settings the federated run would ignore (given = differs from its default).

    Raises:
        ConfigError: names the setting, why the run does not read it, and the fix.
    """
    for dotted, why in _NOT_READ.items():
        value = _given(cfg, dotted)
        if value is not None:
            raise ConfigError(f"{dotted}={value!r} is not read by a federated run ({why}); drop it")
    if cfg.fed.algorithm != "fwdllm":
        for dotted in _FWDGRAD:
            value = _given(cfg, dotted)
            if value is not None:
                raise ConfigError(
                    f"{dotted}={value!r} is read only by fwdllm's forward-gradient clients, "
                    f"not by fed.algorithm={cfg.fed.algorithm}; drop it"
                )
    if cfg.fed.algorithm in FORWARD_ONLY or cfg.fed.method in ("zo", "prge"):
        for name in ("name", "momentum", "grad_clip"):
            value = _given(cfg, f"optim.{name}")
            if value is not None:
                raise ConfigError(
                    f"optim.{name}={value!r} is a first-order setting, and no client of "
                    f"fed.algorithm={cfg.fed.algorithm} with fed.method={cfg.fed.method} "
                    "backpropagates; drop it"
                )
    decay = _given(cfg, "optim.weight_decay")
    if decay is not None and cfg.fed.method != "fo":
        raise ConfigError(
            f"optim.weight_decay={decay!r} applies to first-order clients only (a ZO client's "
            "steps travel as seeds and scalars, replayed without decay); use it with "
            "fed.method=fo, or drop it"
        )
    if cfg.fed.algorithm != "fedspine":
        for field in dataclasses.fields(SpineConfig):
            value = _given(cfg, f"spine.{field.name}")
            if value is not None:
                raise ConfigError(
                    f"spine.{field.name}={value!r} is read only by fed.algorithm=fedspine, not "
                    f"by {cfg.fed.algorithm}; drop it or use --algorithm fedspine"
                )
    else:
        _check_spine_read(cfg)
    if cfg.fed.algorithm == "fedspine" and cfg.fed.export:
        raise ConfigError(
            "fed.algorithm=fedspine trains pruned sub-models in PyTorch, and an exported "
            f"graph (fed.export={cfg.fed.export}) is the full model; drop fed.export and the "
            "fleet's runtime devices"
        )
    read = set(ALGORITHMS[cfg.fed.algorithm].FED_SETTINGS)
    read |= {"trim"} if cfg.fed.aggregator == "trimmed-mean" else set()
    read |= {"clip"} if cfg.fed.aggregator == "clip-mean" else set()
    default = FedConfig()
    for name in sorted(_ALGORITHM_SETTINGS - read):
        value = getattr(cfg.fed, name)
        if value != getattr(default, name):
            users = [a for a, cls in ALGORITHMS.items() if name in cls.FED_SETTINGS]
            used = f"fed.algorithm={' | '.join(users)}" if users else "another fed.aggregator"
            raise ConfigError(
                f"fed.{name}={value!r} is not read by fed.algorithm={cfg.fed.algorithm} "
                f"with fed.aggregator={cfg.fed.aggregator} (it is read with {used}); drop it"
            )


def check_read_by_flower(cfg: FederateConfig) -> None:
    """Refuse the settings only the in-process simulator honours (`simulator_only` on the
    field) when the rounds run on Flower; `edgetune flower run` calls it before launching.

    Raises:
        ConfigError: names the setting, why Flower cannot honour it, and the fix.
    """
    for field in dataclasses.fields(FedConfig):
        why = field.metadata.get("simulator_only")
        value = _given(cfg, f"fed.{field.name}") if why else None
        if value is not None:
            raise ConfigError(
                f"fed.{field.name}={value!r} is a simulator setting that Flower cannot "
                f"honour ({why}); drop it, or run the simulated federation with "
                "`edgetune federate`"
            )


def _check_spine_read(cfg: FederateConfig) -> None:
    """Refuse the spine settings FedSpine's policy (or a run without a deadline) ignores."""
    policy = cfg.spine.policy
    unread: dict[str, str] = {}
    if not cfg.fed.deadline_s:
        unread["deadline_penalty"] = "no round has a deadline (fed.deadline_s=0)"
    if policy != "bandit":
        for name in ("bandit_per", "discount", "exploration", "deadline_penalty"):
            unread[name] = f"spine.policy={policy} plays no bandit"
    if policy == "uniform":
        for name in ("levels", "ranks"):
            unread[name] = "spine.policy=uniform plays level 1 at the global rank"
    for name, why in unread.items():
        value = _given(cfg, f"spine.{name}")
        if value is not None:
            raise ConfigError(f"spine.{name}={value!r} is not read: {why}; drop it")


# fed settings that only some algorithms (or aggregators) read.
_ALGORITHM_SETTINGS = {"trim", "clip"}.union(*(cls.FED_SETTINGS for cls in ALGORITHMS.values()))
