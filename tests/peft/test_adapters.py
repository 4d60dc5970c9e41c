"""PEFT methods: LoRA math equals a merged reference, what trains, state round trips."""

from __future__ import annotations

import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.models import tiny_llama
from edgetune.peft import PEFT_METHODS, PeftConfig, attach
from edgetune.peft.targets import DEFAULT_TARGETS


def _randomize_lora_b(model) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_lora_forward_equals_merged_weights_reference():
    # Prepare: LoRA on every projection with non-zero B
    cfg = PeftConfig(rank=4, alpha=8.0)
    adapter = attach(tiny_llama(seed=2), cfg, seed=0)
    _randomize_lora_b(adapter.model)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    # Execute: reference = a fresh base model with W + (alpha/r) B A written into it
    reference = tiny_llama(seed=2)
    params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.rsplit(".", 1)[-1] in DEFAULT_TARGETS["llama"]:
                prefix = f"base_model.model.{name}"
                a = params[f"{prefix}.lora_A.default.weight"]
                b = params[f"{prefix}.lora_B.default.weight"]
                module.weight.add_(b @ a, alpha=cfg.alpha / cfg.rank)
        got = adapter.model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    # Assert
    assert (got - want).abs().max().item() < 1e-5
    assert (want - tiny_llama(seed=2)(input_ids=ids).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "method, expected",
    [
        ("lora", 2 * 7 * 2),  # A and B for 7 projections x 2 layers
        ("lora-fa", 7 * 2),  # B only
        ("prompt", 1),
        ("last-n", 9 * 2),  # 7 linears + 2 norms per block, 2 blocks
        ("full", 21),
    ],
)
def test_each_method_trains_the_expected_tensors(method, expected):
    adapter = attach(tiny_llama(), PeftConfig(method=method), seed=0)
    assert len(adapter.names) == expected
    total = sum(p.numel() for p in adapter.model.parameters())
    assert 0 < adapter.num_trainable() <= total
    frozen = [
        n for n, p in adapter.model.named_parameters() if p.requires_grad and n not in adapter.names
    ]
    assert frozen == []


def test_lora_fa_keeps_a_frozen_but_in_the_state():
    adapter = attach(tiny_llama(), PeftConfig(method="lora-fa"), seed=0)
    assert all("lora_B" in n for n in adapter.names)
    assert any("lora_A" in n for n in adapter.state_dict())


def test_adapter_init_is_a_function_of_the_seed_only():
    a = attach(tiny_llama(), PeftConfig(), seed=5).state_dict()
    torch.rand(3)  # global RNG state must not matter
    b = attach(tiny_llama(), PeftConfig(), seed=5).state_dict()
    c = attach(tiny_llama(), PeftConfig(), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_state_dict_round_trip_restores_outputs():
    adapter = attach(tiny_llama(), PeftConfig(), seed=0)
    _randomize_lora_b(adapter.model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    state = adapter.state_dict()
    want = adapter.model(input_ids=ids).logits
    fresh = attach(tiny_llama(), PeftConfig(), seed=99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model(input_ids=ids).logits, want)


def test_saved_lora_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel

    adapter = attach(tiny_llama(), PeftConfig(), seed=0)
    _randomize_lora_b(adapter.model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    want = adapter.model(input_ids=ids).logits
    folder = adapter.save(tmp_path)
    assert (folder / "adapter_config.json").exists()
    assert (folder / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-6)


def test_bad_peft_settings_raise_clear_errors():
    with pytest.raises(ConfigError, match="has no bias"):
        attach(tiny_llama(), PeftConfig(method="bitfit"), seed=0)
    with pytest.raises(ConfigError, match="not found in this model"):
        attach(tiny_llama(), PeftConfig(target_modules=["qkv"]), seed=0)
    with pytest.raises(ConfigError, match="peft.method"):
        PeftConfig(method="loraa")
    assert "lora" in PEFT_METHODS
