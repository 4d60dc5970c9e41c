"""GGUF export: a Hugging Face Llama-family model, and a LoRA on it, as llama.cpp files.

llama.cpp runs one self-contained GGUF file: hyperparameters and the tokenizer as
metadata, then the tensors. `export_gguf` writes the base (or a LoRA merged into it) and,
for an unmerged LoRA, llama.cpp's LoRA adapter GGUF beside it.

Notable choices:
- Names come from gguf-py's own table (`gguf.get_tensor_name_map`):
  `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`.
- Architectures (`ARCHES`): Llama and Mistral as llama.cpp's llama, Qwen2 / Qwen3 as its
  qwen2 / qwen3, Gemma 3 text models as its gemma3 (`export/gguf_gemma3.py`: which Gemma 3
  settings llama.cpp reads and which it fixes, so which configs are refused; RMSNorm
  weights stored as 1 + w).
- Rotary layout: HF Llama rotates the two halves of each head (`rotate_half`), llama.cpp
  rotates adjacent pairs (Meta's original layout). So the rows of q and k are permuted
  within each head, row `h * d/2 + i` -> `2 * i + h` (d the head dim, h in {0, 1}). A LoRA's
  B (out x r) is permuted the same way; its A (r x in) maps inputs and is not.
- Quantization (`quant`): f32, q8_0 or q4_0 in blocks of 32 along a row (`gguf.quants`).
  1-D tensors (the RMSNorm weights) stay F32, and so does any 2-D tensor whose row length
  is not a multiple of 32 (stories260K's `ffn_down`, 172 wide): llama.cpp runs mixed files.
- Tied embeddings: only `token_embd` is written; llama.cpp uses it as the output layer
  when `output` is absent.
- Tokenizer, from the HF fast tokenizer's own JSON: a byte-fallback BPE whose text is
  spelled with "▁" (sentencepiece converted, e.g. stories260K) becomes llama.cpp's "llama"
  (SPM) vocabulary, each merged token scored minus the rank of the merge that makes it,
  so the highest score merges first as in the merge list; a byte-level BPE (GPT-2 style,
  e.g. SmolLM2) becomes "gpt2" with its merges and the pre-tokenizer name that matches the
  tokenizer's own pre-tokenizer. Merges are written in both cases so transformers reads
  the same tokenizer back.
- The LoRA adapter GGUF (`general.type=adapter`, `adapter.type=lora`): tensors
  `<base>.lora_a` (r x in) and `<base>.lora_b` (out x r); llama.cpp scales the update by
  `adapter.lora.alpha / r`, so alpha is written as PEFT's scaling times r.
- Nothing half-written: each file goes to a temporary name in `out_dir` and is renamed
  when complete; on error the temporary file is removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.compress.int8_dynamic import is_dynamic_int8
from edgetune.compress.quantize import Int8Linear
from edgetune.errors import ConfigError
from edgetune.export import gguf_gemma3

GGUF_TYPES = ("f32", "q8_0", "q4_0")
SUPPORTED = (
    "Llama-family models (LlamaForCausalLM, MistralForCausalLM without a sliding window, "
    "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM) with the same widths in every "
    "layer"
)


@dataclass(frozen=True)
class _Arch:
    """How one transformers decoder maps onto a llama.cpp architecture.

    Attributes:
        name: llama.cpp's architecture name (the prefix of its hyperparameter keys).
        hf_class: the transformers class whose weights it holds as they are.
        pairs: llama.cpp rotates adjacent pairs (its llama architecture), so q and k rows
            are permuted from HF's rotate-half layout; Qwen's and Gemma's architectures
            rotate halves (NEOX) as HF does, so nothing is permuted.
        offset_norm: which HF tensors are RMSNorm weights that HF applies as 1 + w and
            llama.cpp as the stored weight (written as 1 + w); None: none are.
        check: refuses a config this architecture would run differently in llama.cpp.
        hparams: writes the architecture's rotary base and its own keys; None: the
            common rotary base (`rope_theta`).
    """

    name: str
    hf_class: str
    pairs: bool
    offset_norm: Callable[[str], bool] | None = None
    check: Callable[[Any], None] | None = None
    hparams: Callable[[Any, Any], None] | None = None


# model_type -> the llama.cpp architecture; llama.cpp's converter writes Mistral as llama.
# Qwen2's q/k/v biases, Qwen3's per-head q/k norms and Gemma 3's four norms per block have
# their own llama.cpp tensors.
ARCHES = {
    "llama": _Arch("llama", "LlamaForCausalLM", pairs=True),
    "mistral": _Arch("llama", "MistralForCausalLM", pairs=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", pairs=False),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", pairs=False),
    "gemma3_text": _Arch(
        "gemma3",
        "Gemma3ForCausalLM",
        pairs=False,
        offset_norm=gguf_gemma3.is_offset_norm,
        check=gguf_gemma3.check_gemma3,
        hparams=gguf_gemma3.add_gemma3_hparams,
    ),
}
_ROTARY = ("q_proj", "k_proj")  # modules whose output rows carry rotary pairs


@dataclass
class GGUFExport:
    """What `export_gguf` wrote.

    Attributes:
        model: the base (or merged) model .gguf.
        adapter: the LoRA adapter .gguf (None when merged or no adapter).
        bytes: total bytes written.
    """

    model: Path
    adapter: Path | None
    bytes: int


@dataclass
class _Lora:
    """A PEFT LoRA read from its folder: per adapted module path, A (r x in) and B (out x r)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    scaling: float  # PEFT's alpha / r (alpha / sqrt(r) with rsLoRA)
    rank: int


def export_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    quant: str = "f32",
    adapter_dir: Path | None = None,
    merge: bool = False,
) -> GGUFExport:
    """Write a Llama-family model (and a LoRA on it) as GGUF files for llama.cpp.

    Args:
        model: an HF causal LM of `ARCHES` in fp32, the base the adapter was trained on.
        tokenizer: its HF fast tokenizer (embedded in the file).
        out_dir: folder for the files; created if missing.
        quant: one of `GGUF_TYPES` for the model's 2-D weights (see the module docstring
            for the tensors that stay F32). The adapter is always F32.
        adapter_dir: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).
        merge: fold the LoRA into the weights (W + scaling * B @ A) and write one file.

    Returns:
        `out_dir/model-<quant>.gguf` (merged: `model-merged-<quant>.gguf`) and, for an
        unmerged adapter, `out_dir/adapter-f32.gguf`.

    Raises:
        ConfigError: an unknown quant, a model that is not a plain fp32 one of `ARCHES` (or
            a config llama.cpp would run differently), a tokenizer this writer cannot
            describe, or an adapter trained on another base.
    """
    if quant not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {quant!r} is not supported; choose one of {GGUF_TYPES}")
    if merge and adapter_dir is None:
        raise ConfigError("merge=True folds a LoRA into the model: give its adapter_dir too")
    config = _check_model(model)
    weights = _base_weights(model)
    lora = None
    if adapter_dir is not None:
        lora = _read_lora(Path(adapter_dir))
        _fit_lora(weights, lora, Path(adapter_dir), merge)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "model-merged" if lora is not None and merge else "model"
    model_path = out_dir / f"{stem}-{quant}.gguf"
    arch = ARCHES[config.model_type]
    names = _name_map(config, arch)
    with _atomic(model_path, arch.name) as writer:
        _add_hparams(writer, config, quant, arch)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, array in weights.items():
            tensor = _rotary_layout(name, array, config) if arch.pairs else array
            if arch.offset_norm is not None and arch.offset_norm(name):
                tensor = tensor + 1.0
            _add_weight(writer, names(name), tensor, quant)
    adapter_path = None
    if lora is not None and not merge:
        adapter_path = out_dir / "adapter-f32.gguf"
        with _atomic(adapter_path, arch.name) as writer:
            _add_adapter(writer, lora, config, names, arch)
    written = model_path.stat().st_size + (adapter_path.stat().st_size if adapter_path else 0)
    return GGUFExport(model=model_path, adapter=adapter_path, bytes=written)


def _check_model(model: torch.nn.Module) -> Any:
    """The model's config, after refusing what this writer cannot express."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    kind = getattr(config, "model_type", None)
    if kind not in ARCHES or ARCHES[kind].hf_class not in architectures:
        raise ConfigError(
            f"GGUF export supports {SUPPORTED}; this model is {architectures[0]} "
            f"(model_type {kind!r}). Export it to ONNX instead"
        )
    window = getattr(config, "sliding_window", None)
    if kind == "mistral" and window is not None and window < config.max_position_embeddings:
        raise ConfigError(
            f"GGUF export: this Mistral attends within a sliding window of {window} tokens, "
            "which llama.cpp's llama architecture does not apply (it attends to the whole "
            "context); export it to ONNX instead"
        )
    if getattr(config, "edgetune_layer_widths", None):
        raise ConfigError(
            f"GGUF export supports {SUPPORTED}; this model was pruned to different widths per "
            "layer (edgetune_layer_widths), which llama.cpp's llama architecture cannot hold. "
            "Prune with uniform widths, or export to ONNX"
        )
    if _is_int8(model, config):
        raise ConfigError(
            "this model's linear layers are int8 (edgetune compress --quantize int8 or "
            "int8-dynamic), which GGUF cannot hold as they are; export the fp32 model and "
            "pick --gguf-type q8_0"
        )
    if any(".lora_A." in name for name, _ in model.named_parameters()):
        raise ConfigError(
            "the model carries LoRA layers; pass the base model and the adapter folder "
            "(adapter_dir), with merge=True to fold it in"
        )
    if kind != "qwen2" and (
        getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    ):
        raise ConfigError(f"GGUF export supports {SUPPORTED} without biases; this model has some")
    if ARCHES[kind].check is not None:
        ARCHES[kind].check(config)
        return config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"GGUF export supports plain rotary embeddings; this model uses rope_type "
            f"{rope['rope_type']!r}"
        )
    return config


def _is_int8(model: torch.nn.Module, config: Any) -> bool:
    if getattr(config, "edgetune_int8", None) or getattr(config, "edgetune_int8_dynamic", None):
        return True
    return is_dynamic_int8(model) or any(isinstance(m, Int8Linear) for m in model.modules())


def _base_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's weights by HF name as fp32 arrays; a tied `lm_head` is left out."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        weights[name] = tensor.detach().to(torch.float32).cpu().numpy()
    return weights


def _name_map(config: Any, arch: _Arch) -> Callable[[str], str]:
    """HF tensor name -> llama.cpp tensor name."""
    import gguf

    code = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.name]
    table = gguf.get_tensor_name_map(code, config.num_hidden_layers)

    def name(hf_name: str) -> str:
        mapped = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConfigError(f"GGUF export: no llama.cpp tensor for {hf_name!r}; {SUPPORTED}")
        return mapped

    return name


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotary_layout(name: str, rows: np.ndarray, config: Any) -> np.ndarray:
    """`rows` (out x ...) of module `name` reordered from HF's rotate-half layout to
    llama.cpp's adjacent pairs (q and k only; anything else unchanged)."""
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if module not in _ROTARY:
        return rows
    heads = config.num_attention_heads if module == "q_proj" else config.num_key_value_heads
    half = _head_dim(config) // 2
    shape = rows.shape
    paired = rows.reshape(heads, 2, half, *shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(paired.reshape(shape))


def _add_weight(writer: Any, name: str, array: np.ndarray, quant: str) -> None:
    """Add one tensor, quantized when it is 2-D with rows that fill whole blocks."""
    import gguf

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    block = 32
    if quant == "f32" or array.ndim != 2 or array.shape[-1] % block:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        return
    packed = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype[quant])
    writer.add_tensor(name, packed, raw_dtype=qtype[quant])


def _add_hparams(writer: Any, config: Any, quant: str, arch: _Arch) -> None:
    import gguf

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rsplit("/", 1)[-1])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    if arch.hparams is not None:
        arch.hparams(writer, config)
    else:
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type[quant])
    if quant != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Embed the tokenizer: vocabulary, scores or merges, token types, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ConfigError(
            "GGUF export needs a fast BPE tokenizer (tokenizer.json with a BPE model, as "
            f"Llama, SmolLM2 and stories260K have); this one is {bpe.get('type') or type(tokenizer).__name__}"
        )
    tokens, types = _vocabulary(spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    if bpe.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_prepends_space(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)


def _vocabulary(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the embedding's rows) and their llama.cpp token types."""
    from gguf import TokenType

    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    kinds: dict[int, TokenType] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    unk = spec["model"].get("unk_token")
    if max(by_id) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has token id {max(by_id)} but the model's vocabulary has "
            f"{vocab_size} rows; export the tokenizer the model was trained with"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if token == unk:
            types.append(TokenType.UNKNOWN)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(kinds.get(i, TokenType.BYTE))
        else:
            types.append(kinds.get(i, TokenType.NORMAL))
    return tokens, [int(t) for t in types]


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SPM scores: minus the rank of the first merge that makes a token (0 for the rest,
    which llama.cpp's SPM tokenizer never looks up as a merge result)."""
    rank: dict[str, int] = {}
    for k, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), k)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer or Metaspace)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"prepend": "\\u2581"' in text or '"prepend_scheme": "always"' in text


# llama.cpp pre-tokenizer names for the byte-level pre-tokenizers of transformers'
# tokenizer.json, described by the (type, detail) pairs of their steps.
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}")  # one digit at a time
_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
}


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    detail = {
        "ByteLevel": lambda s: s.get("use_regex", True),
        "Digits": lambda s: s.get("individual_digits"),
        "Split": lambda s: (s.get("pattern") or {}).get("Regex"),
    }
    shape = tuple((s.get("type"), detail.get(s.get("type"), lambda _: None)(s)) for s in steps)
    if shape not in _PRE_TOKENIZERS:
        raise ConfigError(
            f"GGUF export: llama.cpp has no pre-tokenizer known to match {shape}; supported "
            f"are GPT-2 byte-level, SmolLM (digits split), Llama 3 and Qwen2 style tokenizers"
        )
    return _PRE_TOKENIZERS[shape]


def _read_lora(adapter_dir: Path) -> _Lora:
    """The adapter's A and B per adapted module path (`model.layers.0.self_attn.q_proj`)."""
    from safetensors.numpy import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ConfigError(
            f"{adapter_dir} is not a PEFT LoRA folder (needs adapter_config.json and "
            "adapter_model.safetensors); pass the adapter folder a LoRA run wrote"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ConfigError(
            f"{adapter_dir} holds a {config.get('peft_type')} adapter"
            f"{' with DoRA' if config.get('use_dora') else ''}; GGUF export takes plain LoRA "
            "(merge other methods into the model and export that)"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(
            f"{adapter_dir} sets rank_pattern/alpha_pattern; llama.cpp applies one alpha to "
            "every layer: export with merge=True"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(weights_path))
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        path, sep, tail = key.removeprefix("base_model.model.").partition(".lora_")
        if not sep:
            continue
        if tail not in ("A.weight", "B.weight"):
            raise ConfigError(
                f"{adapter_dir}: {key} is not a LoRA linear (A/B) tensor; llama.cpp adapters "
                "hold linear layers only: export with merge=True"
            )
        halves.setdefault(path, {})[tail[0]] = tensor
    broken = [path for path, half in halves.items() if len(half) != 2]
    if broken:
        raise ConfigError(
            f"{adapter_dir}: {broken[0]} has only one of lora_A/lora_B; save it again"
        )
    pairs = {path: (half["A"], half["B"]) for path, half in halves.items()}
    if not pairs:
        raise ConfigError(f"{adapter_dir} has no LoRA tensors; pass the folder a LoRA run wrote")
    return _Lora(pairs=pairs, scaling=scaling, rank=rank)


def _fit_lora(weights: dict[str, np.ndarray], lora: _Lora, adapter_dir: Path, merge: bool) -> None:
    """Check the LoRA against the base's weights and, to merge, fold it into them in place
    (W + scaling * B @ A, before the rotary reordering, in HF's layout like the LoRA)."""
    if merge and "lm_head" in lora.pairs and "lm_head.weight" not in weights:
        # A LoRA on a tied lm_head unties it: the merged output layer is its own tensor.
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    for path, (a, b) in lora.pairs.items():
        _check_fits(adapter_dir, path, a, b, weights)
    if merge:
        for path, (a, b) in lora.pairs.items():
            weights[f"{path}.weight"] = weights[f"{path}.weight"] + lora.scaling * (b @ a)


def _check_fits(
    adapter_dir: Path, path: str, a: np.ndarray, b: np.ndarray, weights: dict[str, np.ndarray]
) -> None:
    base = weights.get(f"{path}.weight")
    if base is None:
        hint = " (the tied lm_head: export with merge=True)" if path == "lm_head" else ""
        raise ConfigError(
            f"adapter {adapter_dir} adapts {path}, which this model has no weight for{hint}; "
            "export it with the model it was trained on"
        )
    if a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0] or a.shape[0] != b.shape[1]:
        raise ConfigError(
            f"adapter {adapter_dir} was trained on another model: {path} is "
            f"{base.shape[0]}x{base.shape[1]} here but the adapter maps {a.shape[1]} -> "
            f"{b.shape[0]}; export it with the model it was trained on"
        )


def _add_adapter(
    writer: Any, lora: _Lora, config: Any, names: Callable[[str], str], arch: _Arch
) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scaling * lora.rank)
    for path, (a, b) in lora.pairs.items():
        name = names(f"{path}.weight")
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        rows = _rotary_layout(f"{path}.weight", b, config) if arch.pairs else b
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(rows, dtype=np.float32))


@contextmanager
def _atomic(path: Path, arch: str) -> Iterator[Any]:
    """A GGUFWriter whose file appears at `path` only once it is complete."""
    import gguf

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
