"""Shared trunk on real stories260K steps: the same losses, traces and updates as full
depth, with the frozen bottom blocks run once per batch instead of once per pass."""

from __future__ import annotations

import pytest
import torch

from edgetune import models
from edgetune.data import DataConfig, build_task, load_splits
from edgetune.errors import ConfigError
from edgetune.peft import PeftConfig, attach
from edgetune.train.config import OptimConfig, TrainConfig
from edgetune.train.factory import build_stepper
from edgetune.train.trunk import find_decoder, resolve_trunk
from edgetune.zo.config import ZOConfig

QUERIES, ROWS, STEPS = 2, 4, 3


@pytest.fixture(scope="module")
def sst2(stories260k_path, shared_data):
    """The SST-2 task on stories260K's tokenizer and 12 of its training rows."""
    del shared_data
    _, tokenizer = models.load(str(stories260k_path))
    cfg = DataConfig(dataset="sst2", max_length=32, eval_size=16)
    splits = load_splits(cfg, 0)
    task = build_task(splits, cfg, tokenizer)
    return task, task.prepare_rows(splits.train)[: ROWS * STEPS]


def _train(stories260k_path, sst2, method, peft, trunk, **peft_settings):
    """Three steps from the same start; the rows each block saw, per block."""
    task, rows = sst2
    model, _ = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(method=peft, **peft_settings), seed=0)
    stepper = build_stepper(
        method,
        adapter,
        task,
        OptimConfig(lr=1e-2),
        ZOConfig(queries=QUERIES),
        1,
        0,
        exact_restore=True,
        trunk=trunk,
    )
    blocks = find_decoder(adapter.model).layers
    seen = [0] * len(blocks)

    def count(i):
        def hook(module, args, kwargs):
            seen[i] += args[0].shape[0] if args else kwargs["hidden_states"].shape[0]

        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(count(i), with_kwargs=True)
    results = [stepper.step(rows[s * ROWS : (s + 1) * ROWS], s, 1e-2) for s in range(STEPS)]
    return results, adapter.state_dict(), seen, stepper.trunk.cut


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a))


@pytest.mark.parametrize("peft", ["lora", "lora-fa"])
@pytest.mark.parametrize("method", ["zo", "prge"])
def test_shared_trunk_steps_equal_full_depth_steps(stories260k_path, sst2, method, peft):
    # Prepare / Execute: the same three steps at full depth and with the trunk shared
    full, full_state, full_seen, _ = _train(
        stories260k_path, sst2, method, peft, "off", layers="top:2"
    )
    cut_run, cut_state, cut_seen, cut = _train(
        stories260k_path, sst2, method, peft, "auto", layers="top:2"
    )
    # Assert: same seeds, scalars, losses and adapter (fp32 tolerance)
    for a, b in zip(full, cut_run, strict=True):
        assert a.estimate.seeds == b.estimate.seeds
        assert all(
            _close(x, y) for x, y in zip(a.estimate.scalars, b.estimate.scalars, strict=True)
        )
        assert _close(a.loss, b.loss)
    for name, value in full_state.items():
        torch.testing.assert_close(cut_state[name], value, rtol=1e-5, atol=1e-6)
    assert any((full_state[n] != v).any() for n, v in _initial(stories260k_path, peft))
    # ... and the bottom blocks ran each step's rows once instead of 2q times
    blocks = len(full_seen)
    assert cut == blocks - 2
    assert full_seen == [STEPS * ROWS * 2 * QUERIES] * blocks
    assert cut_seen == [STEPS * ROWS] * cut + [STEPS * ROWS * 2 * QUERIES] * 2


def _initial(stories260k_path, peft):
    """The adapter's tensors before any step (to show the steps changed it)."""
    model, _ = models.load(str(stories260k_path))
    return attach(model, PeftConfig(method=peft, layers="top:2"), seed=0).state_dict().items()


def test_first_order_steps_with_a_shared_trunk_equal_full_depth(stories260k_path, sst2):
    # Execute
    _, full_state, full_seen, _ = _train(
        stories260k_path, sst2, "fo", "lora", "off", layers="top:2"
    )
    _, cut_state, cut_seen, cut = _train(
        stories260k_path, sst2, "fo", "lora", "auto", layers="top:2"
    )
    # Assert: equal updates; each block ran each row once either way
    for name, value in full_state.items():
        torch.testing.assert_close(cut_state[name], value, rtol=1e-5, atol=1e-6)
    assert cut == len(full_seen) - 2
    assert cut_seen == full_seen == [STEPS * ROWS] * len(full_seen)


def test_last_n_shares_the_blocks_below_the_ones_it_trains(stories260k_path, sst2):
    # Execute
    full, full_state, _, _ = _train(stories260k_path, sst2, "zo", "last-n", "off", last_layers=1)
    shared, shared_state, seen, cut = _train(
        stories260k_path, sst2, "zo", "last-n", "auto", last_layers=1
    )
    # Assert
    assert cut == len(seen) - 1
    assert all(_close(a.loss, b.loss) for a, b in zip(full, shared, strict=True))
    for name, value in full_state.items():
        torch.testing.assert_close(shared_state[name], value, rtol=1e-5, atol=1e-6)


def test_a_cut_above_trainable_tensors_is_an_error_naming_them(stories260k_path):
    # Prepare: LoRA on every block
    model, _ = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(method="lora"), seed=0)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"layers\.0\..*lora_A.*peft\.layers=top:2"):
        resolve_trunk("3", adapter.model)
    assert resolve_trunk("auto", adapter.model).cut == 0  # auto shares nothing here
    with pytest.raises(ConfigError, match="exported graph"):
        resolve_trunk("3", adapter.model, runtime=True)


def test_prompt_tuning_shares_nothing(stories260k_path):
    # Prepare: a soft prompt enters below block 0
    model, _ = models.load(str(stories260k_path))
    adapter = attach(model, PeftConfig(method="prompt"), seed=0)
    # Execute / Assert
    assert resolve_trunk("auto", adapter.model).cut == 0
    with pytest.raises(ConfigError, match="prompt"):
        resolve_trunk("1", adapter.model)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "last-n", "layers": "top:2"}, "peft.layers=top:2 places LoRA adapters"),
        ({"method": "lora", "layers": "bottom:2"}, "expected all or top:K"),
        ({"method": "lora", "layers": "top:0"}, "expected all or top:K"),
    ],
)
def test_bad_layer_choices_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        PeftConfig(**settings)


def test_more_top_blocks_than_the_model_has_is_refused(stories260k_path):
    model, _ = models.load(str(stories260k_path))
    with pytest.raises(ConfigError, match="top:9 but the model has 5 layers"):
        attach(model, PeftConfig(method="lora", layers="top:9"), seed=0)


@pytest.mark.parametrize("value", ["yes", "-1", "top:2"])
def test_a_trunk_setting_that_is_not_auto_off_or_a_count_is_refused(value):
    with pytest.raises(ConfigError, match="train.trunk: expected auto, off or a block count"):
        TrainConfig(trunk=value)
