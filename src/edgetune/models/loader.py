"""Load any causal LM (or the built-in encoder) with its tokenizer.

A spec is tried, in order, as: a built-in name (`edgetune models`), a local Hugging Face
folder, a local `.gguf` file, and a Hugging Face hub id (for users who are online). When
nothing matches, the error lists every attempt and why it failed. Models load in fp32
(bf16 is ~20x slower on these CPUs) and in eval mode.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError, ModelNotFoundError
from edgetune.models.builtin import BUILTIN_MODELS, builtin_for_base_model
from edgetune.models.gguf import convert_gguf


def resolve(spec: str) -> tuple[Path | str, str]:
    """Turn a spec into something `from_pretrained` can read.

    Args:
        spec: a built-in name, a folder, a .gguf file or a hub id.

    Returns:
        (folder path or hub id, kind) where kind is "causal-lm" or "encoder".

    Raises:
        ModelNotFoundError: with the list of what was tried.
    """
    tried: list[str] = []
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        path = builtin.resolve()
        if path.suffix == ".gguf":
            path = convert_gguf(path, name=spec)
        return path, builtin.kind
    tried.append(f"built-in name (known: {', '.join(BUILTIN_MODELS)})")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return path, "causal-lm"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_user_gguf(ggufs[0]), "causal-lm"
        tried.append(f"local folder {path} (no config.json and not exactly one .gguf file)")
    elif path.suffix == ".gguf":
        if path.is_file():
            return _convert_user_gguf(path), "causal-lm"
        tried.append(f"GGUF file {path} (does not exist)")
    else:
        tried.append(f"local path {path} (does not exist)")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        if _hub_reachable():
            return spec, "causal-lm"
        tried.append(f"Hugging Face hub id {spec!r} (huggingface.co is unreachable from here)")
    raise ModelNotFoundError(_not_found(spec, tried))


def _convert_user_gguf(path: Path) -> Path:
    """`convert_gguf` of a user's file, whose reader fails with low-level errors on a
    truncated or foreign file (struct.error on a short header, ValueError on an
    unsupported architecture)."""
    try:
        return convert_gguf(path)
    except (struct.error, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot read GGUF file {path} ({exc}); check that it is a "
            f"complete .gguf file of a causal LM (a partial download is a common cause)"
        ) from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub answers at all; saves a minute of download retries when offline."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _not_found(spec: str, tried: list[str]) -> str:
    lines = [f"cannot find model {spec!r}; tried:"] + [f"  - {t}" for t in tried]
    lines.append("Pass a built-in name, a Hugging Face folder, a .gguf file or a hub id.")
    return "\n".join(lines)


def load(spec: str, *, num_labels: int | None = None) -> tuple[Any, Any]:
    """Load a model and its tokenizer.

    Args:
        spec: see `resolve`.
        num_labels: for encoder models, the number of classes of the classification head.

    Returns:
        (model in eval mode, fp32; tokenizer with a pad token).

    Raises:
        ModelNotFoundError: the spec matched nothing, or a hub download failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    source, kind = resolve(spec)
    if isinstance(source, Path):
        check_model_folder(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if kind == "encoder":
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels or 2, dtype=torch.float32
            )
        else:
            model = _int8_model(source)
            if model is None:
                model = _load_per_layer_widths(source)
            if model is None:
                model = _load_vocab_pruned(source)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            model = _int8_dynamic(model)
    except RuntimeError as exc:
        if isinstance(source, str) or "size" not in str(exc):
            raise
        raise ModelNotFoundError(
            f"the weights in {source} do not fit its config.json "
            f"({_first_mismatch(source) or exc}): model.safetensors and config.json come "
            "from different models, or one was edited. Restore both files from the model's "
            "source (copy or download the folder again)"
        ) from None
    except OSError as exc:
        if isinstance(source, str):
            raise ModelNotFoundError(
                _not_found(spec, [f"Hugging Face hub id {spec!r}: {exc}".splitlines()[0]])
                + "\nThe hub needs internet access; offline, use a local folder or .gguf file."
            ) from exc
        raise ModelNotFoundError(f"cannot load model from {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # Tokenizers saved without a limit report 1e30; the model's positions are the real
    # one, and the tasks check data.max_length against it (`build_task`).
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context < tokenizer.model_max_length:
        tokenizer.model_max_length = context
    return model.eval(), tokenizer


# config.json fields that size the tensors: a hand edit that makes one a string or a
# float fails deep inside transformers, far from the file that holds it.
INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
)
WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin")  # besides *.safetensors


def check_model_folder(folder: Path) -> None:
    """Refuse a damaged local model folder before transformers reads it (its errors are
    a `SafetensorError`, a `TypeError` from a config field or a size-mismatch report).

    Checks that config.json is a JSON object whose size fields are integers, that the
    folder holds weights, and that model.safetensors has a readable header covering the
    whole file (a truncated copy fails here, in milliseconds).

    Raises:
        ModelNotFoundError: naming the file, what is wrong with it and the fix.
    """
    config_path = folder / "config.json"
    config = _json_object(config_path, "the model's config")
    bad = [
        f"{key}={config[key]!r}"
        for key in INT_FIELDS
        if key in config and config[key] is not None and type(config[key]) is not int
    ]
    if bad:
        raise ModelNotFoundError(
            f"{config_path}: {', '.join(bad)} must be an integer; restore config.json from "
            "the model's source (it was edited by hand, or is not this model's)"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not list(
        folder.glob("*.safetensors")
    ):
        raise ModelNotFoundError(
            f"{folder} has config.json but no weights (model.safetensors is missing); copy "
            "or download the whole model folder again"
        )
    for weights in sorted(folder.glob("*.safetensors")):  # an int8 folder's too
        check_safetensors(weights, "copy or download the model folder again")


def check_safetensors(path: Path, fix: str) -> None:
    """Refuse a safetensors file whose header does not parse or does not cover the file
    (empty, truncated, or bytes overwritten); `fix` says how to get a good copy.

    Raises:
        EdgetuneError: naming the file and `fix`.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise EdgetuneError(
            f"{path} cannot be read ({exc}): the file is empty, truncated or corrupt (an "
            f"interrupted copy or download is a common cause); {fix}"
        ) from None


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file as a dict.

    Raises:
        ModelNotFoundError: the file is missing, not UTF-8, not JSON or not an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} is missing ({what}); restore it") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        data = exc
    if not isinstance(data, dict):
        problem = (
            f"not a valid JSON file: {data}"
            if isinstance(data, Exception)
            else ("not a JSON object")
        )
        raise ModelNotFoundError(
            f"{path} is damaged ({problem}); restore it from the model's source (copy or "
            "download the model folder again)"
        )
    return data


def adapter_config(adapter: Path) -> dict[str, Any]:
    """A PEFT adapter folder's adapter_config.json as a dict.

    Raises:
        ModelNotFoundError: the file is missing, damaged or not a JSON object (named).
    """
    return _json_object(adapter / "adapter_config.json", "the adapter's settings")


def _first_mismatch(folder: Path) -> str:
    """The first tensor whose shape in model.safetensors differs from the one config.json
    implies ("" when none is found); built on the meta device, so it costs no memory."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    wanted = {name: list(t.shape) for name, t in model.state_dict().items()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                shape = list(f.get_slice(key).get_shape())
                if key in wanted and wanted[key] != shape:
                    return f"{key} is {shape} in {file.name}, config.json implies {wanted[key]}"
    return ""


def _load_per_layer_widths(source: Path | str) -> Any | None:
    """A folder saved by pruning with per-layer widths (config.json has
    `edgetune_layer_widths`, which stock transformers refuses with a size mismatch) loaded
    by the pruning package; None for any other model."""
    if not isinstance(source, Path):
        return None
    config = _recorded_json(source / "config.json")
    if config is None or "edgetune_layer_widths" not in config:
        return None
    from edgetune.compress.prune.structured import load_layer_widths  # imports torch

    return load_layer_widths(source)


def _load_vocab_pruned(source: Path | str) -> Any | None:
    """A folder saved by vocabulary pruning (config.json has `edgetune_vocab`) loaded
    with its token-id map at the edge, so the folder's tokenizer ids work as before;
    None for any other model."""
    if not isinstance(source, Path):
        return None
    config = _recorded_json(source / "config.json")
    if config is None or "edgetune_vocab" not in config:
        return None
    from edgetune.compress.vocab import load_pruned  # imports torch

    return load_pruned(source)


def _recorded_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file as a dict, or None when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int8_model(source: Path | str) -> Any:
    """The model of an int8 folder written by `edgetune compress --quantize int8`, or None
    for any other source (the format is described in `edgetune.compress.int8_folder`)."""
    from edgetune.compress.int8_folder import int8_entry, load_int8

    if isinstance(source, str) or int8_entry(source) is None:
        return None
    model = load_int8(source)
    config = _recorded_json(source / "config.json") or {}
    if "edgetune_vocab" in config:  # vocabulary-pruned, then int8 (compress)
        from edgetune.compress.vocab import VocabMap, attach_map

        attach_map(model, VocabMap.read(source))
    return model


def _int8_dynamic(model: Any) -> Any:
    """A model written by `edgetune compress --quantize int8-dynamic` (a smoothed fp32
    model whose config asks for it) with its dynamic int8 linears rebuilt; any other model
    unchanged (`edgetune.compress.int8_dynamic`)."""
    from edgetune.compress.int8_dynamic import requantize_on_load

    return requantize_on_load(model)


def check_adapter_fits(model: Any, adapter: Path) -> None:
    """Refuse a PEFT adapter trained on another model before PEFT loads it (PEFT's own
    error is a size-mismatch line per tensor, a hundred lines for a small model).

    Every LoRA tensor must match the in/out features of the module it adapts, and a soft
    prompt the model's hidden size.

    Raises:
        EdgetuneError: adapter_config.json is damaged, or a tensor does not fit (the
            message names the model the adapter was trained on).
    """
    from safetensors import safe_open

    config = _recorded_config(Path(adapter))
    if config is None:
        raise EdgetuneError(
            f"{adapter}/adapter_config.json is not a JSON object (damaged or not written by "
            f"PEFT); train the adapter again or restore the file"
        )
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        if (Path(adapter) / "adapter_model.bin").is_file():
            return  # a legacy .bin adapter: PEFT's own check applies
        raise EdgetuneError(
            f"{adapter} has adapter_config.json but no adapter_model.safetensors (the "
            "adapter's tensors); copy the whole adapter folder again, or train it again"
        )
    ranks = _config_ranks(Path(adapter), config)
    check_safetensors(weights, "copy the adapter folder again, or train it again")
    modules = dict(model.named_modules())
    with safe_open(weights, "pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            shape = list(f.get_slice(key).get_shape())
            # the two files disagreeing is a damaged adapter, whatever the model
            disagree = _rank_misfit(ranks, key, shape)
            if disagree:
                raise EdgetuneError(
                    f"adapter {adapter}: adapter_config.json and adapter_model.safetensors "
                    f"disagree: {disagree}. One of the two was edited or copied from another "
                    "adapter; restore the pair from the run that trained it (or train the "
                    "adapter again)"
                )
            problem = _misfit(modules, model.config, key, shape)
            if problem:
                base = config.get("base_model_name_or_path") or "BASE"
                raise EdgetuneError(
                    f"adapter {adapter} was trained on a different model: {problem}. Load it "
                    f"with the model it was trained on (pass --model "
                    f"{builtin_for_base_model(base) or base})"
                )


def _config_ranks(adapter: Path, config: dict[str, Any]) -> tuple[int, dict[str, int]] | None:
    """(r, rank_pattern) of a LoRA adapter_config.json; None for other PEFT methods.

    Raises:
        EdgetuneError: r or a rank_pattern value is not a positive integer.
    """
    if "r" not in config:
        return None
    pattern = config.get("rank_pattern") or {}
    values = [config["r"], *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    if not isinstance(pattern, dict) or any(type(v) is not int or v < 1 for v in values):
        raise EdgetuneError(
            f"{adapter}/adapter_config.json: r={config['r']!r} (rank_pattern="
            f"{config.get('rank_pattern')!r}) is not a positive integer rank; restore the "
            "file from the run that trained the adapter (or train it again)"
        )
    return config["r"], pattern


def _rank_misfit(ranks: tuple[int, dict[str, int]] | None, key: str, shape: list[int]) -> str:
    """How LoRA tensor `key` of `shape` contradicts the config's rank ("" if it does not)."""
    path, sep, tail = key.removeprefix("base_model.model.").partition(".lora_")
    if ranks is None or not sep or len(shape) != 2:
        return ""
    r, pattern = ranks
    for name, value in pattern.items():  # PEFT: a key matches the module path's end
        if path == name or re.fullmatch(rf".*\.{name}", path):
            r = value
            break
    held = {"A.weight": shape[0], "B.weight": shape[1]}.get(tail)
    if held is None or held == r:
        return ""
    return f"the config says rank r={r}, but {key} holds rank {held} (shape {shape})"


def _misfit(modules: dict[str, Any], config: Any, key: str, shape: list[int]) -> str | None:
    """Why adapter tensor `key` of `shape` does not fit the model (None if it does)."""
    if key.endswith("prompt_embeddings"):
        hidden = getattr(config, "hidden_size", None)
        if hidden is not None and shape[-1] != hidden:
            return f"its soft prompt has width {shape[-1]}, this model's hidden size is {hidden}"
        return None
    path, sep, tail = key.removeprefix("base_model.model.").partition(".lora_")
    if not sep:
        return None
    module = modules.get(path)
    if module is None:
        return f"this model has no module {path!r}"
    want = {"A.weight": ("in_features", 1), "B.weight": ("out_features", 0)}.get(tail)
    if want is None or not hasattr(module, want[0]):
        return None
    size = getattr(module, want[0])
    if shape[want[1]] != size:
        return f"{path} has {want[0]}={size} here but {shape[want[1]]} in the adapter"
    return None


def _recorded_config(adapter: Path) -> dict[str, Any] | None:
    """adapter_config.json as a dict, or None when it is unreadable or not an object."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def list_models() -> list[dict[str, Any]]:
    """The built-in models, where each resolves and whether it is available here."""
    rows = []
    for builtin in BUILTIN_MODELS.values():
        try:
            where, available = str(builtin.resolve()), True
        except ModelNotFoundError as exc:
            where, available = str(exc), False
        rows.append(
            {
                "name": builtin.name,
                "kind": builtin.kind,
                "description": builtin.description,
                "source": builtin.source,
                "license": builtin.license,
                "install": builtin.install,
                "path": where,
                "available": available,
            }
        )
    return rows
