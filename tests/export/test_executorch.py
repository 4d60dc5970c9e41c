"""ExecuTorch export: the .pte run by the real ExecuTorch runtime equals PyTorch.

Exports are slow (about a minute each for stories260K), so every .pte is built once per
module and shared by the tests that read it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.errors import ConfigError
from edgetune.export.executorch import (
    INSTALL_HINT,
    ExecuTorchSession,
    PteLimits,
    export_pte,
)
from edgetune.export.graph import AdapterInputLM, PlainLM, example_adapter, slots_for
from edgetune.models import load

LIMITS = PteLimits(copies=4, batch=4, seq=16)


@pytest.fixture(scope="module")
def executorch_runtime() -> None:
    """Skip without ExecuTorch, except under CI=true, where it must be installed."""
    try:
        import executorch.runtime  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("executorch is not installed (CI must run the ExecuTorch tests)")
        pytest.skip("executorch is not installed: pip install 'edgetune[export]'")


def _adapter_graph(folder: str, logits: str) -> AdapterInputLM:
    model, _ = load(folder)
    slots = slots_for(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    return AdapterInputLM(model, slots, logits).eval()


def _tokens(copies: int, rows: int, length: int, seed: int, vocab: int = 512):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (copies, rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 0, :3] = 0  # a left-padded row
    return ids, mask


@pytest.fixture(scope="module", params=["last", "all"])
def adapter_pte(request, executorch_runtime, stories260k_path, tmp_path_factory):
    """(graph, .pte path, export facts) for stories260K with q/v LoRA slots of rank 4."""
    torch.set_num_threads(1)
    graph = _adapter_graph(str(stories260k_path), request.param)
    ids, mask = _tokens(2, 2, 8, seed=0)
    args = (ids, mask, *example_adapter(graph.slots, copies=2))
    path = tmp_path_factory.mktemp("pte") / f"adapter_{request.param}.pte"
    facts = export_pte(graph, args, path, LIMITS, adapter_inputs=True)
    return graph, path, facts


@pytest.mark.parametrize("copies", [1, 4])
def test_adapter_pte_matches_pytorch_per_copy(adapter_pte, copies):
    graph, path, _ = adapter_pte
    ids, mask = _tokens(copies, 3, 11, seed=copies)
    adapter = example_adapter(graph.slots, copies=copies, seed=7)
    with torch.no_grad():
        expected = graph(ids, mask, *adapter).numpy()

    got = ExecuTorchSession(path).run([ids.numpy(), mask.numpy(), *(a.numpy() for a in adapter)])

    length = 1 if graph.logits == "last" else 11
    assert got.shape == (copies, 3, length, 512)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    for c in range(1, copies):  # a different adapter per copy is a different model
        assert np.abs(got[c] - got[0]).max() > 1e-3


def test_each_copy_equals_its_adapter_run_alone(adapter_pte):
    graph, path, _ = adapter_pte
    ids, mask = _tokens(1, 2, 9, seed=3)
    adapter = example_adapter(graph.slots, copies=4, seed=11)
    session = ExecuTorchSession(path)

    together = session.run(
        [ids.expand(4, -1, -1).numpy(), mask.expand(4, -1, -1).numpy()]
        + [a.numpy() for a in adapter]
    )

    for c in range(4):
        alone = session.run([ids.numpy(), mask.numpy()] + [a[c : c + 1].numpy() for a in adapter])
        np.testing.assert_allclose(together[c], alone[0], atol=1e-5, rtol=0)


def test_xnnpack_takes_every_linear_and_matmul(adapter_pte):
    _, _, facts = adapter_pte

    assert facts["xnnpack"] is True and facts["limits"] == {"copies": 4, "batch": 4, "seq": 16}
    assert facts["delegated_nodes"] > 0 and facts["portable_nodes"] > 0
    assert facts["planned_mb"] > 0
    portable = " ".join(facts["portable_ops"])
    # The base projections (static weights) and the rank-r branch (input A/B) both delegate.
    assert "linear" not in portable and "mm" not in portable


@pytest.fixture(scope="module")
def merged_pte(executorch_runtime, stories260k_path, tmp_path_factory):
    torch.set_num_threads(1)
    model, _ = load(str(stories260k_path))
    ids, mask = _tokens(1, 2, 8, seed=0)
    path = tmp_path_factory.mktemp("pte") / "merged.pte"
    facts = export_pte(PlainLM(model, "all"), (ids[0], mask[0]), path, LIMITS, adapter_inputs=False)
    return model, path, facts


def test_merged_pte_matches_the_hf_model(merged_pte):
    model, path, facts = merged_pte
    ids, mask = _tokens(1, 4, 16, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids[0], attention_mask=mask[0]).logits.numpy()

    got = ExecuTorchSession(path).run([ids[0].numpy(), mask[0].numpy()])

    assert got.shape == (4, 16, 512)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert "linear" not in " ".join(facts["portable_ops"])


def test_truncated_pte_names_the_file(merged_pte, tmp_path):
    _, path, _ = merged_pte
    broken = tmp_path / "broken.pte"
    data = path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])

    with pytest.raises(ConfigError, match="broken.pte.*export it again"):
        ExecuTorchSession(broken)


def test_missing_pte_is_a_config_error(executorch_runtime, tmp_path):
    with pytest.raises(ConfigError, match="nothing.pte does not exist"):
        ExecuTorchSession(tmp_path / "nothing.pte")


@pytest.mark.parametrize(
    ("shape", "flag"),
    [((5, 1, 4), "--max-copies"), ((1, 5, 4), "--max-batch"), ((1, 1, 17), "--max-seq")],
)
def test_input_past_a_limit_names_the_export_flag(adapter_pte, shape, flag):
    graph, path, _ = adapter_pte
    ids = np.zeros(shape, dtype=np.int64)
    adapter = example_adapter(graph.slots, copies=shape[0])

    with pytest.raises(ConfigError, match="past the limit 4|past the limit 16") as info:
        ExecuTorchSession(path).run([ids, np.ones_like(ids), *(a.numpy() for a in adapter)])
    assert flag in str(info.value)


def test_adapter_of_the_wrong_rank_is_refused(adapter_pte):
    graph, path, _ = adapter_pte
    ids = np.zeros((1, 1, 4), dtype=np.int64)
    adapter = [a.numpy() for a in example_adapter(graph.slots, copies=1)]
    adapter[0] = np.zeros((1, 8, adapter[0].shape[2]), dtype=np.float32)

    with pytest.raises(ConfigError, match="input 2 .* has shape"):
        ExecuTorchSession(path).run([ids, np.ones_like(ids), *adapter])


def test_missing_executorch_says_how_to_install(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "executorch", None)
    ids = torch.zeros(1, 2, dtype=torch.long)

    with pytest.raises(ConfigError) as export_error:
        export_pte(torch.nn.Identity(), (ids, ids), tmp_path / "m.pte", PteLimits(), False)
    with pytest.raises(ConfigError) as session_error:
        ExecuTorchSession(tmp_path / "m.pte")

    assert str(export_error.value) == str(session_error.value) == INSTALL_HINT
    assert not (tmp_path / "m.pte").exists()


@pytest.mark.slow
def test_smollm2_adapter_pte_matches_pytorch(executorch_runtime, tmp_path):
    """SmolLM2-135M, logits=last, a program for 2 copies of 16 x 64 tokens: parity on two
    real sentences, C=2 (padded by the session). Timings: `edgetune bench ondevice`."""
    torch.set_num_threads(1)
    limits = PteLimits(copies=2, batch=16, seq=64)
    model, tok = load("smollm2-135m")
    slots = slots_for(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    graph = AdapterInputLM(model, slots, "last").eval()
    # real text (random token ids push SmolLM2's activations out of range: 1.4e-4 there)
    text = ["The market rallied after the central bank cut rates", "Arsenal won on Sunday"]
    rows = [tok(t)["input_ids"] for t in text]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows]).expand(2, -1, -1)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]).expand(2, -1, -1)
    adapter = example_adapter(slots, copies=2, seed=1)
    with torch.no_grad():
        expected = graph(ids, mask, *adapter).numpy()
    export_pte(graph, (ids, mask, *adapter), tmp_path / "a.pte", limits, True)
    session = ExecuTorchSession(tmp_path / "a.pte")
    got = session.run([ids.numpy(), mask.numpy(), *(a.numpy() for a in adapter)])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(got[1] - got[0]).max() > 1e-4


def test_limits_reject_zero():
    with pytest.raises(ConfigError, match="--max-seq=0"):
        PteLimits(seq=0)


def test_export_refuses_inputs_of_the_wrong_graph(tmp_path):
    ids = torch.zeros(2, 3, dtype=torch.long)

    with pytest.raises(ConfigError, match="expects input_ids of 3 axes"):
        export_pte(torch.nn.Identity(), (ids, ids), Path(tmp_path / "x.pte"), PteLimits(), True)
