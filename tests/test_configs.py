"""Every shipped example config (`configs/*.yaml`) loads through the resolver of its
command (`finetune-*.yaml` -> `edgetune finetune`, `federate-*.yaml` -> `edgetune
federate`) with no unknown key and every value acting; the demo's configs say what the
demo runs; and one of them trains for real on stories260K."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetune import cli
from edgetune.config import resolve_config, to_dict
from edgetune.errors import ConfigError
from edgetune.recipes import demo
from edgetune.recipes.federate import FederateConfig
from edgetune.recipes.finetune import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMANDS = {"finetune": FinetuneConfig, "federate": FederateConfig}
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def _command(path: Path) -> str:
    return path.name.split("-")[0]


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_configs_are_shipped_and_named_after_their_command():
    assert len(SHIPPED) >= 8
    assert {_command(p) for p in SHIPPED} == set(COMMANDS), [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_resolves_and_every_value_is_used(path):
    cfg = resolve_config(COMMANDS[_command(path)], path)
    written = _leaves(yaml.safe_load(path.read_text()))
    resolved = _leaves(to_dict(cfg))
    assert {k: resolved[k] for k in written} == written
    assert path.read_text().startswith("# "), "a config opens with what it runs and how"
    assert f"edgetune {_command(path)} --config configs/{path.name}" in path.read_text()


def test_an_unknown_key_in_a_config_fails_and_names_the_closest(tmp_path):
    bad = tmp_path / "finetune-bad.yaml"
    bad.write_text((CONFIGS / "finetune-prge.yaml").read_text().replace("queries:", "querys:"))
    with pytest.raises(
        ConfigError, match=r"unknown config key 'zo.querys' \(did you mean 'zo.queries'"
    ):
        resolve_config(FinetuneConfig, bad)


def _from_flags(argv: list[str]) -> dict[str, Any]:
    """The resolved config `edgetune <argv>` would run, less its run directory."""
    args, extra = cli.build_parser().parse_known_args(argv)  # as cli.main: key=value anywhere
    args.overrides = [*args.overrides, *extra]
    if args.command == "federate":
        cfg = cli._federate_config(args)
    else:
        cfg = resolve_config(FinetuneConfig, None, args.overrides, cli._flags(args))
    return {k: v for k, v in to_dict(cfg).items() if k != "out"}


@pytest.mark.parametrize(
    "name, argv",
    [
        ("finetune-demo-zo.yaml", ["finetune", *demo.COMMON, *demo.FULL["zo"]]),
        ("finetune-demo-fo.yaml", ["finetune", *demo.COMMON, *demo.FULL["fo"]]),
        ("federate-demo-fleet.yaml", ["federate", *demo.COMMON, *demo.FED]),
    ],
)
def test_demo_configs_are_what_the_demo_runs(name, argv):
    from_file = to_dict(resolve_config(COMMANDS[argv[0]], CONFIGS / name))
    del from_file["out"]
    assert from_file == _from_flags(argv)


def test_a_shipped_config_trains_for_real(tmp_path, stories260k_path, shared_data):
    del shared_data
    out = tmp_path / "run"
    argv = ["finetune", "--config", str(CONFIGS / "finetune-sst2-fo-lora.yaml")]
    argv += ["--model", str(stories260k_path), "--out", str(out), "train.steps=2"]
    argv += ["data.train_size=32", "data.eval_size=8", "data.max_length=32", "train.eval_every=2"]
    argv += ["optim.warmup_steps=1", "train.progress=false"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optim"]["schedule"], saved["train"]["method"]) == ("cosine", "fo")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_a_shipped_federation_config_runs_for_real(tmp_path, stories260k_path, shared_data):
    del shared_data
    out = tmp_path / "fed"
    argv = ["federate", "--config", str(CONFIGS / "federate-fedkseed.yaml")]
    argv += ["--model", str(stories260k_path), "--out", str(out), "--rounds", "1"]
    argv += ["--clients", "3", "--local-steps", "2", "--dataset", "sst2", "data.train_size=60"]
    argv += ["data.eval_size=8", "data.max_length=32"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algorithm"], summary["rounds"], summary["status"]) == ("fedkseed", 1, "done")
    assert summary["methods"] == {"zo": 3}  # fleet: phones, fed.method: zo
    assert 0 < summary["bytes_up"] < 3 * 400  # seeds and scalars, not LoRA deltas


def _readme_commands() -> list[list[str]]:
    """The README's `edgetune ... --config ...` commands, continuation lines joined."""
    text = (CONFIGS.parent / "README.md").read_text().replace("\\\n", " ")
    lines = [line.split(" # ")[0] for line in text.splitlines()]
    return [
        shlex.split(line)[1:]
        for line in lines
        if line.startswith("edgetune ") and "--config" in line
    ]


def test_readme_uses_shipped_configs_and_its_commands_resolve():
    text = (CONFIGS.parent / "README.md").read_text()
    assert "my.yaml" not in text
    named = set(re.findall(r"configs/([\w.-]+\.yaml)", text))
    assert named and named <= {p.name for p in SHIPPED}
    commands = _readme_commands()
    assert len(commands) >= 6
    for argv in commands:
        argv = [str(CONFIGS.parent / a) if a.startswith("configs/") else a for a in argv]
        assert _from_flags(argv)["model"]  # flags, overrides and file resolve together
