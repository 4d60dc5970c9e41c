"""Which training examples a step sees: a stateless function of (seed, step).

Training walks through a new permutation of the data each epoch; step k takes positions
[k*b, (k+1)*b) of the endless sequence of epoch permutations. Nothing is carried between
steps, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import torch

from edgetune.zo.seeds import Stream, generator, stream_seed


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the examples for 0-based `step`.

    Args:
        step: 0-based step.
        n: number of training examples.
        batch_size: examples per step.
        seed: run seed.
    """
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=generator(stream_seed(seed, Stream.DATA, epoch)))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        position += take
    return out
