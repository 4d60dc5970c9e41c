"""The default partition fits the task: label skew for classification, iid for tasks
without labels, and the run's config.yaml and adapter card say which one was used."""

from __future__ import annotations

import pytest
import yaml

from edgetune.cli import main
from edgetune.recipes.federate import partition_for


def test_auto_partition_depends_on_the_task_and_explicit_schemes_stay():
    assert partition_for("auto", "classification") == "dirichlet:0.5"
    assert partition_for("auto", "lm") == "iid"
    assert partition_for("auto", "instruction") == "iid"
    assert partition_for("quantity:1.0", "lm") == "quantity:1.0"


@pytest.mark.parametrize(
    "dataset, task, expected",
    [("tinystories", "lm", "iid"), ("sst2", "classification", "dirichlet:0.5")],
)
def test_default_federation_runs_and_records_its_partition(
    tmp_path, stories260k_path, shared_data, dataset, task, expected
):
    del shared_data
    out = tmp_path / dataset
    args = [
        "federate",
        "--model",
        str(stories260k_path),
        "--dataset",
        dataset,
        "--task",
        task,
        "--clients",
        "3",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "data.train_size=24",
        "data.eval_size=4",
        "data.max_length=32",
        "train.progress=false",
    ]
    assert main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["fed"]["partition"] == expected
    assert config["data"]["task"] == task
    card = (out / "adapter" / "README.md").read_text()
    assert f"fed.algorithm=fedit, 1 rounds, 3 clients (fleet mixed, partition {expected})" in card
