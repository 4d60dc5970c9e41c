"""P-RGE: the multi-copy forward equals a loop of ordinary LoRA forwards, and a P-RGE step
equals sequential MeZO with the same seeds (the core correctness test)."""

from __future__ import annotations

import pytest
import torch

from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach
from edgetune.peft.multicopy import multi_copy, repeat_batch
from edgetune.zo import MeZOEstimator, apply_estimate
from edgetune.zo.prge import PRGEEstimator, build_copies


def _adapter(method: str = "lora"):
    adapter = attach(tiny_llama(seed=4), PeftConfig(method=method, rank=4), seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return adapter


def _example_losses(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )
    return ce.view(ids.shape[0], -1).mean(1)


def _copy_losses(model, ids):
    def copy_losses(copies, num_copies):
        with torch.no_grad(), multi_copy(model, copies, num_copies):
            losses = _example_losses(model, repeat_batch({"ids": ids}, num_copies)["ids"])
        return losses.view(num_copies, -1).mean(1)

    return copy_losses


def _loss_fn(model, ids):
    def loss() -> float:
        with torch.no_grad():
            return float(_example_losses(model, ids).mean())

    return loss


@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_multi_copy_forward_equals_a_loop_of_ordinary_lora(method):
    # Prepare: 3 copies of the adapter, each perturbed differently
    adapter = _adapter(method)
    params = adapter.trainable()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    copies = build_copies(params, [11, 12, 13], 0.05, [1.0, -1.0, 1.0])
    # Execute: one batched pass over the repeated batch
    with torch.no_grad(), multi_copy(adapter.model, copies, 3):
        batched = adapter.model(input_ids=ids.repeat(3, 1)).logits
    # Assert: slice c equals the ordinary model with the adapter set to copy c
    state = adapter.state_dict()
    for c in range(3):
        with torch.no_grad():
            for p in params:
                p.copy_(copies[id(p)][c])
            want = adapter.model(input_ids=ids).logits
        assert (batched[2 * c : 2 * c + 2] - want).abs().max().item() < 1e-5
        adapter.load_state_dict(state)
    assert (batched[0:2] - batched[2:4]).abs().max().item() > 1e-4  # copies really differ


@pytest.mark.parametrize("parallel_inner", [True, False])
@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_prge_step_equals_sequential_mezo_with_the_same_seeds(method, parallel_inner):
    # Prepare: two identical adapters
    a, b = _adapter(method), _adapter(method)
    theta0 = torch.cat([p.detach().flatten().clone() for p in a.trainable()])
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    # Execute: one step each, same step seed, q = 4
    prge = PRGEEstimator(eps=1e-2, queries=4, parallel_inner=parallel_inner)
    est_p = prge.estimate(_copy_losses(a.model, ids), a.trainable(), step_seed=77)
    est_m = MeZOEstimator(eps=1e-2, queries=4).estimate(_loss_fn(b.model, ids), b.trainable(), 77)
    apply_estimate(a.trainable(), est_p, lr=0.1)
    apply_estimate(b.trainable(), est_m, lr=0.1)
    # Assert: same seeds, same scalars and same updated adapter to fp32 tolerance
    assert est_p.seeds == est_m.seeds
    assert est_p.forward_passes == (1 if parallel_inner else 2) and est_m.forward_passes == 8
    assert est_p.scalars == pytest.approx(est_m.scalars, rel=1e-3, abs=1e-3)
    assert max(abs(s) for s in est_m.scalars) > 1e-2  # a real signal, not all zeros
    theta_p = torch.cat([p.detach().flatten() for p in a.trainable()])
    theta_m = torch.cat([p.detach().flatten() for p in b.trainable()])
    # the two updates agree to fp32 rounding of the loss differences (relative 1e-3)
    assert (theta_p - theta_m).norm() < 1e-3 * (theta_m - theta0).norm()


def test_prge_leaves_the_master_adapter_untouched():
    adapter = _adapter()
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    PRGEEstimator(queries=2).estimate(_copy_losses(adapter.model, ids), adapter.trainable(), 1)
    assert all(torch.equal(before[k], v) for k, v in adapter.state_dict().items())
    # and the model is back to its ordinary single-copy behaviour
    assert adapter.model(input_ids=ids).logits.shape[0] == 2
