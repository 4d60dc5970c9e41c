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

Not wired into the simulator yet: these are the server-side rules, tested on their own.
"""

from __future__ import annotations

import torch


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
