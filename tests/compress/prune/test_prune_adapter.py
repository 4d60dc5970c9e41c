"""A LoRA adapter carried through pruning: pruned base + mapped adapter == zeroed units."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from edgetune.compress.prune import (
    AdapterMismatchError,
    KeptIndices,
    load_layer_widths,
    lora_index_map,
    map_adapter_folder,
    map_lora,
    prune,
)
from edgetune.compress.prune.adapter import ADAPTER_WEIGHTS
from edgetune.errors import EdgetuneError
from edgetune.models import load, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGETS = ATTENTION + MLP
REMOVED_CHANNELS = [0, 5, 17, 100, 171]
REMOVED_GROUPS = [1, 3]  # KV heads 1, 3 -> query heads 2, 3, 6, 7 (head_dim 8)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _kept() -> KeptIndices:
    channels = tuple(i for i in range(172) if i not in REMOVED_CHANNELS)
    groups = tuple(g for g in range(4) if g not in REMOVED_GROUPS)
    return KeptIndices(mlp=(channels,) * 5, kv_groups=(groups,) * 5)


def _dims(heads: list[int], d: int = 8) -> list[int]:
    return [h * d + j for h in heads for j in range(d)]


def _with_lora(model):
    """`model` under a rank-4 LoRA on every projection, with random (non-zero) B."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model.eval()


def test_index_map_names_kept_rows_and_columns_per_projection(stories):
    index_map = lora_index_map(_kept(), stories.config)
    assert len(index_map) == 5 * 7
    kept_q = _dims([0, 1, 4, 5])  # query heads of KV groups 0 and 2
    kept_channels = tuple(i for i in range(172) if i not in REMOVED_CHANNELS)
    layer = "model.layers.3"
    assert index_map[f"{layer}.self_attn.q_proj"] == (None, tuple(kept_q))
    assert index_map[f"{layer}.self_attn.k_proj"] == (None, tuple(_dims([0, 2])))
    assert index_map[f"{layer}.self_attn.v_proj"] == (None, tuple(_dims([0, 2])))
    assert index_map[f"{layer}.self_attn.o_proj"] == (tuple(kept_q), None)
    assert index_map[f"{layer}.mlp.gate_proj"] == (None, kept_channels)
    assert index_map[f"{layer}.mlp.up_proj"] == (None, kept_channels)
    assert index_map[f"{layer}.mlp.down_proj"] == (kept_channels, None)


def test_pruned_base_plus_mapped_adapter_equals_zeroed_units(stories260k_path, calib_ids, tmp_path):
    adapted = _with_lora(load(str(stories260k_path))[0].eval())
    adapted.save_pretrained(tmp_path / "adapter")
    full_config = copy.deepcopy(adapted.base_model.model.config)
    reference_model = copy.deepcopy(adapted)
    _zero_removed(reference_model, _kept())
    reference = _logits(reference_model, calib_ids)

    pruned = prune(load(str(stories260k_path))[0].eval(), _kept())
    assert not torch.allclose(_logits(pruned, calib_ids), reference, atol=1e-3)  # adapter matters
    pruned.save_pretrained(tmp_path / "pruned")
    folder = map_adapter_folder(
        tmp_path / "adapter", tmp_path / "mapped", _kept(), full_config, tmp_path / "pruned"
    )
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "pruned")
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == sorted(TARGETS)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    layer = "base_model.model.model.layers.0"
    assert tensors[f"{layer}.mlp.down_proj.lora_A.weight"].shape == (4, 167)
    assert tensors[f"{layer}.mlp.gate_proj.lora_B.weight"].shape == (167, 4)
    assert tensors[f"{layer}.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert tensors[f"{layer}.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert tensors[f"{layer}.self_attn.o_proj.lora_A.weight"].shape == (4, 32)

    carried = PeftModel.from_pretrained(pruned, str(folder)).eval()
    out = _logits(carried, calib_ids)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_keeping_everything_maps_the_adapter_unchanged(stories):
    adapted = _with_lora(stories)
    tensors = get_peft_model_state_dict(adapted)
    kept = KeptIndices.everything(adapted.base_model.model)
    mapped = map_lora(tensors, kept, adapted.base_model.model.config)
    assert mapped.keys() == tensors.keys()
    for key, tensor in tensors.items():
        torch.testing.assert_close(mapped[key], tensor, rtol=0, atol=0)


def test_adapter_of_another_base_model_is_refused_naming_the_fix(stories, tmp_path):
    other = _with_lora(tiny_llama(vocab_size=512, hidden_size=32, intermediate_size=48))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="another base model") as info:
        map_adapter_folder(tmp_path / "other", tmp_path / "out", _kept(), stories.config)
    assert isinstance(info.value, EdgetuneError)
    assert "use an adapter trained on the model being pruned" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_folder_without_adapter_weights_is_refused(stories, tmp_path):
    with pytest.raises(AdapterMismatchError, match="save_pretrained"):
        map_adapter_folder(tmp_path, tmp_path / "out", _kept(), stories.config)


def test_pruned_config_instead_of_unpruned_is_refused_naming_the_fix(stories):
    pruned_config = prune(copy.deepcopy(stories), _kept()).config  # rewritten in place
    tensors = get_peft_model_state_dict(_with_lora(stories))
    with pytest.raises(AdapterMismatchError, match="unpruned model's config taken before prune"):
        map_lora(tensors, _kept(), pruned_config)


class _Skip(torch.nn.Module):
    """A removed decoder layer: the identity on the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_removed_layers_take_their_lora_with_them_and_the_rest_is_renumbered(
    stories260k_path, calib_ids, tmp_path
):
    adapted = _with_lora(load(str(stories260k_path))[0].eval())
    adapted.save_pretrained(tmp_path / "adapter")
    full_config = copy.deepcopy(adapted.base_model.model.config)
    reference_model = copy.deepcopy(adapted)
    _zero_removed(reference_model, _kept())
    for i in (1, 3):
        reference_model.base_model.model.model.layers[i] = _Skip()
    reference = _logits(reference_model, calib_ids)

    base = _kept()
    kept = KeptIndices(mlp=base.mlp, kv_groups=base.kv_groups, layers=(0, 2, 4))
    assert sorted({k.split(".")[2] for k in lora_index_map(kept, full_config)}) == ["0", "2", "4"]
    pruned = prune(load(str(stories260k_path))[0].eval(), kept)
    pruned.save_pretrained(tmp_path / "pruned")
    folder = map_adapter_folder(tmp_path / "adapter", tmp_path / "mapped", kept, full_config)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    assert {k.split(".")[4] for k in tensors} == {"0", "1", "2"}
    assert len(tensors) == 3 * 7 * 2
    original = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    key = "base_model.model.model.layers.{}.mlp.up_proj.lora_A.weight"
    torch.testing.assert_close(tensors[key.format(2)], original[key.format(4)], rtol=0, atol=0)
    carried = PeftModel.from_pretrained(pruned, str(folder)).eval()
    torch.testing.assert_close(_logits(carried, calib_ids), reference, rtol=1e-5, atol=1e-5)


def _zero_removed(adapted, kept: KeptIndices) -> None:
    """Zero, layer by layer, what `kept` removes, in base AND adapter, LoRA unmerged.

    A unit's output rows (gate/up/q/k/v) vanish from `W + scale * B @ A` when they vanish
    from `W` and from `B`; its input columns (down/o) when they vanish from `W` and from `A`.
    Not merging keeps the reference's arithmetic the same as the carried adapter's.
    """
    with torch.no_grad():
        for i, layer in enumerate(adapted.base_model.model.model.layers):
            channels = [c for c in range(172) if c not in kept.mlp[i]]
            kv = _dims([g for g in range(4) if g not in kept.kv_groups[i]])
            q = _dims([h for h in range(8) if h not in kept.query_heads(i, 2)])
            rows = {"gate_proj": channels, "up_proj": channels, "q_proj": q}
            rows |= {"k_proj": kv, "v_proj": kv}
            cols = {"down_proj": channels, "o_proj": q}
            for name in TARGETS:
                proj = getattr(layer.mlp if name in MLP else layer.self_attn, name)
                if name in rows:
                    proj.base_layer.weight[rows[name], :] = 0.0
                    proj.lora_B["default"].weight[rows[name], :] = 0.0
                else:
                    proj.base_layer.weight[:, cols[name]] = 0.0
                    proj.lora_A["default"].weight[:, cols[name]] = 0.0


def test_adapter_on_per_layer_widths_equals_zeroed_units(stories260k_path, calib_ids, tmp_path):
    kept = KeptIndices(
        mlp=tuple(tuple(range(7 * i, 172 - 13 * i)) for i in range(5)),
        kv_groups=((0, 1, 3), (1, 2), (2,), (0, 1, 2, 3), (0, 3)),
    )
    adapted = _with_lora(load(str(stories260k_path))[0].eval())
    adapted.save_pretrained(tmp_path / "adapter")
    full_config = copy.deepcopy(adapted.base_model.model.config)
    reference_model = copy.deepcopy(adapted)
    _zero_removed(reference_model, kept)
    reference = _logits(reference_model, calib_ids)
    pruned = prune(load(str(stories260k_path))[0].eval(), kept)
    pruned.save_pretrained(tmp_path / "pruned")
    folder = map_adapter_folder(tmp_path / "adapter", tmp_path / "mapped", kept, full_config)
    reloaded = load_layer_widths(tmp_path / "pruned")  # the per-layer loader, then the adapter
    carried = PeftModel.from_pretrained(reloaded, str(folder)).eval()
    torch.testing.assert_close(_logits(carried, calib_ids), reference, rtol=1e-5, atol=1e-5)
