"""The one trainer: optimisers and schedules, per-epoch safetensors checkpoints with optimiser state, exact resume."""

from __future__ import annotations

import csv
import inspect
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zsadkit.training import (
    CheckpointMismatchError,
    TrainConfig,
    code_digest,
    latest_checkpoint,
    learning_rate,
    train,
)


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
    assert {"optim/weight/exp_avg", "optim/weight/exp_avg_sq", "optim/weight/step"} <= set(tensors)
    assert float(tensors["optim/weight/step"]) == 8  # 2 epochs x 4 batches


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
    assert result.describe() == "resumed after epoch 2 of 4, trained 2"
    for name in straight:
        assert torch.equal(fresh_process[name], straight[name])
    data, again = regression_problem()
    assert train(again, data, mse_step(again), TrainConfig(epochs=4, batch_size=6, lr=0.05,
                                                           checkpoint_dir=str(tmp_path))).describe() \
        == "all 4 epochs restored from checkpoints (nothing trained)"
    data, scratch = regression_problem()
    assert train(scratch, data, mse_step(scratch), TrainConfig(epochs=1, batch_size=6, lr=0.05, resume=False,
                                                               checkpoint_dir=str(tmp_path))).describe() \
        == "trained 1 epoch"


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


def torch_reference_run(config: TrainConfig, data: list[dict], scheduler_factory) -> dict[str, torch.Tensor]:
    """The same run written with torch's optimiser and scheduler classes (one shuffling generator per epoch)."""
    _, parameters = regression_problem()
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters.values(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, betas=config.betas,
                                      weight_decay=config.weight_decay)
    scheduler = scheduler_factory(optimizer)
    step = mse_step(parameters)
    for epoch in range(1, config.epochs + 1):
        generator = torch.Generator().manual_seed(config.seed + epoch)
        for batch in torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=generator):
            optimizer.zero_grad()
            step(batch)["loss"].backward()
            optimizer.step()
            if config.schedule_unit == "iteration":
                scheduler.step()
        if config.schedule_unit == "epoch":
            scheduler.step()
    return parameters


def test_sgd_with_multistep_per_iteration_equals_torch_multisteplr() -> None:
    data, parameters = regression_problem()
    config = TrainConfig(epochs=3, batch_size=5, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-3,
                         schedule="multistep", schedule_unit="iteration", milestones=(3, 7), gamma=0.5)
    train(parameters, data, mse_step(parameters), config)
    expected = torch_reference_run(config, data, lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[3, 7], gamma=0.5))
    for name in parameters:
        assert torch.allclose(parameters[name], expected[name], atol=1e-6), name


def test_adamw_with_cosine_per_epoch_equals_torch_cosineannealinglr() -> None:
    data, parameters = regression_problem()
    config = TrainConfig(epochs=4, batch_size=10, lr=0.05, optimizer="adamw", weight_decay=0.01, schedule="cosine")
    train(parameters, data, mse_step(parameters), config)
    expected = torch_reference_run(config, data, lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=4))
    for name in parameters:
        assert torch.allclose(parameters[name], expected[name], atol=1e-6), name


def test_learning_rate_of_warmup_then_cosine_and_of_multistep() -> None:
    config = TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=2, warmup_lr=1e-4)
    assert [learning_rate(config, epoch, 0) for epoch in (0, 1)] == [1e-4, 1e-4]
    assert learning_rate(config, 2, 0) == pytest.approx(0.1)  # the cosine starts after the warm-up
    assert learning_rate(config, 7, 0) == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 10)))
    steps = TrainConfig(lr=1.0, schedule="multistep", milestones=(2, 4), gamma=0.1, schedule_unit="iteration")
    assert [learning_rate(steps, 0, i) for i in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="rmsprop")


def test_resumed_sgd_run_with_a_continuous_shuffling_stream_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    base = dict(batch_size=6, lr=0.05, optimizer="sgd", schedule="multistep", milestones=(5,),
                schedule_unit="iteration", shuffle_stream="continuous")
    data, straight = regression_problem()
    train(straight, data, mse_step(straight), TrainConfig(epochs=4, **base))
    data, first = regression_problem()
    train(first, data, mse_step(first), TrainConfig(epochs=2, checkpoint_dir=str(tmp_path), **base))
    data, resumed = regression_problem()
    result = train(resumed, data, mse_step(resumed), TrainConfig(epochs=4, checkpoint_dir=str(tmp_path), **base))
    assert result.resumed_from == 2
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    one_stream = torch.Generator().manual_seed(111)  # the continuous stream is one generator seeded once
    orders = [[int(i) for batch in torch.utils.data.DataLoader(range(20), batch_size=6, shuffle=True,
                                                              generator=one_stream) for i in batch]
              for _ in range(2)]
    assert orders[0] != orders[1]


def test_the_epoch_hook_runs_before_each_epoch_with_its_number() -> None:
    data, parameters = regression_problem()
    calls = []
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=3, batch_size=10), on_epoch_start=calls.append)
    assert calls == [1, 2, 3]


def test_a_checkpoint_of_other_training_code_is_not_resumed(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    config = TrainConfig(epochs=1, checkpoint_dir=str(tmp_path))
    train(parameters, data, mse_step(parameters), config, fingerprint={"code": code_digest("zsadkit.recipes.vand")})
    with pytest.raises(CheckpointMismatchError, match="code"):
        train(parameters, data, mse_step(parameters), replace(config, epochs=2),
              fingerprint={"code": code_digest("zsadkit.recipes.anomalyclip")})
    assert code_digest("zsadkit.recipes.vand") == code_digest("zsadkit.recipes.vand")


def test_code_digest_follows_the_source_and_the_version(monkeypatch) -> None:
    import zsadkit

    before = code_digest("zsadkit.recipes.vand")
    monkeypatch.setattr(zsadkit, "__version__", zsadkit.__version__ + ".dev1")
    assert code_digest("zsadkit.recipes.vand") != before
    monkeypatch.undo()
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda module: real(module) + ("# edited" if module.__name__ ==
                                                                               "zsadkit.losses" else ""))
    assert code_digest("zsadkit.recipes.vand") != before


def test_training_without_resume_replaces_the_folders_old_checkpoints(tmp_path: Path) -> None:
    data, parameters = regression_problem()
    train(parameters, data, mse_step(parameters), TrainConfig(epochs=3, checkpoint_dir=str(tmp_path)))
    data, parameters = regression_problem()
    result = train(parameters, data, mse_step(parameters), TrainConfig(epochs=1, checkpoint_dir=str(tmp_path),
                                                                       resume=False))
    assert result.resumed_from == 0
    assert sorted(p.name for p in tmp_path.glob("epoch_*.safetensors")) == ["epoch_001.safetensors"]


def test_the_batch_order_and_results_do_not_depend_on_the_progress_bar() -> None:
    results = []
    for progress in (False, True):
        data, parameters = regression_problem()
        log = train(parameters, data, mse_step(parameters), TrainConfig(epochs=2, batch_size=6), progress=progress).log
        results.append(([row["loss"] for row in log], {k: v.detach().clone() for k, v in parameters.items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][name], results[1][1][name]) for name in results[0][1])
    # and equal a plain torch loop over the same per-epoch generators (no extra draw from the shuffling generator)
    expected = torch_reference_run(TrainConfig(epochs=2, batch_size=6, optimizer="adamw", weight_decay=0.0,
                                               betas=(0.5, 0.999)), regression_problem()[0],
                                   lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    assert all(torch.allclose(results[1][1][name], expected[name], atol=1e-6) for name in expected)
