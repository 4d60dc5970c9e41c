"""Typed configuration: dataclasses, YAML files and dotted `key=value` overrides.

A config is a tree of dataclasses; each field carries its help text in
`metadata["help"]` (used by `--help`) and each class validates itself in `__post_init__`,
raising `ConfigError` with the field name and what was expected. Values from YAML and the
command line are coerced to the annotated type; an unknown key is an error that suggests
the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edgetune.errors import ConfigError, EdgetuneError

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text (mutable defaults are copied per instance).

    `metadata` tells the code that reads the field more about it: `path=NAMES` marks a
    local file or folder, NAMES being the values that are not paths (built-in names,
    which the loader tries first; `()` for none), see `absolute_paths`; a section may
    declare its own (`simulator_only` in `fed/config.py`).
    """
    meta = {"help": help, **metadata}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_choice(section: str, name: str, value: Any, choices: typing.Iterable[str]) -> None:
    """Raise ConfigError unless `value` is one of `choices`, suggesting the closest one."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"{section}.{name}: {value!r} is not one of {', '.join(choices)}"
            + _suggest(str(value), choices)
        )


def check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ConfigError unless `value` > 0 (or >= 0); NaN fails too (it compares false
    with everything, so `value < 0` alone would let it through)."""
    if not value >= 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}: expected a number {expected}, got {value!r}")


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of dataclass `cls`, dotted (sections and their fields)."""
    keys = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        keys.append(f"{prefix}{f.name}")
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            keys += _dotted_keys(kind, f"{prefix}{f.name}.")  # type: ignore[arg-type]
    return keys


def _suggest_dotted(key: str, cls: type, prefix: str) -> str:
    """The closest valid dotted key to `prefix + key`: a section's field of that exact
    name first (`steps` -> `train.steps`), else the closest spelling (`train.stpes`)."""
    keys = _dotted_keys(cls, prefix)
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if same_name:
        return f" (did you mean {same_name[0]!r}?)"
    close = difflib.get_close_matches(f"{prefix}{key}", keys, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Coerce a YAML/CLI value to a field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(path, value, args[0])
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise TypeError(value)
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        # NaN passes every `x > 0` check and inf switches bounds off; neither is a setting.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}; pass a real value")
        return number
    if annotation is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {annotation.__name__} fields")
        return build(annotation, value, prefix=f"{path}.")
    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, coercing types and rejecting unknown keys.

    Args:
        cls: the dataclass type.
        values: nested mapping of field values (missing fields take their defaults).
        prefix: dotted path of `cls` inside the root config, for error messages.

    Raises:
        ConfigError: an unknown key (with the closest valid one) or a bad value.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            if isinstance(value, dict) and value:  # a section this command lacks:
                key = f"{key}.{next(iter(leaves(value)))}"  # name the setting given
            raise ConfigError(
                f"unknown config key '{prefix}{key}'"
                + _suggest_dotted(key, cls, prefix)
                + f"; valid keys under {prefix.rstrip('.') or 'the root'}: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `tree["a"]["b"] = value` for `dotted == "a.b"`, creating mappings as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value` (value as YAML, so `3` is an int and `[a, b]` a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file to --config")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({exc.reason}); re-save it"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {data!r}")
    return data


def resolve_config(
    cls: type[T],
    file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    flags: dict[str, Any] | None = None,
) -> T:
    """Config from defaults < YAML file < CLI flags < `key=value` overrides.

    Args:
        cls: the root config dataclass.
        file: optional YAML file.
        overrides: `key=value` strings with dotted keys.
        flags: already-dotted values from named CLI flags (None values are ignored).
    """
    return build(cls, given_settings(file, overrides, flags))


def given_settings(
    file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings the user gave (YAML file < CLI flags < `key=value`), as a nested
    dict without the defaults: what a command that replays a run compares with it."""
    tree: dict[str, Any] = load_yaml(file) if file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return tree


def absolute_paths(cfg: T) -> T:
    """`cfg` with every `path` setting that names an existing local file or folder made
    absolute, so a process started in another working directory (Flower's ServerApp and
    ClientApps) reads the same files. Built-in names, hub ids and paths that do not exist
    here are kept as given (the loader reports them).
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif "path" in f.metadata and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if value not in f.metadata["path"] and path.exists():
                changes[f.name] = str(path.resolve())
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, field, type hint) of every leaf field of `cls`, sections in the order
    `cls` declares them."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(leaf_fields(hint, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            rows.append((f"{prefix}{f.name}", f, hint))
    return rows


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field of `cls`, for `--help`."""
    rows = []
    for key, f, _ in leaf_fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


def flag_fields(cls: type) -> list[tuple[str, Any, tuple[str, ...], type]]:
    """(dotted key, field, its CLI flags, bool or str) for every field of `cls` (sections
    in declaration order) that declares flags: `option(..., flag="--x")` or a tuple whose
    first flag is the one help shows. A bool is a switch; any other value is parsed as
    the field's type when the config is built, so a bad value names its key."""
    rows = []
    for key, f, hint in leaf_fields(cls):
        flag = f.metadata.get("flag")
        if flag:
            flags = (flag,) if isinstance(flag, str) else tuple(flag)
            rows.append((key, f, flags, bool if hint is bool else str))
    return rows


# config.yaml opens and closes with these lines: a file that opens with the first and
# lacks the second was cut short (a full disk, a kill mid-write), even where what is
# left still parses. Files of earlier versions have neither and are read as they are.
CONFIG_HEAD = "# edgetune run config (the resolved settings; the last line marks its end)"
CONFIG_END = "# end of config"


def config_text(path: Path) -> str:
    """The text of a run's config.yaml, checked to be whole.

    Raises:
        EdgetuneError: the file opens with CONFIG_HEAD but lacks CONFIG_END.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.rstrip("\n").splitlines()
    if lines and lines[0] == CONFIG_HEAD and lines[-1] != CONFIG_END:
        raise EdgetuneError(
            f"{path} is cut short (its closing line {CONFIG_END!r} is missing, so settings "
            "after the cut would silently take their defaults); restore it from a copy of "
            "the run, or start a new run with --out"
        )
    return text


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run wrote (RUN/config.yaml) as a tree.

    Raises:
        EdgetuneError: no config.yaml, or one that is cut short or not a YAML mapping.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise EdgetuneError(f"{run_dir} has no config.yaml; is it a run directory?")
    try:
        config = yaml.safe_load(config_text(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        config = exc
    if not isinstance(config, dict):
        raise EdgetuneError(
            f"{path} is damaged (not a YAML mapping of config sections: {config}); "
            "restore it from a copy of the run, or start a new run with --out"
        )
    return config


def config_from_run(
    cls: type[T],
    run_dir: str | Path,
    overrides: typing.Sequence[str],
    flags: dict[str, Any] | None = None,
    may_change: typing.Collection[str] = (),
) -> T:
    """The resolved config an existing run wrote, with named flags and `key=value`
    overrides on top (--resume). `out` is always `run_dir`, so a copied run continues in
    the copy. Only the keys in `may_change` may differ from the saved config; anything
    else raises here, before the run directory is touched.

    Raises:
        EdgetuneError: `run_dir` holds no run.
        ConfigError: a setting other than `may_change` differs from the saved one.
    """
    if not (Path(run_dir) / "config.yaml").exists():
        raise EdgetuneError(
            f"cannot resume {run_dir}: no run there (config.yaml is missing); start a "
            f"new run with --out {run_dir}"
        )
    saved_tree = read_run_config(run_dir)
    saved_tree["out"] = str(run_dir)
    try:
        saved = build(cls, copy.deepcopy(saved_tree))
    except ConfigError as exc:  # the file, not the command line, holds the bad value
        raise ConfigError(
            f"{Path(run_dir) / 'config.yaml'} (the run's saved config) does not load: {exc}. "
            "It was edited or damaged since the run wrote it; restore it from a copy of the "
            "run, or put back the value the run was started with"
        ) from None
    tree = copy.deepcopy(saved_tree)
    for key, value in (flags or {}).items():
        set_dotted(tree, key, value)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    cfg = build(cls, tree)
    changed = config_diff(saved, cfg)
    if "out" in changed:
        raise ConfigError(
            f"--resume {run_dir} continues in {run_dir}; drop --out / out= (to continue "
            f"elsewhere, copy the run folder and resume the copy)"
        )
    refused = [key for key in changed if key not in may_change]
    if refused:
        old, new = changed[refused[0]]
        allowed = ", ".join(may_change) or "none"
        raise ConfigError(
            f"{refused[0]}={new!r} cannot change on --resume ({run_dir} was trained with "
            f"{old!r}); settings that may change on resume: {allowed}. For other settings "
            f"start a new run, e.g. --config {Path(run_dir) / 'config.yaml'} --out NEW_DIR "
            f"{refused[0]}={new}"
        )
    return cfg


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} for every leaf of a nested config mapping."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs between two
    configs of the same class."""
    a, b = leaves(to_dict(old)), leaves(to_dict(new))
    return {key: (a.get(key), b.get(key)) for key in b if a.get(key) != b.get(key)}
