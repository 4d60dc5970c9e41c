"""FLAP bias compensation: the pruned layer's mean output on the calibration batch is kept."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from edgetune.compress.prune import (
    KeptIndices,
    compensate,
    input_means,
    load_layer_widths,
    prune,
)


def _mean_output(model, module_path: str, ids: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of `module_path`'s output on `ids`."""
    seen = []
    handle = model.get_submodule(module_path).register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().reshape(-1, out.shape[-1]).mean(0))
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _kept(mlp_removed: int, kv: tuple[int, ...]) -> KeptIndices:
    return KeptIndices(mlp=(tuple(range(mlp_removed, 172)),) * 5, kv_groups=(kv,) * 5)


def test_compensated_o_proj_keeps_its_mean_output(stories, calib_ids, tmp_path):
    unpruned = copy.deepcopy(stories)
    path = "model.layers.0.self_attn.o_proj"
    reference = _mean_output(unpruned, path, calib_ids)
    kept = _kept(40, (0, 2))
    compensate(stories, kept, input_means(stories, [calib_ids]))
    pruned = prune(stories, kept)
    torch.testing.assert_close(_mean_output(pruned, path, calib_ids), reference, atol=1e-5, rtol=0)
    plain = prune(copy.deepcopy(unpruned), kept)
    drift = (_mean_output(plain, path, calib_ids) - reference).abs().max()
    assert drift > 1e-2  # without compensation the mean moves
    # stock Llama switches: every projection of a compensated block has a bias, zero if unused
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    assert pruned.model.layers[0].mlp.gate_proj.bias.abs().max() == 0
    assert pruned.model.layers[0].self_attn.o_proj.bias.abs().max() > 0
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(
        _logits(reloaded, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0
    )


def test_compensated_down_proj_keeps_its_mean_output(stories, calib_ids):
    path = "model.layers.0.mlp.down_proj"
    reference = _mean_output(copy.deepcopy(stories), path, calib_ids)
    kept = _kept(60, (0, 1, 2, 3))  # MLP only: the layer's MLP input is unchanged
    compensate(stories, kept, input_means(stories, [calib_ids]))
    pruned = prune(stories, kept)
    torch.testing.assert_close(_mean_output(pruned, path, calib_ids), reference, atol=1e-5, rtol=0)
    assert not pruned.config.attention_bias  # heads untouched: no attention biases
    assert pruned.model.layers[0].self_attn.o_proj.bias is None


def test_compensation_with_per_layer_widths_reloads_with_the_edgetune_loader(
    stories, calib_ids, tmp_path
):
    mlp = tuple(tuple(range(10 * i, 172)) for i in range(5))
    kv = ((0, 1, 3), (0, 1, 2, 3), (2,), (0, 2), (1, 2, 3))
    kept = KeptIndices(mlp=mlp, kv_groups=kv, layers=(0, 1, 3, 4))
    compensate(stories, kept, input_means(stories, [calib_ids]))
    pruned = prune(stories, kept)
    pruned.save_pretrained(tmp_path)
    reloaded = load_layer_widths(tmp_path)
    torch.testing.assert_close(
        _logits(reloaded, calib_ids), _logits(pruned, calib_ids), rtol=0, atol=0
    )
