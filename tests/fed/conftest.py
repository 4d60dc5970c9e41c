"""Fixtures of the federated tests."""

from __future__ import annotations

import pytest

from edgetune.cli import main


@pytest.fixture
def killed_in_round_3(monkeypatch):
    """`run(args)`: run `edgetune federate args` until it is interrupted as round 3 starts
    (a KeyboardInterrupt from the round loop), leaving rounds 1-2 checkpointed."""
    import edgetune.fed.rounds as rounds

    original = rounds.play_round

    def die_in_round_3(fed, algo, transport, planner, rnd, history):
        if rnd == 2:
            raise KeyboardInterrupt
        return original(fed, algo, transport, planner, rnd, history)

    def run(args: list[str]) -> None:
        monkeypatch.setattr(rounds, "play_round", die_in_round_3)
        try:
            with pytest.raises(KeyboardInterrupt):
                main(args)
        finally:
            monkeypatch.setattr(rounds, "play_round", original)

    return run
