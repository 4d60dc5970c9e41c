"""A device's side of a federation, built once per run: `ClientSession`.

A session holds what `setup` derives from the run's config (model, data partitions,
adapter, runtime links) and the algorithm object, and turns one round's message into a
reply: (client, control, payload bytes, the state the device kept) -> (update bytes,
the state to keep, metrics). Bytes in and out are `encode` bytes, parsed by `decode`
(no pickle); the device's `ClientState` is kept by whoever hosts the session (a Flower
SuperNode's context), so a session that is rebuilt (its process restarted) continues
where the device was. The Flower ClientApp runs it in its own process, or forwards the
message to a long-lived worker that keeps the session (`flower/worker.py`).
"""

from __future__ import annotations

import time
from typing import Any

from edgetune.fed.payloads import ClientState, PayloadError, decode, encode
from edgetune.fed.plan import ClientPlan


class ClientSession:
    """One device's federation: the set-up and the algorithm, built once."""

    def __init__(self, config_text: str):
        import yaml

        from edgetune.config import build
        from edgetune.fed.algorithms import build_algorithm
        from edgetune.fed.config import FederateConfig
        from edgetune.fed.session import setup

        start = time.perf_counter()
        cfg = build(FederateConfig, yaml.safe_load(config_text))
        self.fed = setup(cfg)
        self.algo = build_algorithm(self.fed)
        self.setup_s = time.perf_counter() - start

    def train(
        self, client: int, control: dict[str, Any], payload: bytes, state: bytes | None
    ) -> tuple[bytes, bytes | None, dict[str, float]]:
        """One round of local training for `client` as `control` (round, method, rank)
        plans it; returns (encoded update, encoded state to keep or None, metrics).

        Raises:
            PayloadError: the payload or the kept state does not parse.
        """
        from edgetune.runs import reset_peak_rss, status_mb

        start = time.perf_counter()
        kept = decode(state) if state else None
        if kept is not None and not isinstance(kept, ClientState):
            raise PayloadError("the kept client state is not a client_state payload")
        plan = ClientPlan.from_control(client, self.fed.fleet[client], control)
        if plan.method is None:
            raise PayloadError("the server sent no training method")
        job = self.fed.job(client, int(control["round"]), plan.method)
        measured = reset_peak_rss()
        update, new_state = self.algo.client_update(self.fed.adapter, decode(payload), job, kept)
        metrics = {
            "train_s": time.perf_counter() - start,
            "peak_rss_mb": status_mb("VmHWM") if measured else float("nan"),
        }
        return encode(update), encode(new_state) if new_state is not None else None, metrics
