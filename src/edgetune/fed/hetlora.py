"""Heterogeneous LoRA ranks: clients train ranks r_c <= R; the server keeps one rank-R
adapter and hands each client its own rank back.

Per LoRA layer, client c holds A_c [r_c, in] and B_c [out, r_c] (W + s B_c A_c).

- `truncate`: a client of rank r gets A[:r], B[:, :r] of the global adapter.
- `aggregate_padded` (HetLoRA-style zero padding; Cho et al., "Heterogeneous LoRA for
  Federated Fine-tuning of On-Device Foundation Models", 2024): pad every client to rank
  R with zeros and average each rank component over the clients that trained it
  (weighted by examples), so a component only low-rank clients lack is not diluted by
  their zeros. With equal ranks this is exactly FedAvg of A and B.
- `aggregate_svd` (SVD re-projection): average the products sum_c w_c B_c A_c, which is
  the true mean of the weight updates, and factor it back to rank R with a truncated SVD,
  B = U_R sqrt(S_R), A = sqrt(S_R) V_R^T. Exact whenever the mean has rank <= R.

Every rank uses the global scale alpha / R (a rank-r client is the global adapter with
its tail components removed), so truncation and padding never rescale anything. Clients
attach the global rank-R adapter from the shared seed and view it at their rank
(`at_rank`): the same code runs in the simulator, which shares one model among all
clients, and on a device, which keeps its rank for good.

FedIT aggregates deltas by the padding rule coordinate by coordinate over any kept
shapes (`edgetune.fed.shapes.scatter_combine`, equal to `aggregate_deltas` here for rank
prefixes, which the tests pin), and `svd_states` rebuilds the rank-R global from the
clients' adapters (FedAvg server only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from edgetune.fed.aggregate import weighted_mean

RANK_AGGREGATIONS = ("padded", "svd")


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` components of a LoRA pair (A [R, in], B [out, R])."""
    return a[:rank].clone(), b[:, :rank].clone()


def aggregate_padded(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad to `rank` and average each component over the clients that have it."""
    a_sum = torch.zeros(rank, a_list[0].shape[1], dtype=torch.float64)
    b_sum = torch.zeros(b_list[0].shape[0], rank, dtype=torch.float64)
    cover = torch.zeros(rank, dtype=torch.float64)
    for a, b, w in zip(a_list, b_list, weights, strict=True):
        r = a.shape[0]
        if r > rank or b.shape[1] != r:
            raise ValueError(
                f"client rank {r} (B has {b.shape[1]}) does not fit global rank {rank}"
            )
        a_sum[:r] += w * a.double()
        b_sum[:, :r] += w * b.double()
        cover[:r] += w
    safe = cover.clamp_min(1e-30)
    a_out = (a_sum / safe[:, None]).to(a_list[0].dtype)
    b_out = (b_sum / safe[None, :]).to(b_list[0].dtype)
    return a_out, b_out


def aggregate_svd(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the products B_c A_c and re-factor to rank `rank` by truncated SVD."""
    total = sum(weights)
    mean = sum(
        (w / total) * (b.double() @ a.double())
        for a, b, w in zip(a_list, b_list, weights, strict=True)
    )
    u, s, vh = torch.linalg.svd(mean, full_matrices=False)
    root = s[:rank].sqrt()
    b_out = (u[:, :rank] * root[None, :]).to(b_list[0].dtype)
    a_out = (root[:, None] * vh[:rank]).to(a_list[0].dtype)
    return a_out, b_out


def rank_dim(name: str) -> int | None:
    """The rank axis of a LoRA tensor by its name (A: 0, B: 1); None if not LoRA."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def tensors_rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """The LoRA rank of a set of adapter tensors (None when none is a LoRA tensor).

    Raises:
        ValueError: the tensors disagree about the rank.
    """
    ranks = {t.shape[d] for n, t in tensors.items() if (d := rank_dim(n)) is not None}
    if len(ranks) > 1:
        raise ValueError(f"LoRA tensors of different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def truncate_state(state: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """The first `rank` components of every LoRA tensor (others unchanged); cloned."""
    out = {}
    for name, t in state.items():
        d = rank_dim(name)
        out[name] = (t.narrow(d, 0, min(rank, t.shape[d])) if rank and d is not None else t).clone()
    return out


def aggregate_deltas(
    deltas: list[dict[str, torch.Tensor]],
    weights: list[float],
    reference: dict[str, torch.Tensor],
    combine: Callable[[list[torch.Tensor], list[float]], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Zero-padding aggregation of LoRA deltas of mixed ranks into `reference`'s shapes.

    Rank components [lo, hi) that the same clients trained are combined over exactly
    those clients; components no client trained get a zero delta. With equal ranks this
    is `combine` over whole tensors, i.e. plain FedAvg for the mean rule.
    """
    out = {}
    for name, ref in reference.items():
        d = rank_dim(name)
        if d is None:
            out[name] = combine([x[name] for x in deltas], weights)
            continue
        ranks = [x[name].shape[d] for x in deltas]
        result = torch.zeros_like(ref)
        lo = 0
        for hi in sorted(set(ranks)):
            members = [i for i, r in enumerate(ranks) if r >= hi]
            parts = [deltas[i][name].narrow(d, lo, hi - lo) for i in members]
            result.narrow(d, lo, hi - lo).copy_(combine(parts, [weights[i] for i in members]))
            lo = hi
        out[name] = result
    return out


def svd_states(
    global_state: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    weights: list[float],
) -> dict[str, torch.Tensor]:
    """The new rank-R global from clients' adapters (truncated global + their delta) by
    SVD re-projection of the mean product, pair by pair. Tensors without a LoRA partner
    (e.g. LoRA-FA's B alone) are averaged with zero padding."""
    out = aggregate_deltas(deltas, weights, global_state, weighted_mean)
    out = {n: global_state[n] + d for n, d in out.items()}
    for a_name in [n for n in global_state if rank_dim(n) == 0]:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        if b_name not in global_state:
            continue
        rank = global_state[a_name].shape[0]
        a_list, b_list = [], []
        for x in deltas:
            r = x[a_name].shape[0]
            a_list.append(global_state[a_name][:r] + x[a_name])
            b_list.append(global_state[b_name][:, :r] + x[b_name])
        out[a_name], out[b_name] = aggregate_svd(a_list, b_list, weights, rank)
    return out


@contextmanager
def at_rank(adapter: Any, rank: int | None) -> Iterator[None]:
    """Within the block, every LoRA layer of `adapter` is its first `rank` components
    (scale unchanged), as new parameters under the same names; the full-rank tensors
    come back on exit. No-op for None or the adapter's own rank."""
    from edgetune.peft.multicopy import lora_layers

    layers: list[Any] = lora_layers(adapter.model) if rank else []
    saved = []
    for layer in layers:
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        if a.weight.shape[0] == rank:
            continue
        if rank > a.weight.shape[0]:
            raise ValueError(f"cannot view a rank-{a.weight.shape[0]} adapter at rank {rank}")
        saved.append((layer, a.weight, b.weight, layer.r["default"]))
        a.weight = torch.nn.Parameter(a.weight.data[:rank].clone(), a.weight.requires_grad)
        b.weight = torch.nn.Parameter(b.weight.data[:, :rank].clone(), b.weight.requires_grad)
        layer.r["default"] = rank
    try:
        yield
    finally:
        for layer, a_weight, b_weight, r in saved:
            layer.lora_A["default"].weight = a_weight
            layer.lora_B["default"].weight = b_weight
            layer.r["default"] = r
