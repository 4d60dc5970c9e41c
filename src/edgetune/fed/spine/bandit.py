"""Discounted UCB: the per-device bandit that picks FedSpine's (pruning ratio, LoRA rank) arm.

Garivier & Moulines, "On Upper-Confidence Bound Policies for Switching Bandit Problems"
(ALT 2011). Each device keeps, per arm i, a discounted play count and reward sum

    n_i <- gamma * n_i + [i played],   s_i <- gamma * s_i + [i played] * r,

so a play k steps ago weighs gamma^k. It plays an allowed arm it has never played (n_i = 0,
lowest index first), else

    argmax over allowed i of  s_i / n_i + c * sqrt(2 * log(N) / n_i),   N = sum_i n_i,

with N summed over all arms (masked ones too) and ties to the lowest index. Shapes: the
state is two float64 vectors of length A (`num_arms`).

Why discounted: a device's best arm drifts. Its availability, uplink bandwidth and
thermal throttling change during a run, so an arm that was best twenty participations ago
may not be now. Plain UCB1's counts only grow, its bonus shrinks, and after a change it
keeps the old arm for a long time; discounting caps the effective count at
1 / (1 - gamma), so an arm left alone regains a large bonus and is tried again.

Reward: the caller's scalar per play (e.g. accuracy gain minus a time or energy cost),
normalized to about [-1, 1]; the exploration scale below assumes that range.

Defaults: `discount=0.9` remembers about 1 / (1 - 0.9) = 10 plays, which suits federated
runs where a device takes part tens of times and its conditions change every few dozen
participations (use ~0.99 for a stationary problem). `exploration=1.0` is UCB1's bonus for
rewards of unit scale; raise it for noisier rewards, lower it to exploit sooner. The
price of a short memory: the discounted counts total at most 1 / (1 - gamma), so with A
arms each holds ~10 / A plays and the bonus outweighs gaps of ~0.1 between means. On 6
Gaussian arms (means 0.1..0.6, sigma 0.2) the best arm is still the most played, but only
~21% of plays at the defaults, ~30% at discount 0.99, ~66% at 0.99 with exploration 0.25.

Everything is float64 Python arithmetic in a fixed order, with no RNG, so a bandit
restored from `state_dict` makes the same choices bit for bit as one that never stopped.
`random_arm` is the "random arms" baseline, seeded explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

_STATE_KEYS = ("counts", "sums")


class DiscountedUCB:
    """One device's bandit over `num_arms` arms: discounted UCB (Garivier & Moulines 2011).

    Args:
        num_arms: Number of arms A (>= 1).
        discount: gamma in (0, 1]; 1.0 is plain (undiscounted) UCB1.
        exploration: Scale c >= 0 of the confidence bonus.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, num_arms: int, discount: float = 0.9, exploration: float = 1.0):
        if isinstance(num_arms, bool) or not isinstance(num_arms, int) or num_arms < 1:
            raise ValueError(f"num_arms must be an int >= 1, got {num_arms!r}")
        if not (0.0 < discount <= 1.0):
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        if not (math.isfinite(exploration) and exploration >= 0.0):
            raise ValueError(f"exploration must be finite and >= 0, got {exploration!r}")
        self.num_arms = num_arms
        self.discount = float(discount)
        self.exploration = float(exploration)
        self._counts = [0.0] * num_arms
        self._sums = [0.0] * num_arms

    def select(self, allowed: Sequence[bool]) -> int:
        """The arm to play next among the allowed ones.

        Args:
            allowed: Mask of length A; True where the arm may be played this round.

        Returns:
            An allowed arm index: the lowest never-played allowed arm, else the allowed arm
            with the highest upper confidence bound (ties to the lowest index).

        Raises:
            ValueError: If the mask has the wrong length or allows no arm.
        """
        arms = _allowed_indices(allowed, self.num_arms)
        for i in arms:
            if self._counts[i] == 0.0:
                return i
        # N >= 1 after any play (N <- gamma * N + 1); max(., 0) guards a loaded state.
        log_total = max(math.log(sum(self._counts)), 0.0)
        best_arm, best_score = arms[0], -math.inf
        for i in arms:
            n = self._counts[i]
            score = self._sums[i] / n + self.exploration * math.sqrt(2.0 * log_total / n)
            if score > best_score:
                best_arm, best_score = i, score
        return best_arm

    def update(self, arm: int, reward: float) -> None:
        """Record that `arm` was played and earned `reward`; discounts every arm first.

        Args:
            arm: The arm played, in [0, A).
            reward: Its reward, finite (about [-1, 1]).

        Raises:
            ValueError: If the arm is out of range or the reward is not finite.
        """
        if isinstance(arm, bool) or not isinstance(arm, int) or not 0 <= arm < self.num_arms:
            raise ValueError(f"arm must be an int in [0, {self.num_arms}), got {arm!r}")
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        gamma = self.discount
        self._counts = [gamma * n for n in self._counts]
        self._sums = [gamma * s for s in self._sums]
        self._counts[arm] += 1.0
        self._sums[arm] += reward

    def means(self) -> list[float]:
        """Discounted mean reward per arm; nan for an arm with discounted count 0."""
        return [
            s / n if n > 0.0 else math.nan for n, s in zip(self._counts, self._sums, strict=True)
        ]

    def best(self, allowed: Sequence[bool] | None = None) -> int:
        """The arm to deploy: highest discounted mean among played allowed arms.

        Args:
            allowed: Optional mask of length A; None allows every arm.

        Returns:
            The played allowed arm with the highest mean (ties to the lowest index), or the
            lowest allowed index if no allowed arm has been played.

        Raises:
            ValueError: If the mask has the wrong length or allows no arm.
        """
        arms = _allowed_indices(
            [True] * self.num_arms if allowed is None else allowed, self.num_arms
        )
        means = self.means()
        played = [i for i in arms if self._counts[i] > 0.0]
        if not played:
            return arms[0]
        return max(played, key=lambda i: (means[i], -i))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bandit's state: {"counts": float64 [A], "sums": float64 [A]}."""
        return {
            "counts": torch.tensor(self._counts, dtype=torch.float64),
            "sums": torch.tensor(self._sums, dtype=torch.float64),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a state from `state_dict` (exact: later choices match bit for bit).

        Args:
            state: {"counts": [A], "sums": [A]} tensors.

        Raises:
            ValueError: On missing or extra keys, a shape other than [A], a non-finite
                value or a negative count; the message names the key.
        """
        if set(state) != set(_STATE_KEYS):
            raise ValueError(
                f"bandit state must have keys {list(_STATE_KEYS)}, got {sorted(state)}"
            )
        values = {}
        for key in _STATE_KEYS:
            tensor = torch.as_tensor(state[key])
            if tuple(tensor.shape) != (self.num_arms,):
                raise ValueError(
                    f"bandit state {key!r} has shape {tuple(tensor.shape)}, expected "
                    f"({self.num_arms},) for num_arms={self.num_arms}"
                )
            tensor = tensor.to(torch.float64)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"bandit state {key!r} has non-finite values")
            values[key] = tensor.tolist()
        if any(n < 0.0 for n in values["counts"]):
            raise ValueError("bandit state 'counts' has negative values")
        self._counts, self._sums = values["counts"], values["sums"]


def random_arm(allowed: Sequence[bool], seed: int) -> int:
    """The "random arms" baseline: an allowed arm drawn uniformly, deterministic in `seed`.

    Args:
        allowed: Mask; True where the arm may be played.
        seed: Seed of the `torch.Generator` used for this one draw.

    Returns:
        An allowed arm index.

    Raises:
        ValueError: If no arm is allowed.
    """
    arms = _allowed_indices(allowed, len(allowed))
    generator = torch.Generator().manual_seed(seed)
    return arms[int(torch.randint(len(arms), (1,), generator=generator))]


def _allowed_indices(allowed: Sequence[bool], num_arms: int) -> list[int]:
    if len(allowed) != num_arms:
        raise ValueError(f"arm mask has length {len(allowed)}, expected {num_arms}")
    arms = [i for i, ok in enumerate(allowed) if bool(ok)]
    if not arms:
        raise ValueError("arm mask allows no arm; allow at least one")
    return arms
