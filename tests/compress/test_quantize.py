"""Int8 quantization on stories260K: bounded logit error, 3.5x smaller linear weights, and
ZO / first-order steps on a frozen int8 base that move only the LoRA tensors."""

from __future__ import annotations

import math

import pytest
import torch

from edgetune.compress.quantize import Int8Linear, linear_weight_bytes, quantize_int8
from edgetune.data import DataConfig, DataSplits, build_task
from edgetune.errors import ConfigError
from edgetune.models import load
from edgetune.peft import PeftConfig, attach
from edgetune.train import FirstOrderStepper, PRGEStepper, ZOStepper
from edgetune.train.config import OptimConfig
from edgetune.zo import ZOSGD, MeZOEstimator
from edgetune.zo.prge import PRGEEstimator
from peft import PeftModel

DOCS = [
    {"text": "Once upon a time, there was a little girl named Lily. She loved to play outside."},
    {"text": "Tom had a red ball. He threw it to his dog, and the dog ran after it."},
    {"text": "The sun was warm. The birds sang in the tall green tree all day long."},
]
PROMPT_IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _int8_lora(path):
    model, tokenizer = load(str(path))
    adapter = attach(model, PeftConfig(rank=4), seed=0)
    quantize_int8(adapter.model)
    with torch.no_grad():  # B = 0 at init would give A zero gradient; make both matter
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    return adapter, tokenizer


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


def _stepper(kind, adapter, task):
    if kind == "fo":
        optim = OptimConfig(name="sgd", lr=0.5, grad_clip=0.0)
        return FirstOrderStepper(adapter, task, optim, grad_accum=1, seed=0)
    if kind == "zo":
        return ZOStepper(adapter, task, MeZOEstimator(1e-3, 2), ZOSGD(), grad_accum=1, seed=0)
    return PRGEStepper(adapter, task, PRGEEstimator(1e-3, 2), ZOSGD(), grad_accum=1, seed=0)


@pytest.mark.parametrize("kind", ["fo", "zo", "prge"])
def test_training_step_on_int8_base_moves_only_lora(stories260k_path, kind):
    # Prepare: the trainers' own steppers on a real LM task
    adapter, tokenizer = _int8_lora(stories260k_path)
    splits = DataSplits(train=[], eval=[], task="lm", text_fields=["text"])
    task = build_task(splits, DataConfig(max_length=16), tokenizer)
    rows = task.prepare_rows(DOCS)
    base_before, lora_before = _int8_state(adapter.model), _snapshot(adapter)
    stepper = _stepper(kind, adapter, task)
    # Execute
    first = stepper.step(rows, step=0, lr=0.05 if kind == "fo" else 1e-2)
    # Assert: a finite loss, every LoRA tensor moved, the int8 base is byte-identical
    assert math.isfinite(first.loss) and first.loss > 0
    if kind != "fo":
        assert all(c != 0.0 for c in first.estimate.scalars)
    _assert_only_lora_moved(adapter, base_before, lora_before)
    if kind == "fo":  # and the step went downhill
        assert stepper.step(rows, step=1, lr=0.05).loss < first.loss


def test_lora_gradients_on_int8_base_equal_those_on_its_dequantized_fp32_twin(
    stories260k_path,
):
    # Prepare: the same LoRA on the int8 base and on fp32 linears holding the int8 values
    adapter, _ = _int8_lora(stories260k_path)
    twin, _ = _int8_lora(stories260k_path)  # same seeds: same LoRA tensors
    with torch.no_grad():
        for name, module in list(twin.model.named_modules()):
            if isinstance(module, Int8Linear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
                linear.weight.copy_(module.dequantized())
                linear.requires_grad_(False)
                parent, _, child = name.rpartition(".")
                setattr(twin.model.get_submodule(parent), child, linear)
    # Execute
    for a in (adapter, twin):
        logits = a.model(input_ids=PROMPT_IDS).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), PROMPT_IDS[:, 1:].flatten())
        loss.backward()
    # Assert: backprop through the int8 kernel gives the fp32 LoRA gradients
    assert adapter.names == twin.names
    for p, q in zip(adapter.trainable(), twin.trainable(), strict=True):
        assert p.grad.abs().max() > 0
        assert (p.grad - q.grad).norm() < 1e-4 * q.grad.norm()  # fp32 summation order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_input_gradient_matches_dequantized_linear(dtype):
    # Prepare
    gen = torch.Generator().manual_seed(0)
    fp32 = torch.nn.Linear(16, 8)
    with torch.no_grad():
        fp32.weight.copy_(torch.randn(8, 16, generator=gen))
        fp32.bias.copy_(torch.randn(8, generator=gen))
    layer = Int8Linear(fp32)
    x = torch.randn(2, 3, 16, generator=gen).to(dtype).requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 keeps 8 mantissa bits
    # Execute
    y = layer(x)
    y_ref = torch.nn.functional.linear(x_ref, layer.dequantized(), fp32.bias)
    (y.float() ** 2).sum().backward()
    (y_ref**2).sum().backward()
    # Assert: the int8 kernel computes with the dequantized weight, forward and backward,
    # and answers in the input's dtype
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.allclose(y.float(), y_ref, rtol=tol, atol=tol)
    assert torch.allclose(x.grad.float(), x_ref.grad, rtol=tol, atol=tol * 10)
    assert (layer.dequantized() - fp32.weight).abs().max() <= fp32.weight.abs().max() / 254 + 1e-6


@pytest.mark.parametrize(
    ("make", "keep", "message"),
    [
        (lambda: torch.nn.Sequential(torch.nn.ReLU()), (), "no linear layers"),
        (lambda: quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)), ()), (), "already"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)), ("lm_haed",), "lm_haed"),
    ],
    ids=["no-linear", "twice", "unknown-keep"],
)
def test_bad_quantize_requests_are_refused(make, keep, message):
    with pytest.raises(ConfigError, match=message):
        quantize_int8(make(), keep=keep)


def test_adapter_trained_on_int8_base_saves_and_loads_on_the_fp32_base(stories260k_path, tmp_path):
    # Prepare
    adapter, _ = _int8_lora(stories260k_path)
    # Execute: the standard PEFT folder, loaded by stock PEFT onto the fp32 model
    folder = adapter.save(tmp_path)
    fp32, _ = load(str(stories260k_path))
    loaded = dict(PeftModel.from_pretrained(fp32, folder).named_parameters())
    # Assert: LoRA tensors only (no int8 base in the file), bit for bit
    state = adapter.state_dict()
    assert len(state) == 2 * 35
    assert all(torch.equal(loaded[name], value) for name, value in state.items())
