"""Physical shrink: a pruned model computes what the unpruned one computes with those units zeroed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from edgetune.compress.prune import (
    KeptIndices,
    PruneError,
    load_layer_widths,
    magnitude_scores,
    per_layer_widths,
    prune,
)
from edgetune.models import load, tiny_llama


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _drop(n: int, removed: set[int], layers: int = 5) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(i for i in range(n) if i not in removed) for _ in range(layers))


def test_pruned_mlp_channels_equal_zeroed_channels(stories, calib_ids):
    removed = {0, 5, 17, 100, 171}
    kept = KeptIndices(mlp=_drop(172, removed), kv_groups=_drop(4, set()))
    zeroed = copy.deepcopy(stories)
    for layer in zeroed.model.layers:
        layer.mlp.down_proj.weight.data[:, sorted(removed)] = 0.0
    pruned = prune(stories, kept)
    assert pruned.model.layers[0].mlp.gate_proj.weight.shape == (167, 64)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (64, 167)
    torch.testing.assert_close(_logits(pruned, calib_ids), _logits(zeroed, calib_ids))


def test_pruned_kv_groups_equal_zeroed_heads(stories, calib_ids):
    # removing KV groups 1 and 3 removes query heads 2, 3, 6, 7 (2 per KV head, head_dim 8)
    kept = KeptIndices(mlp=_drop(172, set()), kv_groups=_drop(4, {1, 3}))
    zeroed = copy.deepcopy(stories)
    for layer in zeroed.model.layers:
        layer.self_attn.o_proj.weight.data[:, 16:32] = 0.0
        layer.self_attn.o_proj.weight.data[:, 48:64] = 0.0
    reference = _logits(zeroed, calib_ids)
    assert not torch.allclose(reference, _logits(stories, calib_ids))  # the heads mattered
    pruned = prune(stories, kept)
    attn = pruned.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (
        32,
        16,
        32,
    )
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    torch.testing.assert_close(_logits(pruned, calib_ids), reference)


def test_save_and_stock_from_pretrained_round_trip(stories, calib_ids, tmp_path, stories260k_path):
    full_dir, pruned_dir = tmp_path / "full", tmp_path / "pruned"
    stories.save_pretrained(full_dir)
    full_params = _params(stories)
    kept = KeptIndices(mlp=_drop(172, set(range(0, 172, 3))), kv_groups=_drop(4, {0, 2}))
    pruned = prune(stories, kept)
    pruned.save_pretrained(pruned_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    torch.testing.assert_close(
        _logits(reloaded, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0
    )
    assert _params(reloaded) == _params(pruned) < full_params
    load(str(stories260k_path))[1].save_pretrained(pruned_dir)  # a model folder holds both
    ours, _ = load(str(pruned_dir))
    torch.testing.assert_close(_logits(ours, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(pruned_dir) < 0.8 * size(full_dir)


def test_kept_indices_round_trip_as_a_value(stories):
    kept = KeptIndices(mlp=_drop(172, {3}), kv_groups=_drop(4, {2}))
    assert KeptIndices.from_dict(kept.to_dict()) == kept
    assert kept.to_dict()["layers"] is None and kept.kept_layers == (0, 1, 2, 3, 4)
    fewer = KeptIndices(mlp=kept.mlp, kv_groups=kept.kv_groups, layers=(0, 3))
    assert KeptIndices.from_dict(json.loads(json.dumps(fewer.to_dict()))) == fewer
    old_form = {"mlp": fewer.to_dict()["mlp"], "kv_groups": fewer.to_dict()["kv_groups"]}
    assert KeptIndices.from_dict(old_form).layers is None
    with pytest.raises(PruneError, match="keeps no decoder layer"):
        KeptIndices(mlp=kept.mlp, kv_groups=kept.kv_groups, layers=())
    with pytest.raises(PruneError, match="must be distinct, sorted and below 5"):
        KeptIndices(mlp=kept.mlp, kv_groups=kept.kv_groups, layers=(1, 5))
    assert kept.query_heads(0, 2) == (0, 1, 2, 3, 6, 7)
    assert KeptIndices.everything(stories) == KeptIndices(
        mlp=_drop(172, set()), kv_groups=_drop(4, set())
    )


def test_kept_indices_that_do_not_fit_are_refused(stories):
    with pytest.raises(PruneError, match="out of range"):
        prune(stories, KeptIndices(mlp=_drop(173, {0}), kv_groups=_drop(4, set())))
    with pytest.raises(PruneError, match="3 layers but the model has 5"):
        prune(stories, KeptIndices(mlp=_drop(172, set(), 3), kv_groups=_drop(4, set(), 3)))
    with pytest.raises(PruneError, match="keeps no kv_groups units.*lower the pruning ratio"):
        KeptIndices(mlp=_drop(172, set()), kv_groups=((),) * 5)


def test_biases_follow_the_kept_rows(tmp_path):
    model = tiny_llama(attention_bias=True, mlp_bias=True)  # 2 layers, 64 channels, 2 KV groups
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.data = torch.randn(p.shape, generator=gen)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    removed = {1, 2, 30, 63}
    zeroed = copy.deepcopy(model)
    for layer in zeroed.model.layers:
        layer.mlp.down_proj.weight.data[:, sorted(removed)] = 0.0
        layer.self_attn.o_proj.weight.data[:, 16:32] = 0.0  # KV group 1 = query heads 2, 3
    kept = KeptIndices(mlp=_drop(64, removed, layers=2), kv_groups=_drop(2, {1}, layers=2))
    pruned = prune(model, kept)
    assert pruned.model.layers[1].self_attn.q_proj.bias.shape == (16,)
    assert pruned.model.layers[1].mlp.up_proj.bias.shape == (60,)
    torch.testing.assert_close(_logits(pruned, ids), _logits(zeroed, ids))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), rtol=0, atol=0)


def test_an_unsupported_architecture_is_named_with_what_is_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(PruneError, match="GPT2LMHeadModel has no model.layers; supported: Llama"):
        magnitude_scores(gpt2)
    with pytest.raises(PruneError, match="supported: Llama"):
        prune(gpt2, KeptIndices(mlp=((0,),), kv_groups=((0,),)))


def _per_layer_kept() -> KeptIndices:
    """Different widths per layer; layer 0 keeps 3 groups (6 query heads, not a divisor of 64)."""
    mlp = tuple(tuple(range(0, 172 - 20 * i)) for i in range(5))
    kv = ((0, 1, 3), (0, 1, 2, 3), (2,), (0, 2), (1, 2, 3))
    return KeptIndices(mlp=mlp, kv_groups=kv)


def test_per_layer_widths_save_and_load_with_the_edgetune_loader(
    stories, calib_ids, tmp_path, stories260k_path
):
    pruned = prune(stories, _per_layer_kept())
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [
        172,
        152,
        132,
        112,
        92,
    ]
    assert [layer.self_attn.q_proj.out_features for layer in pruned.model.layers] == [
        48,
        64,
        16,
        32,
        48,
    ]
    pruned.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert per_layer_widths(recorded)[2] == {"intermediate_size": 132, "num_key_value_heads": 1}
    assert (recorded["intermediate_size"], recorded["num_key_value_heads"]) == (172, 4)
    reloaded = load_layer_widths(tmp_path)
    torch.testing.assert_close(
        _logits(reloaded, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0
    )
    assert _params(reloaded) == _params(pruned)
    load(str(stories260k_path))[1].save_pretrained(tmp_path)
    ours, _ = load(str(tmp_path))  # edgetune.models.load takes the same path
    torch.testing.assert_close(_logits(ours, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0)


def test_stock_loading_of_per_layer_widths_fails_loudly(stories, tmp_path):
    prune(stories, _per_layer_kept()).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_uniform_head_count_transformers_refuses_is_saved_per_layer(stories, calib_ids, tmp_path):
    # 3 groups = 6 query heads, which do not divide hidden 64: stock config would refuse it
    pruned = prune(stories, KeptIndices(mlp=_drop(172, set()), kv_groups=_drop(4, {0})))
    assert (
        per_layer_widths(pruned.config)
        == [{"intermediate_size": 172, "num_key_value_heads": 3}] * 5
    )
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(
        _logits(load_layer_widths(tmp_path), calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0
    )


class _Skip(torch.nn.Module):
    """A decoder layer replaced by the identity on the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_removed_layers_equal_skipping_them(stories, calib_ids, tmp_path):
    skipped = copy.deepcopy(stories)
    skipped.model.layers[1] = _Skip()
    skipped.model.layers[3] = _Skip()
    reference = _logits(skipped, calib_ids)
    full = _drop(172, set())
    pruned = prune(stories, KeptIndices(mlp=full, kv_groups=_drop(4, set()), layers=(0, 2, 4)))
    assert pruned.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    torch.testing.assert_close(_logits(pruned, calib_ids), reference)
    # cached decoding indexes the cache by the renumbered layer_idx
    out = pruned.generate(calib_ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # uniform widths: stock
    torch.testing.assert_close(_logits(reloaded, calib_ids), reference)


def test_layer_types_follow_the_kept_layers():
    model = tiny_llama(num_hidden_layers=3)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    kept = KeptIndices(mlp=_drop(64, set(), 3), kv_groups=_drop(2, set(), 3), layers=(1, 2))
    assert prune(model, kept).config.layer_types == ["sliding_attention", "full_attention"]
