"""The generic trainer: Adam steps, per-epoch safetensors checkpoints with optimiser state, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zsadkit.training import CheckpointMismatchError, TrainConfig, latest_checkpoint, train


def regression_problem(seed: int = 0) -> tuple[list[dict], dict[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(20, 3, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    data = [{"x": inputs[i], "y": targets[i]} for i in range(20)]
    parameters = {"weight": torch.nn.Parameter(torch.zeros(3)), "bias": torch.nn.Parameter(torch.zeros(()))}
    return data, parameters


def mse_step(parameters):
    def step(batch):
        prediction = batch["x"] @ parameters["weight"] + parameters["bias"]
        error = ((prediction - batch["y"]) ** 2).mean()
        return {"loss": error, "abs_bias": parameters["bias"].detach().abs(), "vector": torch.ones(2)}
    return step


def test_training_reduces_the_loss_and_logs_epoch_means(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    result = train(parameters, data, mse_step(parameters),
                   TrainConfig(epochs=5, batch_size=4, lr=0.1, checkpoint_dir=str(tmp_path)))
    losses = [row["loss"] for row in result.log]
    assert losses[-1] < 0.5 * losses[0]
    assert [row["epoch"] for row in result.log] == [1, 2, 3, 4, 5]
    assert "vector" not in result.log[0] and "abs_bias" in result.log[0]
    with (tmp_path / "loss_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["loss"]) for r in rows] == pytest.approx(losses)


def test_one_adam_step_matches_torch_adam_with_the_reference_betas() -> None:
    data, parameters = regression_problem()
    expected = {name: value.detach().clone().requires_grad_(True) for name, value in parameters.items()}
    optimizer = torch.optim.Adam(list(expected.values()), lr=1e-3, betas=(0.5, 0.999))
    batch = {"x": torch.stack([d["x"] for d in data]), "y": torch.stack([d["y"] for d in data])}
    mse_step(expected)(batch)["loss"].backward()
    optimizer.step()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=1, batch_size=20, shuffle=False))
    for name in parameters:
        assert torch.allclose(parameters[name], expected[name], atol=1e-7)


def test_checkpoints_hold_parameters_and_adam_state_per_epoch(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=2, batch_size=5, checkpoint_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["epoch_001.safetensors", "epoch_002.safetensors"]
    tensors = load_file(str(tmp_path / "epoch_002.safetensors"))
    assert torch.equal(tensors["param/weight"], parameters["weight"].detach())
    assert {"adam/weight/exp_avg", "adam/weight/exp_avg_sq", "adam/weight/step"} <= set(tensors)
    assert float(tensors["adam/weight/step"]) == 8  # 2 epochs x 4 batches


def test_resuming_after_an_interruption_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    data, straight = regression_problem()
    train(straight, data, mse_step(straight), TrainConfig(epochs=4, batch_size=6, lr=0.05))
    data, resumed = regression_problem()
    config = TrainConfig(epochs=2, batch_size=6, lr=0.05, checkpoint_dir=str(tmp_path))
    train(resumed, data, mse_step(resumed), config)
    data, fresh_process = regression_problem()  # a new process: parameters start from scratch again
    result = train(fresh_process, data, mse_step(fresh_process),
                   TrainConfig(epochs=4, batch_size=6, lr=0.05, checkpoint_dir=str(tmp_path)))
    assert result.resumed_from == 2 and [row["epoch"] for row in result.log] == [1, 2, 3, 4]
    for name in straight:
        assert torch.equal(fresh_process[name], straight[name])


def test_a_truncated_last_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=2, batch_size=5, checkpoint_dir=str(tmp_path)))
    last = tmp_path / "epoch_002.safetensors"
    last.write_bytes(last.read_bytes()[:20])
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "epoch_001.safetensors"


def test_resuming_with_other_parameters_names_the_checkpoint(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=1, checkpoint_dir=str(tmp_path)))
    other = {"weight": torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(ValueError, match="epoch_001.safetensors: checkpoint parameters"):
        train(other, data, lambda b: {"loss": other["weight"].sum()}, TrainConfig(epochs=2, checkpoint_dir=str(tmp_path)))


def test_resuming_a_folder_of_another_configuration_names_the_differing_fields(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=1, lr=0.05, checkpoint_dir=str(tmp_path)))
    data, other = regression_problem()
    with pytest.raises(CheckpointMismatchError, match=rf"{tmp_path}.*train\.lr: 0\.05 → 0\.01.*delete"):
        train(other, data, mse_step(other), TrainConfig(epochs=1, lr=0.01, checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointMismatchError, match=r"train\.seed: 111 → 3"):
        train(other, data, mse_step(other), TrainConfig(epochs=1, lr=0.05, seed=3, checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointMismatchError, match=r"samples: <absent> → 'abc'"):
        train(other, data, mse_step(other), TrainConfig(epochs=1, lr=0.05, checkpoint_dir=str(tmp_path)),
              fingerprint={"samples": "abc"})
    assert torch.equal(other["weight"], torch.zeros(3))  # nothing was loaded


def test_more_epochs_continue_and_fewer_epochs_resume_from_the_earlier_checkpoint(tmp_path: Path) -> None:
    fingerprint = {"config": {"word": "damaged"}, "samples": "abc"}
    data, first = regression_problem()
    train(first, data, mse_step(first), TrainConfig(epochs=1, lr=0.05, checkpoint_dir=str(tmp_path)),
          fingerprint=fingerprint)
    after_one = {name: value.detach().clone() for name, value in first.items()}
    data, longer = regression_problem()
    result = train(longer, data, mse_step(longer), TrainConfig(epochs=2, lr=0.05, checkpoint_dir=str(tmp_path)),
                   fingerprint=fingerprint)
    assert result.resumed_from == 1 and [row["epoch"] for row in result.log] == [1, 2]
    data, shorter = regression_problem()
    result = train(shorter, data, mse_step(shorter), TrainConfig(epochs=1, lr=0.05, checkpoint_dir=str(tmp_path)),
                   fingerprint=fingerprint)
    assert result.resumed_from == 1 and [row["epoch"] for row in result.log] == [1]
    for name in after_one:
        assert torch.equal(shorter[name], after_one[name])
    with pytest.raises(CheckpointMismatchError, match=r"config\.word: 'damaged' → 'flawed'"):
        train(shorter, data, mse_step(shorter), TrainConfig(epochs=2, lr=0.05, checkpoint_dir=str(tmp_path)),
              fingerprint={**fingerprint, "config": {"word": "flawed"}})


def test_a_checkpoint_without_a_fingerprint_is_not_resumed(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=1, checkpoint_dir=str(tmp_path)))
    path = tmp_path / "epoch_001.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "fingerprint"}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(CheckpointMismatchError, match="no training fingerprint"):
        train(parameters, data, mse_step(parameters), TrainConfig(epochs=2, checkpoint_dir=str(tmp_path)))
