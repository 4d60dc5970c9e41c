"""A federation's shared set-up: what the server and every device derive from one config.

`setup(cfg)` loads the model and data, splits the training rows into the clients'
seeded partitions, attaches the adapter from the run seed, loads the fleet and opens
the exported graphs of runtime devices. The in-process simulator, the Flower server and
each Flower device run it on the same config, so they agree on every partition (the
server caps a client's claimed example count at its partition's size) and on the
initial adapter, without sending either.

`Federation.job` is one client's local round: its rows, steps, batch, learning rate,
settings and seed (the JOB stream of (round, client)), the same on a device and in the
simulator.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from edgetune import console
from edgetune.config import to_dict
from edgetune.data import DataConfig
from edgetune.errors import ConfigError
from edgetune.fed.algorithms.registry import AlgorithmSpec, algorithm_spec
from edgetune.fed.checkpoint import SavedRound, newest_round
from edgetune.fed.config import AUTO_PARTITION, FederateConfig
from edgetune.fed.fleet import DeviceProfile, client_ranks
from edgetune.fed.local import ClientJob
from edgetune.fed.plan import StaticPlanner
from edgetune.fed.privacy import Privacy
from edgetune.fed.runtime_client import RuntimeLink, open_link, runtime_threads
from edgetune.models.builtin import base_model_id
from edgetune.peft import Adapter
from edgetune.peft.card import ModelCard
from edgetune.runs import RunDir, peak_rss_mb
from edgetune.train.config import backpropagates
from edgetune.train.memory import backprop_share
from edgetune.train.trunk import resolve_trunk
from edgetune.zo.seeds import Stream, stream_seed


@dataclass
class Federation:
    """What `setup` derives from a config (the same on the server and every device)."""

    cfg: FederateConfig  # with `auto` resolved: the partition scheme and data labels
    task: Any
    adapter: Adapter
    fleet: list[DeviceProfile]  # the configured profile of each client
    partitions: list[list[dict]]  # each client's training rows
    eval_rows: list[dict]
    num_params: int
    runtimes: list[RuntimeLink | None]  # each client's exported graph (None: PyTorch)
    trunk_share: float = 0.0  # fraction of the blocks a PyTorch client runs once per batch
    privacy: Privacy | None = None  # fed.dp's mechanism and accountant (the server's)
    backprop_share: float = 1.0  # fraction of the blocks a first-order client trains

    @property
    def algorithm(self) -> AlgorithmSpec:
        """The registered spec of the run's algorithm."""
        return algorithm_spec(self.cfg.fed.algorithm)

    def job(self, client: int, rnd: int, method: str) -> ClientJob:
        """The local round of `client` in round `rnd` (batches and seeds derive from
        (run seed, round, client)); it trains through the runtime of the client's fleet
        profile, if that names one."""
        cfg = self.cfg
        return ClientJob(
            client=client,
            round=rnd,
            method=method,
            task=self.task,
            rows=self.partitions[client],
            steps=cfg.fed.local_steps,
            batch_size=cfg.train.batch_size,
            lr=float(cfg.optim.lr or 1e-3),
            seed=stream_seed(cfg.seed, Stream.JOB, rnd, client),
            optim=cfg.optim,
            zo=cfg.zo,
            grad_accum=cfg.train.grad_accum,
            runtime=self.runtimes[client],
            trunk=cfg.train.trunk,
        )

    def evaluate(self, progress: bool = False) -> dict[str, float]:
        """The global adapter (as loaded in `adapter`) on the held-out rows."""
        from edgetune.train.loop import evaluate

        if not self.eval_rows:
            return {}
        return evaluate(
            self.adapter, self.task, self.eval_rows, self.cfg.train.eval_batch_size, progress
        )


def setup(cfg: FederateConfig) -> Federation:
    """Model, data, partitions, adapter, fleet and runtime links.

    Raises:
        ConfigError: no device of the fleet can fine-tune the model, fed.ranks without a
            LoRA adapter, or runtime devices that do not fit the settings.
    """
    from edgetune import models
    from edgetune.data import build_task, load_splits, partition
    from edgetune.data.splits import resolved_data
    from edgetune.fed.fleet import load_fleet
    from edgetune.peft import attach

    fleet = load_fleet(cfg.fed.fleet, cfg.fed.clients)
    check_runtime_fleet(cfg, fleet)
    if cfg.fed.ranks and cfg.peft.method not in ("lora", "lora-fa"):
        raise ConfigError(
            f"fed.ranks needs a LoRA adapter, not peft.method={cfg.peft.method}; use --peft lora"
        )
    client_ranks(cfg.fed.ranks, fleet, cfg.peft.rank)  # a bad list fails before loading
    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.train.progress)
    model, tokenizer = models.load(cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    spec = algorithm_spec(cfg.fed.algorithm)
    share = backprop_share(cfg.peft, model)
    static = StaticPlanner(cfg.fed, cfg.peft.rank, num_params, spec.forward_only, share)
    # An algorithm that prunes its clients' models checks what pruning makes fit itself.
    if not spec.prunes and all(m is None for m in static.methods(fleet)):
        raise ConfigError(
            f"no device in fleet {cfg.fed.fleet!r} can fine-tune this model with "
            f"fed.method={cfg.fed.method}; use a smaller model or a larger fleet"
        )
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    train_rows = task.prepare_rows(splits.train)
    labels = [r["label"] for r in train_rows] if splits.task == "classification" else None
    scheme = partition_for(cfg.fed.partition, splits.task)
    parts = partition(len(train_rows), cfg.fed.clients, scheme, cfg.seed, labels)
    adapter = attach(model, cfg.peft, seed=cfg.seed)
    data: DataConfig = resolved_data(cfg.data, splits)
    resolved = dataclasses.replace(
        cfg, data=data, fed=dataclasses.replace(cfg.fed, partition=scheme)
    )
    runtimes = runtime_links(cfg, fleet, adapter, task.name)
    if any(link is not None for link in runtimes):
        resolve_trunk(cfg.train.trunk, adapter.model, runtime=True)  # refuses a set cut
    trunk = resolve_trunk(cfg.train.trunk, adapter.model)
    return Federation(
        cfg=resolved,
        task=task,
        adapter=adapter,
        fleet=fleet,
        partitions=[[train_rows[i] for i in p] for p in parts],
        eval_rows=task.prepare_rows(splits.eval),
        num_params=num_params,
        runtimes=runtimes,
        trunk_share=trunk.cut / trunk.layers if trunk.shared else 0.0,
        privacy=privacy_of(cfg),
        backprop_share=share,
    )


def privacy_of(cfg: FederateConfig) -> Privacy | None:
    """fed.dp's mechanism (None without dp.noise): m of N clients a round."""
    if not cfg.dp.noise:
        return None
    per_round = max(1, round(cfg.fed.participation * cfg.fed.clients))
    return Privacy(cfg.dp, cfg.fed.clients, per_round, cfg.seed)


def check_runtime_fleet(cfg: FederateConfig, fleet: list[DeviceProfile]) -> None:
    """Runtime devices and fed.export go together, and such devices train zo / prge at
    the global rank (checked before the model loads).

    Raises:
        ConfigError: a runtime device without fed.export, fed.export with no runtime
            device, fed.method=fo, or fed.ranks giving a runtime device another rank.
    """
    runtimes = sorted({p.runtime for p in fleet if p.runtime})
    if runtimes and not cfg.fed.export:
        raise ConfigError(
            f"devices in fleet {cfg.fed.fleet!r} name runtime {', '.join(runtimes)}, which "
            "trains through an exported graph, but fed.export is empty; export the model "
            f"(edgetune export --lora-rank {cfg.peft.rank} ...) and pass fed.export=DIR"
        )
    if cfg.fed.export and not runtimes:
        raise ConfigError(
            f"fed.export={cfg.fed.export} is set, but no device of fleet {cfg.fed.fleet!r} "
            "names a runtime, so nothing would use it; give devices runtime: ort (or "
            "executorch) in the fleet YAML, or drop fed.export"
        )
    if runtimes and backpropagates(cfg.fed.method):
        raise ConfigError(
            f"fed.method=fo: devices with runtime {', '.join(runtimes)} have no backward "
            "(an inference graph), so they train zo or prge; use fed.method=zo, prge or auto"
        )
    if runtimes and cfg.fed.ranks:
        ranks = client_ranks(cfg.fed.ranks, fleet, cfg.peft.rank)
        if any(r is not None for p, r in zip(fleet, ranks, strict=True) if p.runtime):
            raise ConfigError(
                f"fed.ranks={cfg.fed.ranks!r} gives a device with a runtime a rank below "
                f"peft.rank={cfg.peft.rank}, but its graph takes LoRA inputs of the export's "
                "rank; give runtime devices lora_rank 0 (the global rank) or drop fed.ranks"
            )


def runtime_links(
    cfg: FederateConfig, fleet: list[DeviceProfile], adapter: Adapter, task_name: str
) -> list[RuntimeLink | None]:
    """Each client's runtime link (None: it trains in PyTorch), the export checked once
    per runtime against the federation's adapter and task."""
    threads = runtime_threads(cfg.threads)
    links = {
        name: open_link(cfg.fed.export, name, adapter, task_name, threads)
        for name in sorted({p.runtime for p in fleet if p.runtime})
    }
    return [links[p.runtime] if p.runtime else None for p in fleet]


def partition_for(scheme: str, task: str) -> str:
    """The partition scheme to use: `auto` is label skew (dirichlet:0.5) for
    classification and iid for tasks without labels; any other scheme as given."""
    if scheme != AUTO_PARTITION:
        return scheme
    return "dirichlet:0.5" if task == "classification" else "iid"


def resume_point(rundir: RunDir, cfg: FederateConfig) -> SavedRound:
    """The newest intact round state, checked against `cfg`; writes nothing.

    Raises:
        ConfigError: fed.rounds is below the rounds already completed.
        CheckpointError: rounds were completed but no round state is intact.
    """
    saved = newest_round(rundir)
    if cfg.fed.rounds < saved.round:
        raise ConfigError(
            f"fed.rounds={cfg.fed.rounds} is below the {saved.round} rounds {rundir.path} "
            f"has completed; on --resume fed.rounds must be at least {saved.round}"
        )
    return saved


def summarize(
    fed: Federation,
    rundir: RunDir,
    totals: dict[str, float],
    methods: list[str | None],
    start: float,
    command: str = "federate",
    algo: Any = None,
) -> dict:
    """Save the global adapter and write summary.json (the simulator's and Flower's);
    with FedSpine, `classes` says what each device class deploys."""
    cfg = fed.cfg
    last = rundir.read_metrics()[-1]
    final = {k: v for k, v in last.items() if k.startswith("eval/")}
    method = (
        f"edgetune {command}, fed.algorithm={cfg.fed.algorithm}, {cfg.fed.rounds} rounds, "
        f"{cfg.fed.clients} clients (fleet {cfg.fed.fleet}, partition {cfg.fed.partition})"
    )
    card = ModelCard.for_run(cfg, command, method, final)
    saved = fed.adapter.save(rundir.path, base_model_id(cfg.model), card)
    summary = {
        "command": command,
        "algorithm": cfg.fed.algorithm,
        "model": cfg.model,
        "clients": cfg.fed.clients,
        "rounds": cfg.fed.rounds,
        "methods": {m: methods.count(m) for m in sorted({m for m in methods if m is not None})},
        "bytes_up": int(totals["bytes_up"]),
        "bytes_down": int(totals["bytes_down"]),
        "sim_s": totals.get("sim_s", 0.0),
        **final,
        "saved": str(saved),
        "status": "done",
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    if fed.privacy is not None:
        done = int(last.get("round", 0))
        summary["dp"] = {
            "epsilon": fed.privacy.epsilon(done),
            "delta": fed.privacy.delta,
            "noise": fed.privacy.sigma,
            "clip": fed.privacy.clip,
            "rounds": done,
        }
        if done < cfg.fed.rounds:
            summary["status"] = "stopped: privacy budget"
    classes = algo.deploy(fed, rundir.path / "classes", saved) if algo is not None else {}
    if classes:
        summary["classes"] = classes
    rundir.write_summary(summary)
    return summary


def config_text(cfg: FederateConfig) -> str:
    """The config as the YAML a device receives when the server greets it."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
