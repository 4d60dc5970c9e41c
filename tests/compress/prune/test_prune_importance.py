"""Importance scores: a planted dead unit ranks last; padding does not count."""

from __future__ import annotations

import pytest
import torch

from edgetune.compress.prune import activation_scores, magnitude_scores, taylor_scores

SCORERS = {
    "magnitude": lambda model, batches: magnitude_scores(model),
    "activation": activation_scores,
    "taylor": taylor_scores,
}


def _kill_channel(model, layer: int, channel: int) -> None:
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight.data[channel] = 0.0
    mlp.up_proj.weight.data[channel] = 0.0
    mlp.down_proj.weight.data[:, channel] = 0.0


def _kill_group(model, layer: int, group: int) -> None:
    # stories260K: head_dim 8, 2 query heads per KV head -> 16 q rows / o columns per group
    attn = model.model.layers[layer].self_attn
    attn.q_proj.weight.data[group * 16 : (group + 1) * 16] = 0.0
    attn.k_proj.weight.data[group * 8 : (group + 1) * 8] = 0.0
    attn.v_proj.weight.data[group * 8 : (group + 1) * 8] = 0.0
    attn.o_proj.weight.data[:, group * 16 : (group + 1) * 16] = 0.0


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_planted_dead_units_rank_last(stories, calib_ids, method):
    _kill_channel(stories, layer=2, channel=77)
    _kill_group(stories, layer=3, group=1)
    scores = SCORERS[method](stories, [calib_ids])
    assert [s.shape[0] for s in scores.mlp] == [172] * 5
    assert [s.shape[0] for s in scores.kv_groups] == [4] * 5
    assert scores.mlp[2].argmin() == 77 and scores.mlp[2][77] == 0.0
    assert scores.kv_groups[3].argmin() == 1 and scores.kv_groups[3][1] == 0.0
    assert (scores.mlp[2].sort().values[1] > 0) and (scores.kv_groups[3].sort().values[1] > 0)


def test_activation_scores_weigh_magnitude_by_input_norms(stories, calib_ids):
    magnitude = magnitude_scores(stories)
    activation = activation_scores(stories, [calib_ids])
    # same units, different ranking: the activations change which channels matter
    assert not torch.equal(magnitude.mlp[0].argsort(), activation.mlp[0].argsort())
    # the norms add up over batches: the same batch twice scales every score by sqrt(2)
    twice = activation_scores(stories, [calib_ids, calib_ids])
    torch.testing.assert_close(twice.mlp[1], activation.mlp[1] * 2**0.5)
    torch.testing.assert_close(twice.kv_groups[4], activation.kv_groups[4] * 2**0.5)


def test_padding_is_left_out_of_the_activation_norms(stories, calib_ids):
    real = calib_ids[:, :20]
    padded = calib_ids.clone()
    padded[:, 20:] = 0  # junk after the real tokens, masked out (causal: earlier tokens unchanged)
    mask = torch.ones_like(padded)
    mask[:, 20:] = 0
    plain = activation_scores(stories, [real])
    masked = activation_scores(stories, [{"input_ids": padded, "attention_mask": mask}])
    for a, b in zip(plain.mlp + plain.kv_groups, masked.mlp + masked.kv_groups, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_taylor_scores_leave_no_gradients_and_frozen_weights_frozen(stories, calib_ids):
    for p in stories.parameters():
        p.requires_grad_(False)
    scores = taylor_scores(stories, [calib_ids])
    assert all(not p.requires_grad and p.grad is None for p in stories.parameters())
    assert all(s.min() >= 0 and s.max() > 0 for s in scores.mlp + scores.kv_groups)
    # a gradient-aware ranking, not the magnitude one
    assert not torch.equal(scores.mlp[0].argsort(), magnitude_scores(stories).mlp[0].argsort())


def test_activation_layer_scores_are_block_influence(stories, calib_ids):
    scores = activation_scores(stories, [calib_ids])
    with torch.no_grad():
        hidden = stories(input_ids=calib_ids, output_hidden_states=True).hidden_states
    # hidden[i] is layer i's input; the last entry is after the final norm, so stop before it
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        torch.testing.assert_close(scores.layers[i], (1 - cos).mean(), rtol=1e-5, atol=1e-6)
    assert scores.layer_scores() is scores.layers
