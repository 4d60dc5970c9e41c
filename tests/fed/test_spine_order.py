"""FedSpine's global unit ordering and sub-models on stories260K: nested kept sets, index
maps that scatter/gather exactly, sub-model logits equal to the merged-then-pruned global
model, the score update (hand-computed and hostile inputs), the wire form of kept units,
parameter counts and the sparsity schedule."""

from __future__ import annotations

import copy

import pytest
import torch

from edgetune.compress.prune import (
    KeptIndices,
    activation_scores,
    magnitude_scores,
    prune,
)
from edgetune.fed.algorithms.base import load_trainable, trainable_state
from edgetune.fed.hetlora import at_rank
from edgetune.fed.shapes import gather, lora_axes, scatter
from edgetune.fed.spine.order import (
    KEPT_SHAPE,
    KV_KEPT,
    MLP_KEPT,
    UnitOrder,
    index_map,
    kept_params,
    pack_kept,
    schedule,
    unpack_kept,
)
from edgetune.fed.spine.submodel import SubModels, client_stats
from edgetune.peft import PeftConfig, attach

RANK = 4


@pytest.fixture(scope="module")
def stories_model(stories260k_path):
    from edgetune import models

    torch.set_num_threads(1)
    model, _ = models.load(str(stories260k_path))
    return model.eval()


@pytest.fixture(scope="module")
def global_adapter(stories_model):
    """A rank-4 global adapter whose A and B are random (B nonzero, so LoRA matters)."""
    adapter = attach(copy.deepcopy(stories_model), PeftConfig(rank=RANK), seed=0)
    gen = torch.Generator().manual_seed(1)
    state = trainable_state(adapter)
    load_trainable(
        adapter, {n: 0.3 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
    )
    adapter.model.eval()
    return adapter


def _order(model, ranking="layer"):
    return UnitOrder.from_scores(magnitude_scores(model), ranking=ranking)


def _input_ids(seed=0, shape=(2, 12)):
    return torch.randint(3, 512, shape, generator=torch.Generator().manual_seed(seed))


def _is_subset(small: KeptIndices, big: KeptIndices) -> bool:
    pairs = [
        *zip(small.mlp, big.mlp, strict=True),
        *zip(small.kv_groups, big.kv_groups, strict=True),
    ]
    return all(set(s) <= set(b) for s, b in pairs)


@pytest.mark.parametrize(
    ("ranking", "ratios"),
    [("layer", [i / 10 for i in range(9)]), ("global", [i / 10 for i in range(8)])],
)
def test_kept_sets_are_nested_in_the_ratio(stories_model, ranking, ratios):
    # global ranking stops at 0.7: at 0.8 it would remove 16 of the 20 key/value groups,
    # more than the 15 it may (each of the 5 layers keeps one), and select_kept refuses
    order = _order(stories_model, ranking)

    kept = [order.kept(r) for r in ratios]

    assert kept[0] == KeptIndices.everything(stories_model)
    for denser, sparser in zip(kept, kept[1:], strict=False):
        assert _is_subset(sparser, denser)
    sizes = [sum(len(m) for m in k.mlp) for k in kept]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


def test_order_rows_have_mean_one_and_survive_a_state_round_trip(stories_model):
    order = _order(stories_model)
    other = _order(stories_model)
    other.mlp = torch.ones_like(other.mlp)

    other.load_state_dict(order.state_dict())

    assert torch.allclose(order.mlp.mean(1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(order.kv.mean(1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(other.mlp, order.mlp) and torch.equal(other.kv, order.kv)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"mlp": order.mlp[:2], "kv": order.kv})


def test_a_client_update_scatters_and_gathers_back_and_leaves_the_rest(
    stories_model, global_adapter
):
    order = _order(stories_model)
    kept = order.kept(0.5)
    state, axes = trainable_state(global_adapter), lora_axes(global_adapter)
    imap = index_map(kept, stories_model.config, axes, state, rank=2)
    sub = SubModels(global_adapter, PeftConfig(rank=RANK), seed=0).get(kept)
    gen = torch.Generator().manual_seed(2)
    update = {n: torch.randn(s, generator=gen) for n, s in imap.shapes(state).items()}

    merged = {n: t.clone() for n, t in state.items()}
    scatter(merged, update, imap)
    held = {n: torch.zeros_like(t) for n, t in state.items()}
    scatter(held, {n: torch.ones(s) for n, s in imap.shapes(state).items()}, imap)
    with at_rank(sub, 2):
        sub_shapes = {n: p.shape for n, p in zip(sub.names, sub.trainable(), strict=True)}

    assert sub_shapes == imap.shapes(state)
    back = gather(merged, imap)
    assert all(torch.equal(back[n], update[n]) for n in update)
    for name, t in state.items():
        assert torch.equal(merged[name][held[name] == 0], t[held[name] == 0])
    down_a = "base_model.model.model.layers.3.mlp.down_proj.lora_A.default.weight"
    assert imap.shapes(state)[down_a] == (2, 86)  # rank 2, half of the 172 channels
    assert sum(int(h.sum()) for h in held.values()) < sum(t.numel() for t in state.values()) / 2


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_sub_model_with_gathered_adapter_equals_merged_then_pruned_global(
    stories_model, global_adapter, ranking
):
    kept = _order(stories_model, ranking).kept(0.5)
    state, axes = trainable_state(global_adapter), lora_axes(global_adapter)
    sub = SubModels(global_adapter, PeftConfig(rank=RANK), seed=7).get(kept)
    load_trainable(sub, gather(state, index_map(kept, stories_model.config, axes, state, None)))
    reference = prune(copy.deepcopy(global_adapter.model).double().merge_and_unload(), kept)
    ids = _input_ids()

    # float64 (merged in float64 too): in float32, merged W + sBA and W x + s B (A x)
    # already differ by ~1e-3 in the logits, with or without pruning (rounding)
    with torch.no_grad():
        got = sub.model.double().eval()(input_ids=ids).logits
        want = reference.eval()(input_ids=ids).logits
        full = global_adapter.model(input_ids=ids).logits

    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got.float(), full, atol=1e-2)  # pruning changes the output


def test_sub_models_are_cached_least_recently_used(stories_model, global_adapter):
    order = _order(stories_model)
    subs = SubModels(global_adapter, PeftConfig(rank=RANK), seed=0, keep=2)
    a, b, c = order.kept(0.2), order.kept(0.4), order.kept(0.6)

    first = subs.get(a)
    subs.get(b)
    again = subs.get(a)
    subs.get(c)  # evicts b, the least recently used

    assert again is first
    assert list(subs._cache) == [a, c]
    assert sum(p.numel() for p in subs.get(c).model.parameters()) < sum(
        p.numel() for p in first.model.parameters()
    )


def test_client_stats_match_activation_scores_of_the_pruned_base(stories_model):
    # a fresh adapter has B = 0, so the sub-model computes what the pruned base computes
    fresh = attach(copy.deepcopy(stories_model), PeftConfig(rank=RANK), seed=0)
    kept = _order(stories_model, "global").kept(0.4)
    sub = SubModels(fresh, PeftConfig(rank=RANK), seed=0).get(kept)
    batches = [_input_ids(3), _input_ids(4)]
    want = activation_scores(prune(copy.deepcopy(stories_model), kept), batches)

    mlp, kv = client_stats(sub, kept, batches)

    assert mlp.dtype == kv.dtype == torch.float32
    assert torch.allclose(mlp, torch.cat(want.mlp).float(), rtol=1e-5)
    assert torch.allclose(kv, torch.cat(want.kv_groups).float(), rtol=1e-5)
    order = _order(stories_model, "global")
    assert order.update([(kept, mlp, kv, 1.0)]) == sum(map(len, kept.mlp + kept.kv_groups))


def _tiny_order():
    mlp = torch.tensor([[0.5, 1.0, 1.5, 1.0]], dtype=torch.float64)
    return UnitOrder(mlp=mlp, kv=torch.ones(1, 2, dtype=torch.float64), loadable_kv=(1, 2))


def test_update_averages_per_layer_normalized_scores_over_holders():
    order = _tiny_order()
    client_a = (
        KeptIndices(mlp=((0, 1),), kv_groups=((0, 1),)),
        torch.tensor([2.0, 6.0]),
        torch.tensor([1.0, 3.0]),
        1.0,
    )
    client_b = (
        KeptIndices(mlp=((1, 2),), kv_groups=((1,),)),
        torch.tensor([2.5, 1.5]),
        torch.tensor([7.0]),
        3.0,
    )

    changed = order.update([client_a, client_b])

    # A normalized: mlp [0.5, 1.5], kv [0.5, 1.5]; B: mlp [1.25, 0.75], kv [1.0]
    mlp = torch.tensor([0.5, (1 * 1.5 + 3 * 1.25) / 4, 0.75, 1.0], dtype=torch.float64)
    kv = torch.tensor([0.5, (1 * 1.5 + 3 * 1.0) / 4], dtype=torch.float64)
    assert changed == 5
    assert torch.allclose(order.mlp[0], mlp / mlp.mean())
    assert torch.allclose(order.kv[0], kv / kv.mean())


@pytest.mark.parametrize(
    ("kept", "mlp", "kv", "weight", "match"),
    [
        (((0, 1),), [1.0], [1.0, 1.0], 1.0, "2 kept units"),
        (((0, 1),), [1.0, float("nan")], [1.0, 1.0], 1.0, "finite"),
        (((0, 1),), [1.0, -2.0], [1.0, 1.0], 1.0, "non-negative"),
        (((0, 1),), [0.0, 0.0], [1.0, 1.0], 1.0, "all zero"),
        (((0, 1),), [1.0, 2.0], [1.0, 1.0], float("inf"), "weight"),
        (((0, 1),), [1.0, 2.0], [1.0, 1.0], 0.0, "weight"),
        (((0, 9),), [1.0, 2.0], [1.0, 1.0], 1.0, "beyond"),
    ],
)
def test_update_rejects_hostile_reports_and_changes_nothing(kept, mlp, kv, weight, match):
    order = _tiny_order()
    before = order.state_dict()
    good = (
        KeptIndices(mlp=((0, 1, 2, 3),), kv_groups=((0, 1),)),
        torch.tensor([4.0, 3.0, 2.0, 1.0]),
        torch.tensor([1.0, 2.0]),
        1.0,
    )
    bad = (KeptIndices(mlp=kept, kv_groups=((0, 1),)), torch.tensor(mlp), torch.tensor(kv), weight)

    with pytest.raises(ValueError, match=match):
        order.update([good, bad])

    assert torch.equal(order.mlp, before["mlp"]) and torch.equal(order.kv, before["kv"])


def test_update_rejects_a_report_for_another_layer_count():
    order = _tiny_order()
    two_layers = KeptIndices(mlp=((0,), (0,)), kv_groups=((0,), (0,)))

    with pytest.raises(ValueError, match="layers"):
        order.update([(two_layers, torch.ones(2), torch.ones(2), 1.0)])


def test_pack_unpack_round_trip_and_size(stories_model):
    order = _order(stories_model, "global")
    kept = order.kept(0.45)
    smol = UnitOrder(
        torch.ones(30, 1536, dtype=torch.float64), torch.ones(30, 3, dtype=torch.float64), (1, 2, 3)
    )
    smol_kept = smol.kept(0.3)

    packed = pack_kept(kept, order)
    smol_packed = pack_kept(smol_kept, smol)

    assert packed[MLP_KEPT].dtype == torch.uint8 and packed[MLP_KEPT].shape == (5, 22)
    assert packed[KV_KEPT].shape == (5, 1)
    assert unpack_kept(packed) == kept
    assert unpack_kept(smol_packed) == smol_kept
    nbytes = sum(t.numel() * t.element_size() for t in smol_packed.values())
    assert nbytes == 30 * 192 + 30 + 12  # ~5.8 KB for SmolLM2-135M


def test_unpack_rejects_malformed_payloads(stories_model):
    order = _order(stories_model)
    packed = pack_kept(order.kept(0.5), order)
    padding = dict(packed, **{MLP_KEPT: packed[MLP_KEPT].clone()})
    padding[MLP_KEPT][0, -1] |= 0x80  # bit of unit 175 of a 172-wide layer
    empty = dict(packed, **{KV_KEPT: packed[KV_KEPT].clone()})
    empty[KV_KEPT][2] = 0
    cases = {
        "int32 tensor": {k: v for k, v in packed.items() if k != KEPT_SHAPE},
        "uint8 tensor of shape": dict(packed, **{MLP_KEPT: packed[MLP_KEPT].to(torch.int16)}),
        "of shape \\(5, 22\\)": dict(packed, **{MLP_KEPT: packed[MLP_KEPT][:, :-1]}),
        "bits set beyond": padding,
        "layer 2 keeps no unit": empty,
        "must be positive": dict(
            packed, **{KEPT_SHAPE: torch.tensor([5, -172, 4], dtype=torch.int32)}
        ),
    }

    for match, payload in cases.items():
        with pytest.raises(ValueError, match=match):
            unpack_kept(payload)


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_kept_params_equals_the_pruned_model_count(stories_model, ranking):
    kept = _order(stories_model, ranking).kept(0.5)
    config = copy.deepcopy(stories_model.config)

    pruned = prune(copy.deepcopy(stories_model), kept)

    assert kept_params(kept, config) == sum(p.numel() for p in pruned.parameters())
    everything = KeptIndices.everything(stories_model)
    assert kept_params(everything, config) == sum(p.numel() for p in stories_model.parameters())


def test_schedule_is_a_cubic_ramp_to_the_target():
    values = [schedule(r, 10, 0.5, 1.0) for r in (0, 5, 10, 12)]
    half_ramp = [schedule(r, 10, 0.5, 0.5) for r in (0, 2, 5, 9)]

    assert values == pytest.approx([0.0, 0.5 * (1 - 0.5**3), 0.5, 0.5])
    assert half_ramp == pytest.approx([0.0, 0.5 * (1 - 0.6**3), 0.5, 0.5])
    for bad in [(-1, 10, 0.5, 1.0), (0, 10, 1.0, 1.0), (0, 10, 0.5, 0.0), (0, 10, 0.5, 1.5)]:
        with pytest.raises(ValueError):
            schedule(*bad)
