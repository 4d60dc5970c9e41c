"""FedSpine's planner: each round, every selected device's arm (pruning level, LoRA rank).

The arms are `spine.levels` x `spine.ranks` (`SpineConfig`). An arm's pruning ratio is
its level times the round's scheduled sparsity (`order.schedule`); an arm is allowed on
a device when some training method fits the device's memory for the sub-model that
ratio leaves (`choose_method` on its parameter count), so a device too small for the full
model can still train a pruned one. A device with no allowed arm is planned no method
(logged and skipped, as with every algorithm).

Choosing (`spine.policy`): `bandit` keeps one discounted-UCB bandit per device
(`bandit.py`); `random` draws an allowed arm from the ARM seed stream of (round,
client); `uniform` gives every device level 1 at the global rank (uniform pruning).
With `spine.bandit_per=class` the devices of one profile share one bandit (their plays
pool; each round's credits apply in client order).

The reward of a device's round, credited when the next round is planned from the
round's client entries (the history every planner receives), is its local
validation-loss improvement per second of effective round time: `val_before -
val_after`, scored by the device on `spine.val_rows` of its own rows held out of its
training, where `val_before` is the unpruned model with the global slice it received and
`val_after` its trained sub-model (so what pruning cost counts against the arm). The
effective time is the device's own time or the round's median, whichever is larger: a
synchronous round waits for its slow devices, so a device already faster than the
median gains nothing by pruning harder, while a straggler that prunes shortens the
round. Each round's rewards are divided by their largest magnitude (so they lie in
[-1, 1], the scale UCB's exploration term assumes). A device that missed `fed.deadline_s`
gets `-spine.deadline_penalty`. Devices that were unavailable, dropped or rejected are
not credited (their arm did not cause it). The time is the simulated seconds in the
simulator and the device's measured training seconds on Flower (real devices, so
Flower runs with the bandit are not reproducible; `random` and `uniform` are).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from edgetune.errors import ConfigError
from edgetune.fed.fleet import DeviceProfile, choose_method
from edgetune.fed.plan import ClientPlan, Outcome
from edgetune.fed.spine.bandit import DiscountedUCB, random_arm
from edgetune.fed.spine.config import SpineConfig
from edgetune.fed.spine.order import schedule
from edgetune.zo.seeds import Stream, stream_seed

_BANDIT = "bandit."  # state_dict prefix: bandit.<key>.counts / .sums


class SpinePlanner:
    """Plans FedSpine's rounds (see the module docstring); its bandits are checkpointed."""

    def __init__(
        self,
        spine: SpineConfig,
        rounds: int,
        method: str,
        global_rank: int,
        seed: int,
        params: Callable[[float], int],
    ):
        """`params(ratio)` is the parameter count of the sub-model at pruning `ratio`."""
        self.spine, self.rounds, self.method, self.seed = spine, rounds, method, seed
        self.global_rank = global_rank
        self.params = params
        self.levels = spine.level_values()
        self.arms = [(lv, r) for lv in self.levels for r in spine.rank_values(global_rank)]
        if spine.policy == "uniform":  # one arm: level 1 at the global rank
            self.arms = [(1.0, global_rank)]
        self.bandits: dict[str, DiscountedUCB] = {}  # by device class or client id
        self.sparsity = 0.0  # the sparsity of the round planned last

    def arm_names(self) -> list[str]:
        """`level x rank` labels of the arms, by index."""
        return [f"{lv:g}x r{r}" for lv, r in self.arms]

    def check_fleet(self, fleet: Sequence[DeviceProfile]) -> None:
        """Raise ConfigError when no device can train any arm at the target sparsity."""
        target = self.spine.target_sparsity
        if not any(any(self.allowed(p, target)) for p in fleet):
            smallest = self.params(self.spine.ratio(max(self.levels), target))
            raise ConfigError(
                f"no device of the fleet fits any FedSpine arm: even the smallest sub-model "
                f"({smallest / 1e6:.1f}M parameters at sparsity "
                f"{self.spine.ratio(max(self.levels), target):.2f}) needs more memory than "
                "every device has; raise spine.target_sparsity or spine.levels, or use a "
                "smaller model"
            )

    def plan(
        self,
        rnd: int,
        clients: Sequence[int],
        profiles: Sequence[DeviceProfile],
        history: Sequence[Mapping[str, Any]],
    ) -> dict[int, ClientPlan]:
        """Credit the previous round's arms, then choose each client's arm."""
        self._credit([e for e in history if e.get("round") == rnd])
        self.sparsity = schedule(rnd, self.rounds, self.spine.target_sparsity, self.spine.ramp)
        return {c: self._plan_one(rnd, c, profiles[c]) for c in clients}

    def methods(self, profiles: Sequence[DeviceProfile]) -> list[str | None]:
        """Each device's method at the target sparsity on its deployed arm (the summary)."""
        target = self.spine.target_sparsity
        out: list[str | None] = []
        for client, profile in enumerate(profiles):
            allowed = self.allowed(profile, target)
            if not any(allowed):
                out.append(None)
                continue
            arm = self.deployed_arm(client, profile, allowed)
            out.append(self._method(profile, self.spine.ratio(self.arms[arm][0], target)))
        return out

    def deployed_arm(self, client: int, profile: DeviceProfile, allowed: Sequence[bool]) -> int:
        """The arm a device ends on: its bandit's best allowed arm (uniform: its one
        arm; random or never played: the lowest allowed arm)."""
        bandit = self.bandits.get(self._key(client, profile))
        if bandit is None:
            return allowed.index(True)
        return bandit.best(allowed)

    def _plan_one(self, rnd: int, client: int, profile: DeviceProfile) -> ClientPlan:
        allowed = self.allowed(profile, self.sparsity)
        if not any(allowed):
            return ClientPlan(client, profile, None, ratio=self.sparsity)
        arm = allowed.index(True)  # uniform: its one arm
        if self.spine.policy == "bandit":
            arm = self._bandit(self._key(client, profile)).select(allowed)
        elif self.spine.policy == "random":
            arm = random_arm(allowed, stream_seed(self.seed, Stream.ARM, rnd, client))
        level, rank = self.arms[arm]
        ratio = self.spine.ratio(level, self.sparsity)
        return ClientPlan(
            client,
            profile,
            self._method(profile, ratio),
            rank=rank,
            ratio=ratio,
            params=self.params(ratio),
            arm=arm,
        )

    def _method(self, profile: DeviceProfile, ratio: float) -> str | None:
        return choose_method(profile, self.params(ratio), self.method)

    def allowed(self, profile: DeviceProfile, sparsity: float) -> list[bool]:
        """Per arm: whether some method fits `profile`'s memory at `sparsity`."""
        return [
            self._method(profile, self.spine.ratio(lv, sparsity)) is not None for lv, _ in self.arms
        ]

    def _key(self, client: int, profile: DeviceProfile | str) -> str:
        """The bandit a device plays: its class's (profile name) or its own."""
        if self.spine.bandit_per == "device":
            return str(client)
        return profile if isinstance(profile, str) else profile.name

    def _bandit(self, key: str) -> DiscountedUCB:
        if key not in self.bandits:
            self.bandits[key] = DiscountedUCB(
                len(self.arms), self.spine.discount, self.spine.exploration
            )
        return self.bandits[key]

    def _credit(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Update each played device's bandit with its round's reward."""
        if self.spine.policy != "bandit":
            return
        rates: dict[int, float] = {}
        times = [_seconds(e) for e in entries if e.get("status") == Outcome.OK and _seconds(e)]
        median = statistics.median(times) if times else 0.0
        penalized = []
        for e in entries:
            if e.get("arm") is None:
                continue
            if e.get("status") == Outcome.LATE:
                penalized.append(e)
            elif e.get("status") == Outcome.OK and "val_after" in e and _seconds(e) > 0:
                gain = float(e["val_before"]) - float(e["val_after"])
                if math.isfinite(gain):
                    rates[int(e["client"])] = gain / max(_seconds(e), median)
        scale = max((abs(r) for r in rates.values()), default=0.0) or 1.0
        for e in sorted(entries, key=lambda e: int(e["client"])):
            client = int(e["client"])
            key = self._key(client, str(e["device"]))
            if client in rates:
                self._bandit(key).update(int(e["arm"]), rates[client] / scale)
            elif e in penalized:
                self._bandit(key).update(int(e["arm"]), -self.spine.deadline_penalty)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every device's bandit."""
        out = {}
        for key, bandit in sorted(self.bandits.items()):
            for name, value in bandit.state_dict().items():
                out[f"{_BANDIT}{key}.{name}"] = value
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the bandits from `state_dict` (other keys are ignored)."""
        per_key: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith(_BANDIT):
                owner, name = key[len(_BANDIT) :].rsplit(".", 1)
                per_key.setdefault(owner, {})[name] = value
        self.bandits = {}
        for owner, values in per_key.items():
            self._bandit(owner).load_state_dict(values)


def _seconds(entry: Mapping[str, Any]) -> float:
    """A device's round time: simulated seconds, else its measured training seconds."""
    return float(entry.get("sim_s") or entry.get("train_s") or 0.0)
