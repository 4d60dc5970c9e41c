"""Client-level differential privacy for federated rounds (`fed.dp.*`, the `dp` section):
central (`dp.where=server`: the server clips each client's update and adds Gaussian
noise to their sum) or local (`dp.where=device`: each device clips and noises its own
update before it leaves, for a server that is not trusted).

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018). Each accepted update u_c is clipped to L2 norm C, and the round's aggregate is

    delta = (sum_c clip(u_c) + N(0, sigma^2 C^2 I)) / m

with m the number of clients selected per round (a fixed denominator: a client that
drops out or is rejected does not change it, so one client moves delta by at most C / m
before noise). What u_c is depends on the update kind:

- an adapter delta (FedIT, FwdLLM; a ZO device's seed trace, replayed into one): the
  delta over every adapter tensor;
- a seed-pool trace (FedKSeed): the client's summed scalar on each of the K pool seeds (a
  K-vector); the noise goes on every one of the K seeds, as DP-ZO does (Tang et al., 2024,
  arXiv 2401.04343): one scalar per direction, whatever the model size, so the broadcast
  carries all K scalars instead of the few a round touched.

Accounting: Opacus' RDP accountant for the subsampled Gaussian mechanism, one step per
round at sampling rate q = m / N. The accountant assumes Poisson sampling; edgetune
selects exactly m of N clients per round, the usual approximation. epsilon for
`dp.delta` (default 1 / N) after each round goes to metrics.jsonl and the summary; with
`dp.epsilon` set, the run stops before the round that would exceed it.

The noise is secret: it is drawn from a server secret made at the first start (never in
the config, which every device receives) and kept in the server's checkpoint, so a
resumed run adds the same noise and a device that knows the run seed cannot remove it.
Two fresh runs of one config therefore differ.

Local DP (`dp.where=device`, DeltaAlgorithm clients: FedIT, FwdLLM): each device sends

    u_c' = clip(u_c) + N(0, sigma^2 C^2 I)

drawn from a secret of its own (kept in its client state, never sent), and the server
averages the noised updates with the same fixed denominator m. A ZO device sends the
delta its steps made (noised) instead of its replayable seed trace. The server no longer
sees a clean update, so the guarantee holds against it too, at a price: the mean holds
m noise draws instead of one, sqrt(m) times the central noise. Accounting is for one
device's releases seen by the server: two datasets of a device give clipped updates up to
2C apart (sensitivity 2C, so noise multiplier sigma / 2), and the server knows when it
selected the device, so no amplification by sampling: every round is counted, at
sampling rate 1 (a bound for a device selected every round). The server's norm check
widens to what an honest noised update can reach (`update_bound`).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from edgetune.config import check_choice, option
from edgetune.errors import ConfigError
from edgetune.zo.seeds import Stream, generator, stream_seed

WHERE = ("server", "device")


@dataclass
class DPConfig:
    """Client-level differential privacy: central (the server clips and adds noise) or
    local (each device clips and noises its own update)."""

    noise: float = option(
        0.0,
        "noise multiplier sigma: Gaussian noise of std sigma x dp.clip on the sum of the "
        "round's clipped updates (0 = no differential privacy)",
    )
    clip: float = option(1.0, "L2 bound of each client's update (adapter delta or seed scalars)")
    delta: float = option(0.0, "delta of the (epsilon, delta) guarantee (0 = 1 / fed.clients)")
    epsilon: float | None = option(
        None, "privacy budget: stop before a round would exceed this epsilon (none = no budget)"
    )
    where: str = option(
        "server",
        "where the noise is added: server (central DP; the server sees each clipped update) "
        "| device (local DP; each device noises its own update, the server sees no clean one)",
    )

    def __post_init__(self) -> None:
        for name in ("noise", "clip", "delta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"dp.{name}: expected a finite number >= 0, got {value!r}")
        if self.clip == 0:
            raise ConfigError("dp.clip: expected a number > 0 (the L2 bound of an update)")
        if self.delta >= 1:
            raise ConfigError(f"dp.delta: expected a value in [0, 1), got {self.delta}")
        check_choice("dp", "where", self.where, WHERE)
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(
                f"dp.epsilon: a budget must be a number > 0, got {self.epsilon!r}; drop it "
                "for no budget"
            )


class Privacy:
    """The mechanism and its accountant for one federation (see the module docstring)."""

    def __init__(self, cfg: DPConfig, clients: int, per_round: int, run_seed: int):
        self.sigma, self.clip = cfg.noise, cfg.clip
        self.per_round, self.rate = per_round, per_round / clients
        self.delta = cfg.delta or 1.0 / clients
        self.budget = cfg.epsilon
        self.run_seed = run_seed
        self.local = cfg.where == "device"
        self.secret = secrets.randbits(62)  # the server's; replaced from its checkpoint

    def epsilon(self, rounds: int) -> float:
        """epsilon after `rounds` rounds, for `self.delta` (0 before any round); local DP
        counts every round at noise multiplier sigma / 2 (see the module docstring)."""
        from opacus.accountants import RDPAccountant

        if rounds <= 0:
            return 0.0
        accountant = RDPAccountant()
        if self.local:
            accountant.history = [(self.sigma / 2, 1.0, rounds)]
        else:
            accountant.history = [(self.sigma, self.rate, rounds)]
        return float(accountant.get_epsilon(delta=self.delta))

    def privatize(self, update: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """A device's release under local DP: `update` clipped to dp.clip, plus Gaussian
        noise of std sigma x clip drawn from `seed` (the device's secret stream)."""
        scale = _clip_scale(update, self.clip)
        gen = generator(seed)
        std = self.sigma * self.clip
        return {
            n: (
                t.double() * scale + torch.randn(t.shape, generator=gen, dtype=torch.float64) * std
            ).to(t.dtype)
            for n, t in update.items()
        }

    def device_secret(self, client: int) -> int:
        """A device's local-DP secret (62 bits), made at its first private round and kept
        in its client state. It derives from this process's secret: on a real device
        that is the device's own (made at its start, never sent), in the simulator the
        server's, so a resumed simulation draws every device's noise again exactly."""
        return stream_seed(self.run_seed, Stream.DP_DEVICE, self.secret, client, -1) >> 1

    def update_bound(self, numel: int) -> float:
        """The largest norm an honest device's noised update reaches under local DP: the
        clip plus the noise's norm, sigma C (sqrt(d) + 10) (the chi tail past that is
        below e^-50)."""
        return self.clip + self.sigma * self.clip * (math.sqrt(numel) + 10.0)

    def exceeds(self, rounds: int) -> bool:
        """Whether `rounds` rounds would spend more than the budget."""
        return self.budget is not None and self.epsilon(rounds) > self.budget

    def mean(self, rnd: int, updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """(sum of the clipped updates + noise) / m, tensor by tensor (every update has
        the same names and shapes); the noise of round `rnd` is drawn from the secret.
        Under local DP the updates came clipped and noised: sum / m."""
        names = list(updates[0])
        total = {n: torch.zeros_like(updates[0][n], dtype=torch.float64) for n in names}
        for update in updates:  # under local DP each update came clipped and noised
            scale = 1.0 if self.local else _clip_scale(update, self.clip)
            for n in names:
                total[n] += update[n].double() * scale
        gen = generator(stream_seed(self.run_seed, Stream.DP, self.secret, rnd))
        std = 0.0 if self.local else self.sigma * self.clip
        out = {}
        for n in names:
            noise = torch.randn(total[n].shape, generator=gen, dtype=torch.float64) * std
            out[n] = ((total[n] + noise) / self.per_round).to(updates[0][n].dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server secret (for the checkpoint only; it never leaves the server)."""
        return {"dp.secret": torch.tensor([self.secret], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the secret from `state_dict` (absent: keep this start's)."""
        if "dp.secret" in state:
            self.secret = int(state["dp.secret"][0])


def _clip_scale(update: dict[str, torch.Tensor], clip: float) -> float:
    """The factor that brings `update`'s L2 norm (over every tensor) to at most `clip`."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    return min(1.0, clip / norm) if norm > 0 else 1.0
