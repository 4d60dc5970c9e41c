"""Config: YAML + flags + dotted overrides, type coercion, unknown keys with suggestions."""

from __future__ import annotations

import pytest

from edgetune.config import absolute_paths, build, describe, parse_override, resolve_config
from edgetune.errors import ConfigError
from edgetune.fed.config import FederateConfig
from edgetune.recipes.evaluate import EvalConfig
from edgetune.recipes.finetune import FinetuneConfig


def test_precedence_defaults_file_flags_overrides(tmp_path):
    # Prepare
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 4\npeft:\n  rank: 2\n")
    # Execute
    cfg = resolve_config(
        FinetuneConfig,
        path,
        ["train.steps=9", "optim.lr=0.5"],
        {"train.batch_size": 2, "data.text_fields": "title,description"},
    )
    # Assert
    assert cfg.train.steps == 9  # override beats file
    assert cfg.train.batch_size == 2  # flag beats file
    assert cfg.peft.rank == 2  # file beats default
    assert cfg.optim.lr == 0.5
    assert cfg.data.text_fields == ["title", "description"]  # comma string -> list


def test_unknown_key_suggests_the_closest_valid_key():
    match = r"unknown config key 'train.step'.*did you mean 'train.steps'"
    with pytest.raises(ConfigError, match=match):
        resolve_config(FinetuneConfig, overrides=["train.step=3"])
    # a section's field given without its section: the dotted key
    with pytest.raises(ConfigError, match=r"'steps'.*did you mean 'train.steps'"):
        resolve_config(FinetuneConfig, overrides=["steps=5"])
    # a misspelt section: the setting given, with the section's closest spelling
    with pytest.raises(ConfigError, match=r"'pef.rank'.*did you mean 'peft.rank'"):
        build(FinetuneConfig, {"pef": {"rank": 2}})
    # a section another command has: the same setting where this command keeps it
    with pytest.raises(ConfigError, match=r"'train.progress'.*did you mean 'progress'"):
        build(EvalConfig, {"train": {"progress": False}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.method=sgd", r"train.method: 'sgd' is not one of fo, zo"),
        ("peft.method=lorra", "did you mean 'lora'"),
        ("zo.eps=-1", "zo.eps: expected a number > 0"),
        ("train.eval_at_start=maybe", "expected true or false"),
        ("train.batch_size=6", "not divisible"),
    ],
)
def test_bad_values_name_the_field(override, message):
    overrides = [override, "train.grad_accum=4"] if "divisible" in message else [override]
    with pytest.raises(ConfigError, match=message):
        resolve_config(FinetuneConfig, overrides=overrides)


def test_lr_default_depends_on_method_and_is_resolved():
    cfg = resolve_config(FinetuneConfig, overrides=["train.method=fo"])
    assert cfg.optim.lr == 1e-3


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("nonsense")


def test_every_leaf_key_has_help():
    rows = describe(FinetuneConfig)
    assert {"train.steps", "peft.rank", "zo.queries", "data.dataset"} <= {k for k, _, _ in rows}
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_absolute_paths_resolves_local_paths_and_keeps_names(tmp_path, monkeypatch):
    # Prepare: a data file and a fleet file here, a folder that shadows a built-in name
    (tmp_path / "d.csv").write_text("sentence,label\na,good\n")
    (tmp_path / "f.yaml").write_text("fleet: []\n")
    (tmp_path / "sst2").mkdir()
    monkeypatch.chdir(tmp_path)
    flags = {"data.dataset": "d.csv", "fed.fleet": "f.yaml", "model": "tiny-missing"}
    cfg = resolve_config(FederateConfig, None, ["data.eval_split=sst2"], flags)
    # Execute
    resolved = absolute_paths(cfg)
    # Assert: existing paths are absolute; a missing path and an unset one are as given
    assert resolved.data.dataset == str(tmp_path / "d.csv")
    assert resolved.fed.fleet == str(tmp_path / "f.yaml")
    assert resolved.data.eval_split == str(tmp_path / "sst2")
    assert resolved.model == "tiny-missing" and resolved.fed.export == ""
    # ... and a built-in name stays a name even where a folder of that name exists
    builtin = absolute_paths(resolve_config(FederateConfig, None, [], {"data.dataset": "sst2"}))
    assert builtin.data.dataset == "sst2"
    assert cfg.data.dataset == "d.csv"  # the config given is left as it was
