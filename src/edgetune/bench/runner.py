"""`edgetune bench WHICH`: every benchmark, the flags it reads and how it starts.

A `Bench` names the bench flags it reads (beside --model, --output and --threads, which
all read); any other bench flag given with a value other than its default would be
ignored, so it is refused. Each benchmark module is imported only when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from edgetune.errors import ConfigError


def _never(args: argparse.Namespace) -> bool:
    return False


def _quick(args: argparse.Namespace) -> bool:
    return bool(args.quick)


@dataclass(frozen=True)
class Bench:
    """One benchmark: how it runs, what it reads, and its default model and steps."""

    run: Callable[[argparse.Namespace], None]
    reads: tuple[str, ...]
    small: Callable[[argparse.Namespace], bool] = _never  # stories260k by default
    steps: int = 3


def _memory(a: argparse.Namespace) -> None:
    from edgetune.bench import memory

    memory.run(a.model, a.batch_size, a.seq_len, a.steps, a.output)


def _zo(a: argparse.Namespace) -> None:
    from edgetune.bench import zo

    zo.run(a.model, a.peft, a.steps, a.tta_steps, a.output, a.plot)


def _fed(a: argparse.Namespace) -> None:
    from edgetune.bench import fed

    fed.check(a.rows)
    fed.run(a.model, a.rounds or 15, a.clients or 10, a.output, "docs", a.seeds, a.rows, a.work)


def _fedspine(a: argparse.Namespace) -> None:
    from edgetune.bench import fedspine

    fedspine.run(
        a.model, a.rounds or 12, a.seeds, a.output, a.work, a.eval_size or 100, a.train_size
    )


def _flower(a: argparse.Namespace) -> None:
    from edgetune.bench import flower

    flower.run(a.model, a.rounds or 3, a.clients or 2, a.output)


def _robust(a: argparse.Namespace) -> None:
    from edgetune.bench import robust

    robust.run(a.model, a.rounds or 4, a.clients or 10, a.output)


def _privacy(a: argparse.Namespace) -> None:
    from edgetune.bench import privacy

    privacy.run(a.model, a.rounds or 20, a.seeds, a.output)


def _threads(a: argparse.Namespace) -> None:
    from edgetune.bench import threads

    threads.run(a.model, a.batch_size, a.seq_len, a.steps, a.output)


def _compress(a: argparse.Namespace) -> None:
    from edgetune.bench import compress

    compress.run(a.model, a.output, a.work, a.quick, a.threads, a.seeds, a.adapter)


def _ondevice(a: argparse.Namespace) -> None:
    from edgetune.bench import ondevice

    ondevice.run(a.model, a.output, a.work, a.threads, a.steps, a.seeds)


def _tasks(a: argparse.Namespace) -> None:
    from edgetune.bench import tasks

    rows = a.rows or list(tasks.QUICK if a.quick else tasks.ROWS)
    tasks.check(a.tasks, rows, a.quick)
    tasks.run(a.model, a.tasks, a.seeds, rows, a.output, a.work, a.quick)


BENCHES: dict[str, Bench] = {
    "memory": Bench(_memory, ("batch_size", "seq_len", "steps")),
    "zo": Bench(_zo, ("peft", "steps", "tta_steps", "plot")),
    "fed": Bench(_fed, ("rounds", "clients", "seeds", "rows", "work")),
    "fedspine": Bench(_fedspine, ("rounds", "seeds", "work", "eval_size", "train_size")),
    "flower": Bench(_flower, ("rounds", "clients")),
    "robust": Bench(_robust, ("rounds", "clients"), small=lambda a: True),
    "privacy": Bench(_privacy, ("rounds", "seeds"), small=lambda a: True),
    "threads": Bench(_threads, ("batch_size", "seq_len", "steps")),
    "compress": Bench(_compress, ("quick", "seeds", "adapter", "work"), small=_quick),
    "ondevice": Bench(_ondevice, ("steps", "seeds", "work"), steps=20),
    "tasks": Bench(_tasks, ("quick", "seeds", "work", "tasks", "rows"), small=_quick),
}


def check_flags(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Refuse a bench flag the chosen benchmark would ignore (given: differs from
    `defaults`, the namespace of `edgetune bench WHICH` alone).

    Raises:
        ConfigError: names the flags and what the benchmark reads.
    """
    reads = BENCHES[args.which].reads
    flags = {name for bench in BENCHES.values() for name in bench.reads}
    ignored = [
        f"--{name.replace('_', '-')}"
        for name in sorted(flags - set(reads))
        if getattr(args, name) != getattr(defaults, name)
    ]
    if ignored:
        listed = "".join(f", --{n.replace('_', '-')}" for n in reads)
        raise ConfigError(
            f"bench {args.which} does not use {', '.join(ignored)}; drop it (bench "
            f"{args.which} reads --model, --output, --threads{listed})"
        )


def prepare(args: argparse.Namespace) -> Bench:
    """The chosen benchmark, with its default model, steps and work folder filled in."""
    bench = BENCHES[args.which]
    args.model = args.model or ("stories260k" if bench.small(args) else "smollm2-135m")
    args.steps = args.steps or bench.steps
    args.work = args.work or f"runs/bench-{args.which}"
    return bench
