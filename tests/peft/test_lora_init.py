"""peft.init: every LoRA initialisation edgetune offers trains, starts every party of a
federation from the same adapter, and the ones it cannot honour are refused with why."""

from __future__ import annotations

import pytest
import torch

from edgetune.cli import main
from edgetune.errors import ConfigError
from edgetune.models import tiny_llama
from edgetune.peft import PeftConfig, attach
from edgetune.peft.config import LORA_INITS, REFUSED_INITS


def _tensors(adapter):
    return {n: p.detach().clone() for n, p in zip(adapter.names, adapter.trainable(), strict=True)}


@pytest.mark.parametrize("init", sorted(LORA_INITS))
def test_each_init_is_a_function_of_the_seed_so_every_client_starts_alike(init):
    # Execute: the adapter as the server and two devices attach it (same run seed)
    cfg = PeftConfig(rank=2, init=init)
    parties = [_tensors(attach(tiny_llama(seed=3), cfg, seed=5)) for _ in range(3)]
    other_seed = _tensors(attach(tiny_llama(seed=3), cfg, seed=6))
    # Assert: identical across parties, different for another seed; B = 0 where promised
    assert all(torch.equal(parties[0][n], p[n]) for p in parties[1:] for n in parties[0])
    assert any(not torch.equal(parties[0][n], other_seed[n]) for n in parties[0])
    b_zero = all(float(t.abs().sum()) == 0 for n, t in parties[0].items() if "lora_B" in n)
    assert b_zero == (init != "orthogonal")


@pytest.mark.parametrize("init", sorted(LORA_INITS))
def test_each_init_trains_from_the_cli(init, tmp_path, stories260k_path, shared_data):
    del shared_data
    out = tmp_path / init
    args = ["finetune", "--model", str(stories260k_path), "--dataset", "sst2", "--method", "fo"]
    args += ["--steps", "2", "--batch-size", "2", "--out", str(out), "--threads", "1"]
    args += ["data.train_size=8", "data.eval_size=4", "data.max_length=32", f"peft.init={init}"]
    assert main(args) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("init", sorted(REFUSED_INITS))
def test_inits_edgetune_cannot_honour_are_refused_with_the_reason(init):
    with pytest.raises(ConfigError, match=f"peft.init={init}: edgetune does not support it"):
        PeftConfig(init=init)


def test_init_is_refused_for_methods_without_lora():
    with pytest.raises(ConfigError, match="initialises LoRA"):
        PeftConfig(method="bitfit", init="gaussian")
