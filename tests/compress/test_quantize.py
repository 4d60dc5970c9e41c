"""Int8 quantization on stories260K: bounded logit error, 3.5x smaller linear weights, and
ZO / first-order steps on a frozen int8 base that move only the LoRA tensors."""

from __future__ import annotations

import pytest
import torch

from edgetune.compress.quantize import Int8Linear, linear_weight_bytes, quantize_int8
from edgetune.errors import ConfigError
from edgetune.models import load
from edgetune.peft import PeftConfig, attach
from edgetune.zo import ZOSGD, MeZOEstimator

PROMPT_IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _causal_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _int8_lora(path):
    model, _ = load(str(path))
    adapter = attach(model, PeftConfig(rank=4), seed=0)
    quantize_int8(adapter.model)
    with torch.no_grad():  # B = 0 at init would give A zero gradient; make both matter
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return adapter


def _int8_state(model) -> dict[str, torch.Tensor]:
    return {
        n: b.clone()
        for n, b in model.named_buffers()
        if n.endswith(".weight_int8") or n.endswith(".scale")
    }


def _snapshot(adapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter.trainable()]


def _assert_only_lora_moved(adapter, base_before, lora_before):
    base_after = _int8_state(adapter.model)
    assert base_after.keys() == base_before.keys() and len(base_after) == 2 * 35
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    moved = [not torch.equal(a, b) for a, b in zip(adapter.trainable(), lora_before, strict=True)]
    assert all(moved)
    assert all(".lora_A." in n or ".lora_B." in n for n in adapter.names)


def test_int8_logits_stay_close_to_fp32(stories260k_path):
    # Prepare
    fp32, _ = load(str(stories260k_path))
    int8, _ = load(str(stories260k_path))
    quantize_int8(int8)
    # Execute
    with torch.no_grad():
        ref = fp32(input_ids=PROMPT_IDS).logits
        got = int8(input_ids=PROMPT_IDS).logits
    # Assert: every decoder projection is int8 (5 layers x 7), lm_head stays fp32 and tied
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 35
    assert int8.lm_head.weight is int8.model.embed_tokens.weight
    # Measured: max error 1.9 % of the largest |logit| (0.31 of 16.7), top-1 agreement
    # 47 / 48 tokens, KL(fp32 || int8) 5.5e-4 nats per token. Bounds leave ~2.5x room.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.95
    kl = (
        torch.nn.functional.kl_div(
            got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"
        )
        / ref.shape[:2].numel()
    )
    assert kl < 2e-3


def test_int8_shrinks_linear_weights_3_5x(stories260k_path):
    model, _ = load(str(stories260k_path))
    before = linear_weight_bytes(model)
    quantize_int8(model)
    after = linear_weight_bytes(model)
    assert before == 4 * 5 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 172 * 3)
    assert before / after >= 3.5


def test_zo_step_on_int8_base_moves_only_lora(stories260k_path):
    # Prepare
    adapter = _int8_lora(stories260k_path)
    base_before, lora_before = _int8_state(adapter.model), _snapshot(adapter)
    params = adapter.trainable()

    def loss() -> float:
        with torch.no_grad():
            return float(_causal_loss(adapter.model, PROMPT_IDS))

    # Execute
    start = loss()
    est = MeZOEstimator(eps=1e-3, queries=2).estimate(loss, params, 3)
    ZOSGD().step(params, est, lr=1e-2)
    # Assert
    assert est.forward_passes == 4 and all(s != 0.0 for s in est.scalars)
    _assert_only_lora_moved(adapter, base_before, lora_before)
    assert loss() != start


def test_first_order_step_on_int8_base_moves_only_lora(stories260k_path):
    # Prepare
    adapter = _int8_lora(stories260k_path)
    base_before, lora_before = _int8_state(adapter.model), _snapshot(adapter)
    opt = torch.optim.SGD(adapter.trainable(), lr=0.5)
    # Execute
    loss = _causal_loss(adapter.model, PROMPT_IDS)
    loss.backward()
    grads = {n: p.grad for n, p in zip(adapter.names, adapter.trainable(), strict=True)}
    opt.step()
    # Assert: lora_A of the first layer gets its gradient through the int8 layers above it
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    _assert_only_lora_moved(adapter, base_before, lora_before)
    with torch.no_grad():
        assert _causal_loss(adapter.model, PROMPT_IDS) < loss


def test_int8_input_gradient_matches_dequantized_linear():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    fp32 = torch.nn.Linear(16, 8)
    with torch.no_grad():
        fp32.weight.copy_(torch.randn(8, 16, generator=gen))
        fp32.bias.copy_(torch.randn(8, generator=gen))
    layer = Int8Linear(fp32)
    x = torch.randn(2, 3, 16, generator=gen).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    # Execute
    y = layer(x)
    y_ref = torch.nn.functional.linear(x_ref, layer.dequantized(), fp32.bias)
    (y**2).sum().backward()
    (y_ref**2).sum().backward()
    # Assert: the int8 kernel computes with the dequantized weight, forward and backward
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert (layer.dequantized() - fp32.weight).abs().max() <= fp32.weight.abs().max() / 254 + 1e-6


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ConfigError, match="no linear layers"):
        quantize_int8(torch.nn.Sequential(torch.nn.ReLU()))
