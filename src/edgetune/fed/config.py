"""Federated settings: the fleet, rounds, selection, local training and aggregation.

`FederateConfig` is a federated run (`edgetune federate`, `edgetune flower run`): the
`fed` section (`FedConfig`) plus the sections it shares with `finetune`. A client's local
round reads `train.batch_size`, `train.grad_accum` (first-order clients), `optim.*` (its
learning rate; the first-order optimizer) and the `zo` settings its algorithm's
estimator reads; everything else in those sections belongs to a single-device run, and
`check_read_by_federation` refuses it when given (differs from its default), as it does
the settings only other algorithms read: each algorithm declares what it reads in its
registered spec (`fed/algorithms/registry.py`: its `fed` settings, dotted settings of
other sections, its own section) and may check combinations only it can judge. A `fed`
setting marked `simulator_only` (the simulated clock, attacks) is refused on Flower by
`check_read_by_flower`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from edgetune import threads, track
from edgetune.config import check_choice, check_positive, option
from edgetune.data import DataConfig
from edgetune.errors import ConfigError
from edgetune.fed.aggregate import AGGREGATORS
from edgetune.fed.algorithms import ALGORITHMS, AlgorithmSpec, algorithm_spec
from edgetune.fed.algorithms.registry import readers
from edgetune.fed.attacks import applies, check_applies, parse_attack
from edgetune.fed.fleet import BUILTIN_FLEETS, BUILTIN_PROFILES
from edgetune.fed.hetlora import RANK_AGGREGATIONS
from edgetune.fed.privacy import DPConfig
from edgetune.fed.spine.config import SpineConfig
from edgetune.models.builtin import BUILTIN_MODELS
from edgetune.peft import PeftConfig
from edgetune.train import OptimConfig, TrainConfig
from edgetune.train.config import (
    GUARD_SETTINGS,
    TRAIN_METHODS,
    backpropagates,
    resolve_step_size,
)
from edgetune.zo import ZOConfig

FED_ALGORITHMS = tuple(ALGORITHMS)  # the built-in ones (the registry may grow)
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
BUCKETED = ("median", "trimmed-mean", "centered-clip")  # the rules fed.bucket feeds
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

    algorithm: str = option("fedit", " | ".join(FED_ALGORITHMS), flag="--algorithm")
    clients: int = option(10, "number of clients", flag="--clients")
    participation: float = option(
        0.5, "fraction of clients selected per round (0, 1]", flag="--participation"
    )
    partition: str = option(
        AUTO_PARTITION,
        "auto (dirichlet:0.5 for classification, else iid) | iid | dirichlet:A | shards:K "
        "| quantity:A",
        flag="--partition",
    )
    fleet: str = option(
        "mixed",
        "built-in fleet or profile name, or a YAML file",
        path=BUILTIN_FLEETS.keys() | BUILTIN_PROFILES.keys(),
        flag="--fleet",
    )
    export: str = option(
        "",
        "export folder (edgetune export --lora-rank R, or --adapter) whose graph the fleet's "
        "devices with a runtime (ort | executorch) train through ('' = none)",
        path=(),
    )
    rounds: int = option(5, "federated rounds", flag="--rounds")
    local_steps: int = option(5, "local steps per client per round", flag="--local-steps")
    method: str = option(
        "auto", "client training: fo | zo | prge | auto (by device memory)", flag="--method"
    )
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
    aggregator: str = option("mean", "mean | median | trimmed-mean | clip-mean | centered-clip")
    trim: float = option(0.1, "trimmed-mean: fraction dropped at each end")
    bucket: int = option(
        0,
        "median | trimmed-mean | centered-clip: average the clients in shuffled buckets of "
        "this size first (0 = off)",
    )
    clip: float = option(
        1.0,
        "clip-mean: max update norm (fedit) or |scalar| (fedkseed); centered-clip: the "
        "clipping radius around the previous aggregate",
    )
    ranks: str = option(
        "",
        "heterogeneous LoRA ranks: '' = all at peft.rank; 'device' = each profile's "
        "lora_rank; or a list like 2,4,8 cycled over clients (each <= peft.rank)",
    )
    rank_aggregation: str = option("padded", "mixed ranks: padded (HetLoRA) | svd")
    max_update_norm: float = option(
        100.0, "reject fedit updates (fedproj: rebuilt updates) with a larger norm"
    )
    max_abs_scalar: float = option(1e4, "reject fedkseed traces with a larger |scalar|")
    pool_size: int = option(1024, "fedkseed: K candidate seeds shared by all clients")
    secret_pool: bool = option(
        False,
        "fedkseed: draw each round's K seeds from a server secret that only the round's "
        "clients receive (scalars read off the wire replay into nothing without it)",
    )
    proj_k: int = option(
        3840,
        "fedproj: K coefficients a client uploads (one per block of the flat adapter; "
        "4 bytes each, so 3840 keeps the upload under 16 KB)",
    )
    fwd_candidates: int = option(4, "fwdllm: seeds considered per draw (1 = no steering)")
    attack: str = option(
        "",
        "simulator only: KIND:FRACTION malicious clients, KIND = signflip | scale | noise | "
        "nan | lie-count | inflate | alie | ipm | big-scalar (fedkseed), e.g. signflip:0.2 "
        "('' = none)",
        simulator_only="a Flower federation's devices are real, and the server does not "
        "make their updates malicious",
    )

    def __post_init__(self) -> None:
        spec = algorithm_spec(self.algorithm)
        check_choice("fed", "server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        self._check_aggregator(spec)
        check_choice("fed", "method", self.method, CLIENT_METHODS)
        check_choice("fed", "rank_aggregation", self.rank_aggregation, RANK_AGGREGATIONS)
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
            "proj_k",
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
        attack = parse_attack(self.attack)
        if attack is not None:
            senders = [n for n, s in ALGORITHMS.items() if applies(attack.kind, s.uploads)]
            check_applies(attack, self.algorithm, spec.uploads, senders)
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
        if spec.forward_only and backpropagates(self.method):
            raise ConfigError(
                f"fed.method=fo: {self.algorithm} clients train with forward passes only; "
                "use zo or auto"
            )
        self._refuse_unread(spec)

    def _check_aggregator(self, spec: AlgorithmSpec) -> None:
        """The rule exists, the algorithm implements it, and bucketing is well formed."""
        check_choice("fed", "aggregator", self.aggregator, AGGREGATORS)
        if self.aggregator not in spec.aggregators:
            raise ConfigError(
                f"fed.aggregator={self.aggregator} is not one {self.algorithm} aggregates "
                f"with; use one of {' | '.join(spec.aggregators)}"
            )
        if self.bucket == 1 or self.bucket < 0:
            raise ConfigError(
                f"fed.bucket: expected 0 (off) or a bucket size >= 2, got {self.bucket}"
            )
        if (self.bucket or self.aggregator == "centered-clip") and self.ranks:
            raise ConfigError(
                "fed.bucket and fed.aggregator=centered-clip combine whole updates, and "
                f"fed.ranks={self.ranks!r} gives clients different shapes; drop one of them"
            )

    def _refuse_unread(self, spec: AlgorithmSpec) -> None:
        """Refuse a `fed` setting that only other algorithms (or aggregators) read."""
        read = set(spec.settings)
        read |= {"trim"} if self.aggregator == "trimmed-mean" else set()
        read |= {"clip"} if self.aggregator in ("clip-mean", "centered-clip") else set()
        if self.aggregator not in BUCKETED:
            read.discard("bucket")
        shared = {"trim", "clip"}.union(*(other.settings for other in ALGORITHMS.values()))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}  # all plain values
        for name in sorted(shared - read):
            value = getattr(self, name)
            if value != defaults[name]:
                users = readers(name)
                used = f"fed.algorithm={' | '.join(users)}" if users else "another fed.aggregator"
                raise ConfigError(
                    f"fed.{name}={value!r} is not read by fed.algorithm={spec.name} "
                    f"with fed.aggregator={self.aggregator} (it is read with {used}); drop it"
                )


@dataclass
class FederateConfig:
    """Everything a federated run needs (YAML sections = the nested fields)."""

    model: str = option(
        "smollm2-135m",
        "built-in name, HF folder, .gguf file or hub id",
        path=BUILTIN_MODELS,
        flag="--model",
    )
    seed: int = option(
        0, "run seed: split, partition, selection, adapter init, seeds", flag="--seed"
    )
    out: str = option("runs/federate", "run directory", flag="--out")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    fed: FedConfig = dataclasses.field(default_factory=FedConfig)
    spine: SpineConfig = dataclasses.field(default_factory=SpineConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    zo: ZOConfig = dataclasses.field(default_factory=ZOConfig)
    threads: int = option(
        0, "torch threads per process (0 = chosen at start from the free cores and recorded)"
    )
    report_to: str = track.report_to_option()

    def __post_init__(self) -> None:
        threads.check(self.threads, "threads")
        track.names(self.report_to)  # an unknown tracker fails here, with the closest
        resolve_client_step_size(self)
        check_read_by_federation(self)


# What `federate --resume` (and `flower run --resume`) may change: the number of rounds
# (no setting decays over them), the evaluation batch and the trackers (rebuilt from
# metrics.jsonl on every start). Everything else shaped the rounds already aggregated.
RESUME_MAY_CHANGE = ("threads", "report_to", "fed.rounds", "train.eval_batch_size")

# Settings of single-device training that a federated run never reads, and what to use.
_NOT_READ = {
    "train.method": "a federated client's method comes from fed.method and its device",
    "train.memory_mb": "each device's memory comes from its fleet profile (fed.fleet)",
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
}


def resolve_client_step_size(cfg: FederateConfig) -> None:
    """Fill in the clients' step size when it is not given. A fleet whose clients all run
    zeroth-order (a forward-only algorithm, or fed.method zo / prge) gets the default ZO
    recipe, as `finetune` does: RECIPE_LR with each local round's scalars divided by their
    running RMS (zo.scale=rms; the trace carries the normalised scalars, so replaying it is
    still plain ZO-SGD). Otherwise clients get first-order's default, and the ZO devices of
    a mixed fleet send raw scalars at it unless zo.scale=rms is given."""
    spec = algorithm_spec(cfg.fed.algorithm)
    zeroth = spec.forward_only or (
        cfg.fed.method in TRAIN_METHODS and not backpropagates(cfg.fed.method)
    )
    resolve_step_size(cfg.optim, cfg.zo, "zo" if zeroth else "fo")
    if cfg.zo.scale == "auto":
        cfg.zo.scale = "none"


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
    spec = algorithm_spec(cfg.fed.algorithm)
    if spec.check is not None:
        spec.check(cfg)
    _check_algorithm_settings(cfg, spec)
    _check_privacy(cfg, spec)
    zeroth = cfg.fed.method in TRAIN_METHODS and not backpropagates(cfg.fed.method)  # not auto
    if spec.forward_only or zeroth:
        for name in ("name", "momentum", "grad_clip"):
            value = _given(cfg, f"optim.{name}")
            if value is not None:
                raise ConfigError(
                    f"optim.{name}={value!r} is a first-order setting, and no client of "
                    f"fed.algorithm={cfg.fed.algorithm} with fed.method={cfg.fed.method} "
                    "backpropagates; drop it"
                )
    decay = _given(cfg, "optim.weight_decay")
    if decay is not None and not backpropagates(cfg.fed.method):
        raise ConfigError(
            f"optim.weight_decay={decay!r} applies to first-order clients only (a ZO client's "
            "steps travel as seeds and scalars, replayed without decay); use it with "
            "fed.method=fo, or drop it"
        )


def _check_privacy(cfg: FederateConfig, spec: AlgorithmSpec) -> None:
    """Refuse dp settings without dp.noise, and what would void the guarantee.

    Raises:
        ConfigError: names the setting, why, and the fix.
    """
    if not cfg.dp.noise:
        for field in dataclasses.fields(DPConfig):
            value = _given(cfg, f"dp.{field.name}")
            if value is not None:
                raise ConfigError(
                    f"dp.{field.name}={value!r} is read only with differential privacy on; "
                    "set dp.noise (the noise multiplier, e.g. 1.0) or drop it"
                )
        return
    if not spec.private:
        private = [n for n, s in ALGORITHMS.items() if s.private]
        raise ConfigError(
            f"dp.noise: fed.algorithm={spec.name} cannot clip and noise its aggregate yet; "
            f"use one of {' | '.join(private)}, or drop dp.*"
        )
    if cfg.dp.where == "device" and not spec.private_on_device:
        local = [n for n, s in ALGORITHMS.items() if s.private_on_device]
        raise ConfigError(
            f"dp.where=device: the clients of fed.algorithm={spec.name} cannot clip and noise "
            f"their own updates; use dp.where=server, or one of {' | '.join(local)}"
        )
    voiding = {
        "fed.aggregator": "the guarantee is for the clipped mean; a robust rule or "
        "clip-mean changes one client's influence on the aggregate (clipping is dp.clip)",
        "fed.ranks": "every client must send the whole adapter, so one bound holds per update",
        "fed.rank_aggregation": "every client must send the whole adapter",
    }
    for key, why in voiding.items():
        value = _given(cfg, key)
        if value is not None:
            raise ConfigError(f"{key}={value!r} would void dp.noise's guarantee ({why}); drop it")


def _check_algorithm_settings(cfg: FederateConfig, spec: AlgorithmSpec) -> None:
    """Refuse what only other algorithms read: a dotted setting of a shared section, or a
    setting of another algorithm's own section (`FedConfig` refuses `fed` settings).

    Raises:
        ConfigError: names the setting, the algorithms that read it, and the fix.
    """
    for other in ALGORITHMS.values():
        if other.section is None or other.section == spec.section:
            continue
        section = getattr(cfg, other.section)
        for field in dataclasses.fields(section):
            value = _given(cfg, f"{other.section}.{field.name}")
            if value is not None:
                raise ConfigError(
                    f"{other.section}.{field.name}={value!r} is read only by "
                    f"fed.algorithm={other.name}, not by {spec.name}; drop it or use "
                    f"--algorithm {other.name}"
                )
    dotted = {key for other in ALGORITHMS.values() for key in other.reads}
    for key in sorted(dotted - set(spec.reads)):
        value = _given(cfg, key)
        if value is not None:
            raise ConfigError(
                f"{key}={value!r} is read only by {' | '.join(readers(key))}, not by "
                f"fed.algorithm={spec.name}; drop it"
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
