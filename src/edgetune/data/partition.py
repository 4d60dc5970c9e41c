"""Federated partitioning: which example indices each simulated client holds.

Schemes (strings, as in configs and on the command line):
- `iid`: a seeded permutation cut into `num_clients` near-equal parts.
- `dirichlet:ALPHA`: label skew (Hsu et al. 2019). For each class, proportions over
  clients are drawn from Dirichlet(ALPHA) and the class's (shuffled) examples are cut
  accordingly; small ALPHA -> each client sees few classes. Needs labels.
- `shards:K`: pathological label skew (McMahan et al. 2017). Examples sorted by label
  (random order within a label) are cut into num_clients*K shards and each client is
  dealt K shards; K=1 gives about one label per client. Needs labels.
- `quantity:ALPHA`: quantity skew. Client sizes follow Dirichlet(ALPHA) with content IID.

Guarantees, for every scheme: the clients' index lists are disjoint, together they cover
every index 0..n-1 (each index is assigned to exactly one client), no client is empty,
and the result is a pure function of the arguments (numpy `default_rng(seed)`, never the
global RNG). For `dirichlet`, a client left empty by the draw receives one example taken
at random from the largest client; for `quantity`, every client gets 1 example before
the Dirichlet-proportional remainder. Each client's indices are returned sorted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edgetune.errors import ConfigError, DataError

SCHEME_FORMS = "iid, dirichlet:ALPHA (e.g. dirichlet:0.5), shards:K (e.g. shards:2), quantity:ALPHA"


def parse_scheme(scheme: str) -> tuple[str, float]:
    """Split "name:param" into (name, param); iid has param 0.

    Raises:
        ConfigError: an unknown name or a bad parameter; lists the valid forms.
    """
    name, _, raw = scheme.strip().partition(":")
    if name == "iid" and not raw:
        return name, 0.0
    if name in SCHEMES and name != "iid" and raw:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        integer_ok = name != "shards" or value.is_integer()
        if value > 0 and integer_ok:
            return name, value
    raise ConfigError(
        f"partition scheme {scheme!r} is not valid; use one of: {SCHEME_FORMS} "
        f"(ALPHA > 0, K a positive integer)"
    )


def _iid(
    labels: np.ndarray, num_clients: int, _: float, rng: np.random.Generator
) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(labels)), num_clients)


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[client].append(taken)
    return [np.array(p, dtype=int) for p in parts]


def _shards(
    labels: np.ndarray, num_clients: int, param: float, rng: np.random.Generator
) -> list[np.ndarray]:
    k = int(param)
    if num_clients * k > len(labels):
        raise DataError(
            f"shards:{k} needs {num_clients * k} shards but there are only {len(labels)} "
            f"examples; lower K or the number of clients"
        )
    tiebreak = rng.permutation(len(labels))
    order = np.lexsort((tiebreak, labels))  # by label, random within a label
    shards = np.array_split(order, num_clients * k)
    dealt = rng.permutation(num_clients * k)
    return [
        np.concatenate([shards[s] for s in dealt[c * k : (c + 1) * k]]) for c in range(num_clients)
    ]


def _quantity(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    n = len(labels)
    shares = rng.dirichlet(np.full(num_clients, alpha))
    sizes = 1 + rng.multinomial(n - num_clients, shares)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


SCHEMES: dict[str, Callable[[np.ndarray, int, float, np.random.Generator], list[np.ndarray]]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "quantity": _quantity,
}


def partition(
    n: int,
    num_clients: int,
    scheme: str,
    seed: int,
    labels: Sequence[int] | None = None,
) -> list[list[int]]:
    """Assign example indices 0..n-1 to clients.

    Args:
        n: number of examples.
        num_clients: number of clients (each gets at least one example).
        scheme: "iid", "dirichlet:ALPHA", "shards:K" or "quantity:ALPHA".
        seed: the partition's seed.
        labels: class index of each example (needed by dirichlet and shards).

    Returns:
        One sorted index list per client; disjoint, covering all n indices.

    Raises:
        ConfigError: a bad scheme string, num_clients < 1, or labels missing/mismatched.
        DataError: more clients (or shards) than examples.
    """
    name, param = parse_scheme(scheme)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(
            f"cannot give {num_clients} clients at least one example each from {n} "
            f"examples; use fewer clients or more data (raise data.train_size)"
        )
    if name in ("dirichlet", "shards") and (labels is None or len(labels) != n):
        got = "none" if labels is None else f"{len(labels)}"
        raise ConfigError(
            f"partition scheme {scheme!r} needs one label per example ({n}), got {got}; "
            f"use a classification dataset, or iid / quantity:ALPHA"
        )
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels) if labels is not None else np.zeros(n, dtype=int)
    parts = SCHEMES[name](label_array, num_clients, param, rng)
    return [sorted(int(i) for i in part) for part in parts]
