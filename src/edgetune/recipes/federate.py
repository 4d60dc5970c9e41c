"""`edgetune federate`: federated fine-tuning over a simulated heterogeneous fleet.

setup (model, data split into client partitions, adapter, fleet, per-client method by
memory) -> rounds of the chosen algorithm in the in-process simulator -> global adapter
and summary. The algorithm objects are the same ones a Flower deployment runs.

Run directory: config.yaml, metrics.jsonl (one line per round: `round`, `loss`, bytes,
simulated seconds, accepted/rejected, `eval/*`), clients.jsonl (per client per round:
device, method, status, bytes, simulated seconds), summary.json (`bytes_up`,
`bytes_down`, `rounds`, `sim_s`, final `eval/*`), adapter/, and state/ for --resume.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from edgetune import console, threads
from edgetune.config import option, to_dict
from edgetune.data import DataConfig
from edgetune.data.splits import resolved_data
from edgetune.errors import ConfigError
from edgetune.fed.checkpoint import SavedRound, newest_round
from edgetune.fed.config import AUTO_PARTITION, FedConfig
from edgetune.fed.fleet import DeviceProfile, client_ranks
from edgetune.fed.runtime_client import RuntimeLink, open_link, runtime_threads
from edgetune.models.builtin import base_model_id
from edgetune.peft import Adapter, PeftConfig
from edgetune.peft.card import ModelCard
from edgetune.runs import RunDir, peak_rss_mb
from edgetune.train import OptimConfig, TrainConfig
from edgetune.zo import ZOConfig
from edgetune.zo.seeds import derive_seed


@dataclass
class FederateConfig:
    """Everything `edgetune federate` needs (YAML sections = the nested fields)."""

    model: str = option("smollm2-135m", "built-in name, HF folder, .gguf file or hub id")
    seed: int = option(0, "run seed: split, partition, selection, adapter init, seeds")
    out: str = option("runs/federate", "run directory")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    fed: FedConfig = dataclasses.field(default_factory=FedConfig)
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


# What `federate --resume` (and `flower run --resume`) may change: the number of rounds
# (no setting decays over them) and the evaluation batch. Everything else shaped the
# rounds already aggregated.
RESUME_MAY_CHANGE = ("threads", "fed.rounds", "train.eval_batch_size")


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


def setup(cfg: FederateConfig) -> dict[str, Any]:
    """Model, data, partitions, adapter, fleet and each client's method."""
    from edgetune import models
    from edgetune.data import build_task, load_splits, partition
    from edgetune.errors import ConfigError
    from edgetune.fed.fleet import choose_method, load_fleet
    from edgetune.peft import attach

    fleet = load_fleet(cfg.fed.fleet, cfg.fed.clients)
    check_runtime_fleet(cfg, fleet)
    console.status(f"loading model {cfg.model} and data {cfg.data.dataset}", cfg.train.progress)
    model, tokenizer = models.load(cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    splits = load_splits(cfg.data, cfg.seed)
    task = build_task(splits, cfg.data, tokenizer)
    train_rows = task.prepare_rows(splits.train)
    labels = [r["label"] for r in train_rows] if splits.task == "classification" else None
    scheme = partition_for(cfg.fed.partition, splits.task)
    parts = partition(len(train_rows), cfg.fed.clients, scheme, cfg.seed, labels)
    methods = [choose_method(p, num_params, cfg.fed.method) for p in fleet]
    if cfg.fed.algorithm != "fedit":  # FedKSeed and FwdLLM clients are forward-only
        methods = [None if m is None else "zo" for m in methods]
    if cfg.fed.ranks and cfg.peft.method not in ("lora", "lora-fa"):
        raise ConfigError(
            f"fed.ranks needs a LoRA adapter, not peft.method={cfg.peft.method}; use --peft lora"
        )
    ranks = client_ranks(cfg.fed.ranks, fleet, cfg.peft.rank)
    if all(m is None for m in methods):
        raise ConfigError(
            f"no device in fleet {cfg.fed.fleet!r} can fine-tune this model with "
            f"fed.method={cfg.fed.method}; use a smaller model or a larger fleet"
        )
    adapter = attach(model, cfg.peft, seed=cfg.seed)
    return {
        "data": resolved_data(cfg.data, splits),
        "partition": scheme,
        "task": task,
        "adapter": adapter,
        "fleet": fleet,
        "methods": methods,
        "ranks": ranks,
        "runtimes": runtime_links(cfg, fleet, adapter, task.name),
        "partitions": [[train_rows[i] for i in p] for p in parts],
        "eval_rows": task.prepare_rows(splits.eval),
        "num_params": num_params,
    }


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
    if runtimes and cfg.fed.method == "fo":
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


def client_job(
    cfg: FederateConfig,
    parts: dict[str, Any],
    client: int,
    rnd: int,
    method: str,
    rank: int | None,
) -> Any:
    """The ClientJob of `client` in round `rnd` (the same on a device and in the
    simulator: its batches and seeds derive from (run seed, round, client)); it trains
    through the runtime of the client's fleet profile, if that names one."""
    from edgetune.fed.local import ClientJob

    return ClientJob(
        client,
        method,
        parts["task"],
        parts["partitions"][client],
        cfg.fed.local_steps,
        cfg.train.batch_size,
        float(cfg.optim.lr or 1e-3),
        derive_seed(cfg.seed, rnd, client),
        cfg.optim,
        cfg.zo.eps,
        cfg.zo.queries,
        rank,
        parts["runtimes"][client],
    )


def jobs_factory(cfg: FederateConfig, parts: dict[str, Any]) -> Any:
    """round -> {client: ClientJob or None}."""

    def jobs(rnd: int) -> dict[int, Any]:
        return {
            client: None
            if method is None
            else client_job(cfg, parts, client, rnd, method, parts["ranks"][client])
            for client, method in enumerate(parts["methods"])
        }

    return jobs


def run(cfg: FederateConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Federate and write the run directory; returns the summary."""
    from edgetune.fed.algorithms import ALGORITHMS
    from edgetune.fed.checkpoint import restore_round, save_round
    from edgetune.fed.simulator import simulate
    from edgetune.train.loop import evaluate

    start = time.perf_counter()
    rundir = RunDir(cfg.out, resume=resume, overwrite=overwrite)
    saved = resume_point(rundir, cfg) if resume else None
    rundir.write_config(to_dict(cfg))
    parts = setup(cfg)
    fed = dataclasses.replace(cfg.fed, partition=parts["partition"])
    cfg = dataclasses.replace(cfg, data=parts["data"], fed=fed)
    rundir.write_config(to_dict(cfg))  # says which partition `auto` chose, labels used...
    adapter = parts["adapter"]
    algo = ALGORITHMS[cfg.fed.algorithm](cfg.fed, adapter, cfg.seed, float(cfg.optim.lr or 1e-3))
    done = restore_round(rundir, saved, algo, adapter) if saved is not None else 0

    def evaluate_global() -> dict[str, float]:
        rows = parts["eval_rows"]
        if not rows:
            return {}
        return evaluate(adapter, parts["task"], rows, cfg.train.eval_batch_size, cfg.train.progress)

    totals = simulate(
        algo,
        adapter,
        jobs_factory(cfg, parts),
        parts["fleet"],
        cfg.fed,
        cfg.seed,
        rundir,
        evaluate_global,
        parts["num_params"],
        cfg.data.max_length,
        start=done,
        on_round=lambda r: save_round(rundir, algo, r),
        progress=cfg.train.progress,
    )
    return summarize(cfg, rundir, adapter, parts, totals, start)


def summarize(
    cfg: FederateConfig,
    rundir: RunDir,
    adapter: Any,
    parts: dict[str, Any],
    totals: dict[str, float],
    start: float,
    command: str = "federate",
) -> dict:
    """Save the global adapter and write summary.json (shared with the Flower server)."""
    last = rundir.read_metrics()[-1]
    final = {k: v for k, v in last.items() if k.startswith("eval/")}
    method = (
        f"edgetune {command}, fed.algorithm={cfg.fed.algorithm}, {cfg.fed.rounds} rounds, "
        f"{cfg.fed.clients} clients (fleet {cfg.fed.fleet}, partition {cfg.fed.partition})"
    )
    card = ModelCard.for_run(cfg, command, method, final)
    saved = adapter.save(rundir.path, base_model_id(cfg.model), card)
    summary = {
        "command": command,
        "algorithm": cfg.fed.algorithm,
        "model": cfg.model,
        "clients": cfg.fed.clients,
        "rounds": cfg.fed.rounds,
        "methods": {m: parts["methods"].count(m) for m in sorted(set(parts["methods"]) - {None})},
        "bytes_up": int(totals["bytes_up"]),
        "bytes_down": int(totals["bytes_down"]),
        "sim_s": totals.get("sim_s", 0.0),
        **{k: v for k, v in last.items() if k.startswith("eval/")},
        "saved": str(saved),
        "status": "done",
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    rundir.write_summary(summary)
    return summary
