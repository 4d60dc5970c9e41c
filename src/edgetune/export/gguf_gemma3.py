"""What a Gemma 3 text model (`Gemma3ForCausalLM`) needs to run in llama.cpp's gemma3
architecture, beside what `export/gguf.py` writes for every architecture.

llama.cpp's gemma3 graph is HF Gemma 3's: the embedding scaled by sqrt(hidden) (in the
graph, so `token_embd` is written as it is), q/k RMSNorm per head, rotate-half (NEOX)
rotary with no row permutation, four RMSNorms per block (before and after attention and
the MLP), a tanh-approximated GELU MLP, and a tied output layer unless `output` is
written. Its RMSNorm weights are stored as 1 + w (HF Gemma multiplies by 1 + weight,
llama.cpp by the stored weight).

What llama.cpp reads and what it fixes (measured on the installed llama-cpp-python 0.3.36
by changing one setting of a tiny Gemma 3 at a time and comparing logits; a setting it
ignores moves them by 0.2-0.8, one it reads leaves them within 1e-4):
- Read from the file (`gemma3.*`): context_length, embedding_length, block_count,
  feed_forward_length, attention.head_count / head_count_kv / key_length / value_length,
  attention.layer_norm_rms_epsilon, rope.freq_base (the global blocks' rotary base),
  rope.freq_base_swa (the sliding blocks'), attention.sliding_window (its width),
  attention.sliding_window_pattern (one flag per block, true where it slides; without it
  llama.cpp slides every block but each sixth), rope.scaling.type / factor (linear, on the
  global blocks only, as HF does) and final_logit_softcapping.
- Hard-coded: the attention scale, 1 / sqrt(head_dim), or 1 / sqrt(hidden / heads) for a
  62-block model (the 27B's); it does not read attention.scale. Attention-logit
  softcapping, bidirectional attention and another MLP activation are not in its graph.

So `check_gemma3` refuses a `query_pre_attn_scalar` other than the one llama.cpp uses,
`attn_logit_softcapping`, `use_bidirectional_attention`, a `hidden_activation` other than
gelu_pytorch_tanh and rotary scaling other than linear on the global blocks: such a file
would load and compute another model. A llama.cpp older than the sliding-window-pattern
and freq_base_swa keys ignores them and runs its fixed pattern (one global block in six,
local base 10,000); `edgetune export` checks the file in the installed llama.cpp.
"""

from __future__ import annotations

import math
from typing import Any

from edgetune.errors import ConfigError

BLOCKS_27B = 62  # the block count whose attention scale llama.cpp takes from hidden / heads


def is_offset_norm(hf_name: str) -> bool:
    """Whether the HF tensor is a Gemma RMSNorm weight (stored by llama.cpp as 1 + w)."""
    return hf_name.endswith("norm.weight")


def _rope(config: Any, kind: str) -> dict[str, Any]:
    """The rotary settings of one attention kind (transformers 5's `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    return dict(params.get(kind) or {})


def _attention_scalar(config: Any) -> float:
    """The `query_pre_attn_scalar` llama.cpp's fixed attention scale corresponds to."""
    if config.num_hidden_layers == BLOCKS_27B:
        return config.hidden_size / config.num_attention_heads
    return float(config.head_dim)


def check_gemma3(config: Any) -> None:
    """Refuse a Gemma 3 config that llama.cpp's gemma3 architecture would run differently.

    Raises:
        ConfigError: naming the setting, the value llama.cpp uses instead, and the fix.
    """
    fix = "export it to ONNX instead, which runs the model as transformers does"
    scalar = _attention_scalar(config)
    if not math.isclose(float(config.query_pre_attn_scalar), scalar):
        raise ConfigError(
            f"GGUF export: this Gemma 3 scales attention by query_pre_attn_scalar="
            f"{config.query_pre_attn_scalar}, but llama.cpp's gemma3 architecture uses "
            f"{scalar:g} for a {config.num_hidden_layers}-block model; {fix}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ConfigError(
            f"GGUF export: this Gemma 3 sets attn_logit_softcapping="
            f"{config.attn_logit_softcapping}, which llama.cpp's gemma3 architecture does "
            f"not apply; {fix}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(
            f"GGUF export: this Gemma 3 attends bidirectionally, llama.cpp's gemma3 causally; {fix}"
        )
    activation = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError(
            f"GGUF export: this Gemma 3's MLP uses {activation!r}, llama.cpp's gemma3 the "
            f"tanh-approximated GELU (gelu_pytorch_tanh); {fix}"
        )
    _check_rope(config, fix)


def _check_rope(config: Any, fix: str) -> None:
    local, full = _rope(config, "sliding_attention"), _rope(config, "full_attention")
    if local.get("rope_type", "default") != "default":
        raise ConfigError(
            f"GGUF export: this Gemma 3 scales the sliding blocks' rotary embedding "
            f"({local['rope_type']!r}), which llama.cpp's gemma3 architecture leaves "
            f"unscaled; {fix}"
        )
    kind = full.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise ConfigError(
            f"GGUF export supports Gemma 3 with plain or linear rotary scaling; this model "
            f"uses rope_type {kind!r}; {fix}"
        )


def add_gemma3_hparams(writer: Any, config: Any) -> None:
    """The gemma3 keys beyond the common ones: rotary bases and scaling, the sliding
    window and which blocks use it, the final softcapping."""
    import gguf

    local, full = _rope(config, "sliding_attention"), _rope(config, "full_attention")
    writer.add_rope_freq_base(float(full.get("rope_theta", 1e6)))
    writer.add_rope_freq_base_swa(float(local.get("rope_theta", 1e4)))
    if full.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
