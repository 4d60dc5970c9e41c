"""FedSpine's settings: the `spine` section of a federated run (read only by fedspine).

The arms of every device's bandit are the pairs (pruning level, LoRA rank) of
`spine.levels` x `spine.ranks`. A level is a multiple of the round's scheduled sparsity
(cubic ramp from 0 to `spine.target_sparsity` over the first `spine.ramp` of the rounds),
so a device at level 1.5 in a round scheduled at 0.2 prunes 30 % of its units; the fleet's
average follows the schedule when the bandits choose levels around 1, and the report says
what they chose. A bandit learns from every round its devices play; with few rounds per
device (a 10-device fleet at half participation plays each device ~7 times in 15 rounds,
fewer than the 6 default arms need), `spine.bandit_per=class` pools the devices of one
profile, which share compute and links, into one bandit.

`spine.units=mlp` (the default) prunes MLP channels only. Key/value head groups are few
in small grouped-query models (SmolLM2-135M has 3 per layer), so a ratio of 0.17 or more
removes a third of a layer's attention at once; measured on the FedSpine benchmark,
evaluation accuracy fell from 0.81 to 0.43 when the schedule crossed that point and local
LoRA rounds did not bring it back. `mlp,heads` prunes both. `spine.policy` picks the arm chooser: the discounted-UCB bandit, random
arms (the ablation) or one uniform arm (level 1 at the global rank: uniform pruning, the
baseline the paper compares with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.config import check_choice, check_positive, option
from edgetune.errors import ConfigError

POLICIES = ("bandit", "random", "uniform")
RANKINGS = ("layer", "global")
BANDIT_KEYS = ("class", "device")
UNIT_CHOICES = ("mlp", "mlp,heads")
MAX_RATIO = 0.95  # the most an arm may prune (a larger ratio leaves layers almost empty)


def parse_list(name: str, text: str, kind: type) -> list:
    """`"0.5,1,1.5"` as a list of `kind`; raises ConfigError naming the setting."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"spine.{name}={text!r}: expected a comma-separated list") from None
    if not values:
        raise ConfigError(f"spine.{name} is empty; give at least one value")
    return values


@dataclass
class SpineConfig:
    """FedSpine: per-device pruning ratio and LoRA rank chosen by a bandit."""

    target_sparsity: float = option(
        0.3,
        "fraction of MLP channels and key/value heads pruned at level 1, after the ramp",
        flag="--target-sparsity",
    )
    ramp: float = option(0.5, "fraction of the rounds over which sparsity ramps up (cubic)")
    levels: str = option(
        "0.5,1,1.5", "pruning levels of the arms, as multiples of the scheduled sparsity"
    )
    ranks: str = option("", "LoRA ranks of the arms ('' = peft.rank/2 and peft.rank)")
    policy: str = option("bandit", "bandit (discounted UCB) | random | uniform (level 1)")
    bandit_per: str = option(
        "class", "one bandit per device class (profile name), pooling its plays | device"
    )
    discount: float = option(0.9, "bandit: discount of past rewards per play (0, 1]")
    exploration: float = option(0.5, "bandit: UCB exploration weight")
    deadline_penalty: float = option(1.0, "reward of a round that missed fed.deadline_s: -this")
    reorder_every: int = option(
        3, "rounds between re-orderings of the units from the clients' statistics (0 = never)"
    )
    val_rows: int = option(8, "rows of its own data a device scores before and after training")
    ranking: str = option("layer", "layer (uniform widths) | global (units compete across layers)")
    units: str = option(
        "mlp",
        "unit kinds pruned: mlp (MLP channels) | mlp,heads (and key/value head groups)",
    )

    def __post_init__(self) -> None:
        check_choice("spine", "policy", self.policy, POLICIES)
        check_choice("spine", "ranking", self.ranking, RANKINGS)
        check_choice("spine", "bandit_per", self.bandit_per, BANDIT_KEYS)
        check_choice("spine", "units", self.units, UNIT_CHOICES)
        for name in ("target_sparsity", "ramp", "discount", "exploration", "deadline_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"spine.{name}: expected a finite number, got {value!r}")
        if not 0.0 <= self.target_sparsity < MAX_RATIO:
            raise ConfigError(
                f"spine.target_sparsity={self.target_sparsity} must be in [0, {MAX_RATIO}); "
                "it is the fraction of units pruned, e.g. 0.3"
            )
        if not 0.0 < self.ramp <= 1.0:
            raise ConfigError(f"spine.ramp={self.ramp}: expected (0, 1], e.g. 0.5")
        if not 0.0 < self.discount <= 1.0:
            raise ConfigError(f"spine.discount={self.discount}: expected (0, 1], e.g. 0.8")
        check_positive("spine", "exploration", self.exploration, allow_zero=True)
        check_positive("spine", "deadline_penalty", self.deadline_penalty, allow_zero=True)
        check_positive("spine", "reorder_every", self.reorder_every, allow_zero=True)
        check_positive("spine", "val_rows", self.val_rows)
        levels = self.level_values()
        if any(not (math.isfinite(v) and v >= 0) for v in levels):
            raise ConfigError(f"spine.levels={self.levels!r}: levels must be finite and >= 0")
        if max(levels) == 0 and self.target_sparsity > 0:
            # every arm's ratio is level x sparsity = 0: the run would claim a target
            # sparsity and prune nothing
            raise ConfigError(
                f"spine.levels={self.levels!r} has no level above 0, so every arm prunes "
                f"0 % and spine.target_sparsity={self.target_sparsity} never acts; give a "
                "level > 0 (e.g. spine.levels=0,1,1.5; a 0 level is an arm that does not "
                "prune), or --target-sparsity 0 to tune LoRA ranks only"
            )
        if self.target_sparsity * max(levels) > MAX_RATIO:
            raise ConfigError(
                f"spine.levels={self.levels!r} at spine.target_sparsity={self.target_sparsity} "
                f"asks to prune {self.target_sparsity * max(levels):.0%} of the units, which "
                f"leaves almost none (at most {MAX_RATIO:.0%}); lower the largest level or the "
                "target sparsity"
            )
        if self.ranks:
            parse_list("ranks", self.ranks, int)

    def check_read(self, deadline: bool) -> None:
        """Refuse the settings the policy (or a run without a deadline) ignores.

        Raises:
            ConfigError: names the setting and why it is not read.
        """
        unread: dict[str, str] = {}
        if not deadline:
            unread["deadline_penalty"] = "no round has a deadline (fed.deadline_s=0)"
        if self.policy != "bandit":
            for name in ("bandit_per", "discount", "exploration", "deadline_penalty"):
                unread[name] = f"spine.policy={self.policy} plays no bandit"
        if self.policy == "uniform":
            for name in ("levels", "ranks"):
                unread[name] = "spine.policy=uniform plays level 1 at the global rank"
        default = SpineConfig()
        for name, why in unread.items():
            value = getattr(self, name)
            if value != getattr(default, name):
                raise ConfigError(f"spine.{name}={value!r} is not read: {why}; drop it")

    def unit_kinds(self) -> tuple[str, ...]:
        """The unit kinds `select_kept` prunes."""
        return tuple(self.units.split(","))

    def level_values(self) -> list[float]:
        """The pruning levels, in order."""
        return parse_list("levels", self.levels, float)

    def rank_values(self, global_rank: int) -> list[int]:
        """The arms' LoRA ranks (sorted, unique), each in [1, global_rank].

        Raises:
            ConfigError: a rank outside [1, peft.rank].
        """
        if not self.ranks:
            return sorted({max(1, global_rank // 2), global_rank})
        ranks = parse_list("ranks", self.ranks, int)
        bad = [r for r in ranks if not 1 <= r <= global_rank]
        if bad:
            raise ConfigError(
                f"spine.ranks={self.ranks!r}: ranks {bad} are outside [1, peft.rank="
                f"{global_rank}]; the arms train rank prefixes of the global adapter"
            )
        return sorted(set(ranks))

    def ratio(self, level: float, sparsity: float) -> float:
        """The pruning ratio of an arm at `level` in a round scheduled at `sparsity`."""
        return level * sparsity
