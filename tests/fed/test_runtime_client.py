"""A federated client that trains through ONNX Runtime sends a PyTorch client's traces.

Two 2-round federations of stories260K on SST-2, identical but for one device: in the
first, client 0's profile names runtime ort and trains through the exported graph (rank-4
LoRA inputs on q_proj, v_proj); in the second every client is PyTorch. The runtime
client's uploads must carry the same seeds and the same scalars up to the runtime's
rounding, and the two global adapters must agree. Measured on the build machine
(zo.eps = 1e-3): scalars c differ by at most 1e-3 (ORT's losses differ from PyTorch's by
~1e-6, and c = (L+ - L-) / 2 eps), the final adapters by at most 3.2e-6.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgetune.errors import ConfigError
from edgetune.fed import runtime_client
from edgetune.fed.algorithms.fedit import FedIT
from edgetune.fed.algorithms.fedkseed import FedKSeed
from edgetune.fed.fleet import DeviceProfile, choose_method
from edgetune.fed.payloads import SeedTrace, ZOTrace

SCALAR_ATOL, SCALAR_RTOL = 5e-3, 1e-3  # on c, in loss units per unit step
ADAPTER_ATOL = 5e-5
PROFILE = {"memory_mb": 4000, "gflops": 50, "up_mbps": 10, "down_mbps": 50}


def write_fleet(folder: Path, runtime: str, other: str = "") -> Path:
    """A two-device fleet YAML: dev-a with `runtime`, dev-b with `other`."""
    path = folder / f"fleet-{runtime or 'torch'}-{other or 'torch'}.yaml"
    devices = [{"name": "dev-a", **PROFILE, "runtime": runtime}]
    devices.append({"name": "dev-b", **PROFILE, "runtime": other})
    path.write_text(json.dumps({"fleet": devices}))  # JSON is YAML
    return path


@pytest.fixture
def fed_args(stories260k_path, shared_data):
    del shared_data

    def make(out: Path, fleet: Path, *extra: str, algorithm="fedkseed", method="zo"):
        return [
            "federate",
            "--model",
            str(stories260k_path),
            "--dataset",
            "sst2",
            "--algorithm",
            algorithm,
            "--method",
            method,
            "--clients",
            "2",
            "--participation",
            "1.0",
            "--partition",
            "iid",
            "--fleet",
            str(fleet),
            "--rounds",
            "2",
            "--local-steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--threads",
            "1",
            "data.train_size=32",
            "data.eval_size=8",
            "data.max_length=32",
            "peft.rank=4",
            "peft.target_modules=[q_proj,v_proj]",
            "train.progress=false",
            *extra,
        ]

    return make


@pytest.fixture
def uploads(monkeypatch):
    """Every update a client uploads, by (job seed, client); and a fresh session cache
    whose opens are counted."""
    seen: dict[tuple[int, int], object] = {}
    for cls in (FedKSeed, FedIT):
        original = cls.client_update

        def spy(self, adapter, payload, job, state, original=original):
            update, kept = original(self, adapter, payload, job, state)
            seen[(job.seed, job.client)] = update
            return update, kept

        monkeypatch.setattr(cls, "client_update", spy)
    opened: list[Path] = []
    real_open = runtime_client.open_session

    def counting_open(fmt, path, threads=1):
        opened.append(Path(path))
        return real_open(fmt, path, threads)

    monkeypatch.setattr(runtime_client, "_SESSIONS", {})
    monkeypatch.setattr(runtime_client, "open_session", counting_open)
    return seen, opened


def seeds_and_scalars(update: object, lr: float) -> tuple[list[int], torch.Tensor]:
    """(directions, estimated c) of a FedKSeed ZOTrace or a FedIT SeedTrace (coef = lr c)."""
    if isinstance(update, ZOTrace):
        return update.indices, torch.tensor(update.scalars, dtype=torch.float64)
    assert isinstance(update, SeedTrace)
    return update.seeds, torch.tensor(update.coefs, dtype=torch.float64) / lr


@pytest.mark.parametrize(
    ("algorithm", "method", "peft"),
    [("fedkseed", "zo", "lora"), ("fedit", "prge", "lora"), ("fedit", "prge", "lora-fa")],
)
def test_a_runtime_client_sends_the_traces_of_a_pytorch_client(
    tmp_path, fed_args, uploads, onnx_lora_export, cli, algorithm, method, peft
):
    # Prepare
    seen, opened = uploads
    mixed, torch_only = write_fleet(tmp_path, "ort"), write_fleet(tmp_path, "")
    export = f"fed.export={onnx_lora_export}"
    peft_flags = ("--peft", peft)
    lr = 1e-3  # the run's optim.lr (federate's default)

    # Execute
    args = {"algorithm": algorithm, "method": method}
    assert cli(fed_args(tmp_path / "ort", mixed, export, *peft_flags, **args)) == 0
    runtime_uploads = dict(seen)
    seen.clear()
    assert cli(fed_args(tmp_path / "torch", torch_only, *peft_flags, **args)) == 0

    # Assert: client 0 trained through ONNX Runtime, one session for both rounds
    clients = [json.loads(x) for x in (tmp_path / "ort" / "clients.jsonl").read_text().splitlines()]
    assert [(c["client"], c.get("runtime"), c["status"]) for c in clients] == [
        (0, "ort", "ok"),
        (1, None, "ok"),
    ] * 2
    assert opened == [onnx_lora_export / "model.onnx"]
    # Assert: the same uploads, seed for seed, scalars up to the runtime's rounding
    assert runtime_uploads.keys() == seen.keys() and len(seen) == 4
    runtime_differs = False
    for key, update in runtime_uploads.items():
        seeds, scalars = seeds_and_scalars(update, lr)
        want_seeds, want = seeds_and_scalars(seen[key], lr)
        assert seeds == want_seeds and len(seeds) == 3
        assert torch.allclose(scalars, want, rtol=SCALAR_RTOL, atol=SCALAR_ATOL), (key, scalars)
        runtime_differs |= key[1] == 0 and not torch.equal(scalars, want)
    assert runtime_differs  # the graph, not PyTorch, computed client 0's losses
    a, b = (
        load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("ort", "torch")
    )
    assert a.keys() == b.keys() and len(a) == 20  # 5 layers x (q, v) x (A, B)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= ADAPTER_ATOL
    assert any(not torch.equal(a[k], b[k]) for k in a if ".lora_B." in k)


def edited_export(source: Path, folder: Path, **changes: object) -> Path:
    """A copy of an export folder whose export.json has `changes` (export.json carries
    no checksum of itself)."""
    target = folder / "edited-export"
    shutil.copytree(source, target)
    manifest = json.loads((target / "export.json").read_text())
    (target / "export.json").write_text(json.dumps({**manifest, **changes}))
    return target


@pytest.mark.parametrize(
    ("runtimes", "extra", "edit", "message"),
    [
        (("ort", ""), [], None, r"name runtime ort.*fed\.export is empty"),
        (
            ("", ""),
            ["fed.export={export}"],
            None,
            r"no device .* names a runtime.*drop fed\.export",
        ),
        (
            ("executorch", ""),
            ["fed.export={export}"],
            None,
            r"export of format onnx, but .* runtime executorch run executorch",
        ),
        (
            ("ort", ""),
            ["fed.export={export}", "peft.rank=8"],
            None,
            r"does not fit the federation's adapter: .*q_proj is \(in, out, rank\) "
            r"\(64, 64, 4\) in the export, \(64, 64, 8\) here",
        ),
        (
            ("ort", ""),
            ["fed.export={export}", "peft.target_modules=[q_proj]"],
            None,
            r"LoRA modules only in the export: \['model\.layers\.0\.self_attn\.v_proj'",
        ),
        (
            ("ort", ""),
            ["fed.export={export}", "--algorithm", "fedit", "--method", "fo"],
            None,
            r"fed\.method=fo: devices with runtime ort have no backward",
        ),
        (("ort", ""), ["fed.export={export}"], {"slots": []}, r"has no adapter inputs"),
        (
            ("ort", ""),
            ["fed.export={export}", "--task", "lm"],
            {"logits": "last"},
            r"only the last position's logits .* the lm task reads every position",
        ),
    ],
    ids=["no-export", "unused-export", "format", "rank", "targets", "fo", "plain", "logits"],
)
def test_a_runtime_federation_that_cannot_work_is_refused_before_training(
    tmp_path, fed_args, onnx_lora_export, cli, capsys, runtimes, extra, edit, message
):
    # Prepare
    export = edited_export(onnx_lora_export, tmp_path, **edit) if edit else onnx_lora_export
    fleet = write_fleet(tmp_path, *runtimes)
    out = tmp_path / "run"
    argv = fed_args(out, fleet, *(x.format(export=export) for x in extra))

    # Execute
    status = cli(argv)

    # Assert
    assert status == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))
    assert not (out / "metrics.jsonl").exists()


def test_a_runtime_device_has_no_backward_and_an_unknown_runtime_is_refused():
    # Prepare
    runtime = DeviceProfile("dev", runtime="ort", **PROFILE)
    pytorch = DeviceProfile("dev", **PROFILE)

    # Execute / Assert
    assert choose_method(pytorch, 10**6, "auto") == "fo"
    assert choose_method(runtime, 10**6, "auto") == "prge"
    with pytest.raises(ConfigError, match=r"runtime: expected '' \(PyTorch\) or one of ort"):
        DeviceProfile("dev", runtime="onnx", **PROFILE)
