"""FedSpine: federated prune-and-tune, each device on a nested sub-model of its own size.

Yao et al., "Efficient Deployment of Large Language Models on Resource-constrained
Devices" (2025) alternate structured pruning with LoRA tuning and let an online bandit
pick each device's pruning ratio and LoRA rank. The paper's score, arms, reward and
aggregation are not public; this is edgetune's design:

- **One global ordering of units** (MLP channels and key/value head groups per layer,
  `spine/order.py`; `spine.units` says which kinds are pruned), kept by the server. It starts from weight magnitudes; in the first
  round (before the ramp prunes anything) and every `spine.reorder_every` rounds after,
  the round's devices also return forward-only importance
  statistics of the units they hold (activation norms, so zeroth-order devices
  contribute too; the bytes are counted) and the server re-orders. A device at ratio p
  keeps each layer's top 1 - p of that ordering, so every device's model is a sub-model
  of the global one and every update has a place in global coordinates.
- **The plan** (`spine/planner.py`): per device, an arm (pruning level, LoRA rank) from
  its discounted-UCB bandit, its memory deciding which arms it may play; sparsity ramps
  up cubically to `spine.target_sparsity` (`order.schedule`).
- **The payload**: the global adapter gathered to the device's kept channels and rank
  prefix (an `IndexMap`, `fed/shapes.py`) and the kept units as bit masks. The device
  prunes its own copy of the base model to those units (`spine/submodel.py`), loads the
  slice, scores `spine.val_rows` of its rows (held out of its training) on the unpruned
  model with the slice and on its trained sub-model (the bandit's reward: what the round
  bought net of what pruning cost), and returns its delta (first-order) or its seed trace (zeroth-order;
  the server replays it in the same shapes), plus its unit statistics in re-ordering
  rounds (then zeroth-order devices send their delta, as a trace cannot carry them).
- **Aggregation** is FedIT's (a `DeltaServer` whose shapes are the kept units): each update is validated against
  its own plan's shapes, scattered to global coordinates, and every coordinate is
  combined over the devices that hold it (`scatter_combine`, so robust aggregators work
  per coordinate); coordinates no device held stay as they were.
- **Evaluation** scores the global adapter on the global sub-model at the round's
  scheduled sparsity (what a device at level 1 would deploy); `deployed()` gives each
  device class its sub-model at the target sparsity on its bandit's best arm.

Not done: merging the adapter into the base weights every k rounds (the global adapter
stays one rank-R LoRA over the pristine base; pruning happens on the fly).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from edgetune.compress.prune import KeptIndices, magnitude_scores
from edgetune.data.tasks.base import evaluating
from edgetune.errors import ConfigError
from edgetune.fed.algorithms.base import AggregateResult, load_trainable, trainable_state
from edgetune.fed.algorithms.deltas import DeltaAlgorithm, seed_trace
from edgetune.fed.algorithms.registry import AlgorithmSetup, AlgorithmSpec, register
from edgetune.fed.hetlora import at_rank, tensors_rank
from edgetune.fed.local import ClientJob
from edgetune.fed.payloads import ClientState, LoraDelta, SeedTrace
from edgetune.fed.shapes import IndexMap, gather, scatter
from edgetune.fed.spine.order import (
    UnitOrder,
    index_map,
    kept_params,
    pack_kept,
    unpack_kept,
)
from edgetune.fed.spine.planner import SpinePlanner
from edgetune.fed.spine.submodel import SubModels, client_stats
from edgetune.peft import Adapter
from edgetune.train.config import backpropagates

STATS = ("spine.mlp_scores", "spine.kv_scores")  # a device's unit statistics
SPEED_REPEATS = 3  # median of this many runs per speed figure


class FedSpine(DeltaAlgorithm):
    """FedIT aggregation over nested pruned sub-models planned by per-device bandits."""

    def __init__(self, setup: AlgorithmSetup):
        """From the run's `fed`, `spine` (`setup.section`) and `peft` sections.

        Raises:
            ConfigError: no device of the fleet fits any arm.
        """
        super().__init__(setup.fed, setup.adapter)
        self.server.shapes = self.shapes  # each plan holds its kept units
        spine = self.spine = setup.section
        model: Any = setup.adapter.model
        base = model.get_base_model()
        self.config = copy.deepcopy(base.config)  # the unpruned shapes
        self.order = UnitOrder.from_scores(
            magnitude_scores(base), spine.ranking, spine.unit_kinds()
        )
        # the round's few ratios and the evaluated one, so a round rebuilds none twice
        self.submodels = SubModels(setup.adapter, setup.peft, setup.seed, keep=4)
        self.num_params = setup.num_params
        self._kept: dict[float, KeptIndices] = {}  # this ordering's sub-models by ratio
        self.bandits = SpinePlanner(
            spine, setup.fed.rounds, setup.fed.method, setup.peft.rank, setup.seed, self.params
        )
        self.bandits.check_fleet(setup.fleet)

    def planner(self, fed: Any) -> SpinePlanner:
        """Its bandits plan every round (checkpointed with the algorithm)."""
        return self.bandits

    # ---- server: the sub-model of a ratio under the current ordering -----------------
    def kept(self, ratio: float | None) -> KeptIndices:
        """The units a sub-model at `ratio` keeps (None or 0: every unit)."""
        ratio = ratio or 0.0
        if ratio not in self._kept:
            self._kept[ratio] = self.order.kept(ratio)
        return self._kept[ratio]

    def params(self, ratio: float) -> int:
        """Parameters of the sub-model at `ratio` (the full model's count at 0)."""
        if not ratio:
            return self.num_params
        return kept_params(self.kept(ratio), self.config)

    def shapes(self, plan: Any) -> IndexMap:
        """The kept channels and rank prefix of the global adapter `plan` gives."""
        if plan is None:
            return IndexMap.full()
        return index_map(
            self.kept(plan.ratio), self.config, self.server.axes, self.state, plan.rank
        )

    def reorder_round(self, rnd: int) -> bool:
        """Whether devices return unit statistics in round `rnd` (0-based): the first
        round (on the unpruned model, before the ramp prunes anything) and every
        `spine.reorder_every` rounds after it."""
        every = self.spine.reorder_every
        return every > 0 and rnd % every == 0

    def configure(self, rnd: int, plan: Any) -> LoraDelta:
        """The device's slice of the global adapter and its kept units."""
        kept = self.kept(plan.ratio)
        tensors = {**gather(self.state, self.shapes(plan)), **pack_kept(kept, self.order)}
        return LoraDelta(tensors, meta={"stats": float(self.reorder_round(rnd))})

    # ---- device ----------------------------------------------------------------------
    def client_update(
        self, adapter: Adapter, payload: Any, job: ClientJob, state: ClientState | None
    ) -> tuple[Any, ClientState | None]:
        """Prune a copy of the base to the sent units, train the sent slice on it.

        The device scores its held-out rows three times (the bandit's reward, meta):
        `val_before`, the unpruned model with the sent slice (zero elsewhere), forward
        only; `val_pruned`, its sub-model with the slice, before training; `val_after`,
        after training. `val_before - val_after` is what the round bought, net of what
        pruning cost, so an arm that prunes a device into a worse model is not rewarded
        for then repairing part of the damage.
        """
        del state  # the device keeps no state between rounds
        kept = unpack_kept(payload.tensors)
        tensors = {k: v for k, v in payload.tensors.items() if not k.startswith("spine.")}
        val, job = _hold_out(job, self.spine.val_rows)
        rank = tensors_rank(tensors)
        full = {k: torch.zeros_like(v) for k, v in self.state.items()}
        scatter(full, tensors, index_map(kept, self.config, self.server.axes, self.state, rank))
        load_trainable(adapter, full)
        before = _val_loss(adapter, job.task, val)
        sub = self.submodels.get(kept)
        with at_rank(sub, rank):
            load_trainable(sub, tensors)
            pruned = _val_loss(sub, job.task, val)
            results = job.run(sub)
            after = _val_loss(sub, job.task, val)
            loss = sum(r.loss for r in results) / max(len(results), 1)
            meta = {"loss": loss, "val_before": before, "val_pruned": pruned, "val_after": after}
            stats = payload.meta.get("stats", 0.0) == 1.0
            if not backpropagates(job.method) and not stats:
                trace = seed_trace(results, job.lr, len(job.rows), loss)
                trace.meta.update(meta)
                return trace, None
            local = trainable_state(sub)
            delta = {k: local[k] - tensors[k] for k in local}
            if stats:
                batch = job.task.collate(val)
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                mlp, kv = client_stats(sub, kept, [inputs])
                delta.update({STATS[0]: mlp, STATS[1]: kv})
        return LoraDelta(delta, num_examples=len(job.rows), meta=meta), None

    # ---- server: aggregation ---------------------------------------------------------
    def aggregate(
        self, rnd: int, updates: list[tuple[int, Any]], plans: Mapping[int, Any] | None = None
    ) -> AggregateResult:
        """FedIT's per-coordinate aggregation; then, in re-ordering rounds, the new
        ordering from the accepted devices' statistics."""
        plans = plans or {}
        stats: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        stripped, bad = [], {}
        for client, update in updates:
            if isinstance(update, LoraDelta) and any(k in update.tensors for k in STATS):
                reason = self._check_stats(update, plans.get(client))
                if reason:
                    bad[client] = reason
                    continue
                tensors = dict(update.tensors)
                mlp, kv = tensors.pop(STATS[0]), tensors.pop(STATS[1])
                stats[client] = (mlp, kv, float(max(update.num_examples, 1)))
                update = LoraDelta(tensors, update.num_examples, update.meta)
            stripped.append((client, update))
        result = super().aggregate(rnd, stripped, plans)
        result.rejected.update(bad)
        reports = [(self.kept(plans[c].ratio), *stats[c]) for c in result.accepted if c in stats]
        if self.reorder_round(rnd) and reports:
            result.stats["reordered"] = float(self.order.update(reports))
            self._kept = {}
        return result

    def _check_stats(self, update: LoraDelta, plan: Any) -> str | None:
        """Why a device's statistics do not fit its planned units, or None."""
        if plan is None:
            return "unit statistics from a device without a plan"
        kept = self.kept(plan.ratio)
        mlp, kv = update.tensors.get(STATS[0]), update.tensors.get(STATS[1])
        sizes = (sum(len(k) for k in kept.mlp), sum(len(k) for k in kept.kv_groups))
        for name, t, size in zip(STATS, (mlp, kv), sizes, strict=True):
            if t is None or t.dim() != 1 or t.numel() != size:
                return f"{name}: expected {size} values (its kept units)"
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                return f"{name}: scores must be finite and >= 0"
        return None

    # ---- evaluation and the deployed models ------------------------------------------
    def evaluate(self, fed: Any, progress: bool = False) -> dict[str, float]:
        """The global adapter on the global sub-model at the round's scheduled sparsity
        (with `sparsity` and the sub-model's parameter count beside the scores)."""
        from edgetune.train.loop import evaluate_model

        ratio = self.bandits.sparsity
        if not fed.eval_rows:
            return {}
        if ratio:
            kept = self.kept(ratio)
            sub = self.submodels.get(kept)
            imap = index_map(kept, self.config, self.server.axes, self.state, None)
            load_trainable(sub, gather(self.state, imap))
            model = sub.model
        else:
            model = fed.adapter.model
        scores = evaluate_model(
            model, fed.task, fed.eval_rows, fed.cfg.train.eval_batch_size, progress
        )
        return {**scores, "sparsity": ratio, "params": float(self.params(ratio))}

    def deployed(self, profiles: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Per device class (profile name): the arm its devices deploy most at the target
        sparsity, its pruning ratio, rank and parameter count."""
        target = self.spine.target_sparsity
        votes: dict[str, dict[int, int]] = {}
        for client, profile in enumerate(profiles):
            allowed = self.bandits.allowed(profile, target)
            if any(allowed):
                arm = self.bandits.deployed_arm(client, profile, allowed)
                per = votes.setdefault(profile.name, {})
                per[arm] = per.get(arm, 0) + 1
        out = {}
        for name, per in sorted(votes.items()):
            arm = max(sorted(per), key=lambda a: per[a])
            level, rank = self.bandits.arms[arm]
            ratio = self.spine.ratio(level, target)
            out[name] = {
                "arm": self.bandits.arm_names()[arm],
                "ratio": ratio,
                "rank": rank,
                "params": self.params(ratio),
                "devices": sum(per.values()),
            }
        return out

    def deploy(self, fed: Any, out: Path, adapter_dir: Path) -> dict[str, dict[str, Any]]:
        """Write each device class's deployable model and score it.

        Per class (`deployed`): `out/<class>/model`, the base pruned to the class's units
        (an HF folder with the tokenizer; stock transformers loads it with
        `spine.ranking=layer`), and `out/<class>/adapter`, the global adapter saved in
        `adapter_dir` mapped to those units (`map_adapter_folder`). Each gets its held-out
        scores and the bare pruned model's inference speed on this CPU (batch 1,
        `compress/speed.py`), beside the unpruned model's.
        """
        from edgetune.compress.prune import map_adapter_folder, prune
        from edgetune.compress.speed import measure_speed, prefill_ids
        from edgetune.train.loop import evaluate_model

        classes = self.deployed(fed.fleet)
        base = self.submodels.base()
        ids = prefill_ids(self.config.vocab_size, fed.cfg.seed)
        full = measure_speed(base, ids, SPEED_REPEATS)
        for name, entry in classes.items():
            kept = self.kept(entry["ratio"])
            folder = out / _folder_name(name)
            model = prune(copy.deepcopy(base), kept)
            model.save_pretrained(folder / "model")
            fed.task.tokenizer.save_pretrained(folder / "model")
            map_adapter_folder(
                adapter_dir, folder / "adapter", kept, self.config, base_model=folder / "model"
            )
            sub = self.submodels.get(kept)
            imap = index_map(kept, self.config, self.server.axes, self.state, None)
            load_trainable(sub, gather(self.state, imap))
            batch = fed.cfg.train.eval_batch_size
            progress = fed.cfg.train.progress
            scores = evaluate_model(sub.model, fed.task, fed.eval_rows, batch, progress)
            speed = measure_speed(model, ids, SPEED_REPEATS)
            entry.update(
                folder=str(folder),
                **scores,
                **speed,
                speedup=speed["decode_tokens_per_s"] / full["decode_tokens_per_s"],
            )
        return classes

    # ---- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """FedIT's state, the unit ordering and every device's bandit."""
        out = super().state_dict()
        out.update({f"order.{k}": v for k, v in self.order.state_dict().items()})
        out.update({f"planner.{k}": v for k, v in self.bandits.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`."""
        super().load_state_dict(state)
        self.order.load_state_dict(_under(state, "order."))
        self.bandits.load_state_dict(_under(state, "planner."))
        self._kept = {}


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _folder_name(name: str) -> str:
    """A device class's folder name (its profile name, path-safe)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip(".") or "class"


def _hold_out(job: ClientJob, n: int) -> tuple[list[dict], ClientJob]:
    """The first `n` rows of the device's data as its validation rows and the job on the
    rest (a device with no more than `n` rows scores the rows it trains on)."""
    rows = list(job.rows)
    if len(rows) <= n:
        return rows, job
    return rows[:n], dataclasses.replace(job, rows=rows[n:])


def _val_loss(adapter: Adapter, task: Any, rows: Sequence[dict]) -> float:
    """Mean example loss of `rows` (forward only), nan without rows."""
    if not rows:
        return math.nan
    with evaluating(adapter.model):
        losses = task.example_losses(adapter.model, task.collate(rows))
    return float(losses.mean())


def check(cfg: Any) -> None:
    """What FedSpine cannot honour, refused before anything loads.

    Raises:
        ConfigError: a PEFT method other than LoRA, an exported graph, or a `spine`
            setting its policy (or a run without a deadline) ignores.
    """
    if cfg.peft.method not in ("lora", "lora-fa"):
        raise ConfigError(
            f"fed.algorithm=fedspine trains LoRA on pruned sub-models, not "
            f"peft.method={cfg.peft.method}; use --peft lora"
        )
    if cfg.fed.export:
        raise ConfigError(
            "fed.algorithm=fedspine trains pruned sub-models in PyTorch, and an exported "
            f"graph (fed.export={cfg.fed.export}) is the full model; drop fed.export and the "
            "fleet's runtime devices"
        )
    cfg.spine.check_read(deadline=bool(cfg.fed.deadline_s))


register(
    AlgorithmSpec(
        name="fedspine",
        build=FedSpine,
        help="prune-and-tune: a bandit per device picks its pruning ratio and LoRA rank",
        settings=("server_optimizer", "server_lr", "server_momentum", "max_update_norm"),
        section="spine",
        uploads=(LoraDelta, SeedTrace),
        prunes=True,
        aggregators=("mean", "median", "trimmed-mean", "clip-mean"),
        check=check,
    )
)
