"""``training.distributed``: one process changes nothing; under FSDP the states a checkpoint
holds are gathered whole, in one process's form.

accelerate shards with FSDP only on GPUs, so the FSDP test shards with torch's own
``fully_shard`` (what accelerate's FSDP2 calls) over 2 CPU processes (gloo) and checks what
this module adds: the full trainable state and the index-keyed optimizer state on rank 0,
equal to those of the same model trained in one process, and that such a state loads back
into the shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.checkpoint import trainable_state
from training.distributed import (
    Processes,
    exit_without_teardown,
    index_keyed,
    name_keyed,
    trainable_names,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model[0].bias.requires_grad_(False)  # a frozen parameter: never in the states
    return model


def _train(model: torch.nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _hyperparameters(state: dict) -> list[dict]:
    # torch's distributed-checkpoint loader hands betas back as a list (AdamW takes either)
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
            for group in state["param_groups"]]


def _same_optimizer_state(a: dict, b: dict) -> None:
    assert _hyperparameters(a) == _hyperparameters(b)
    assert sorted(a["state"]) == sorted(b["state"])
    for index, entry in a["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(b["state"][index][key]))


def _fsdp_rank(rank: int, world: int, init_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        reference = _model()
        reference_optimizer = _train(reference)
        sharded = _model()
        for layer in (sharded[0], sharded[2], sharded[4]):
            fully_shard(layer)
        fully_shard(sharded)
        optimizer = _train(sharded)  # every rank the same batch: FSDP's mean is that gradient
        processes = Processes(strategy="fsdp")
        assert processes.distributed and processes.rank == rank

        state = processes.trainable_state(sharded)
        saved = processes.optimizer_state(sharded, optimizer)
        if rank == 0:
            expected = trainable_state(reference)
            assert sorted(state) == sorted(expected) and "0.bias" not in state
            for name, tensor in expected.items():
                assert not hasattr(state[name], "placements"), "a full tensor, not a shard"
                torch.testing.assert_close(state[name], tensor)
            _same_optimizer_state(saved, reference_optimizer.state_dict())
        else:
            assert state == {} and saved == {}

        # a full, index-keyed state (a checkpoint's) loads into a fresh sharded model
        fresh = _model()
        for layer in (fresh[0], fresh[2], fresh[4]):
            fully_shard(layer)
        fully_shard(fresh)
        fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad],
                                            lr=1e-2)
        processes.load_optimizer_state(fresh, fresh_optimizer, reference_optimizer.state_dict())
        again = processes.optimizer_state(fresh, fresh_optimizer)
        if rank == 0:
            _same_optimizer_state(again, reference_optimizer.state_dict())
        dist.barrier()  # no rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    # as a launched rank ends (training.launch.run_rank): past this point torch 2.13's gloo
    # teardown aborted one rank in 1 of 25 runs of this test (SIGABRT, "terminate called
    # without an active exception"); an assertion above still fails the rank the usual way
    exit_without_teardown(0)


def test_fsdp_states_are_gathered_whole_in_one_process_form(tmp_path: Path) -> None:
    mp.spawn(_fsdp_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_one_process_is_the_plain_training_loop() -> None:
    processes = Processes.single()
    assert (processes.rank, processes.world_size, processes.distributed) == (0, 1, False)
    assert processes.device is None and processes.shard([3, 1, 2]) == [3, 1, 2]
    assert processes.share_weight(8, 8) == 1.0
    assert processes.main_decides(True) and not processes.main_decides(False)
    assert processes.sum({"loss": 0.5}) == {"loss": 0.5} and processes.gather(7) == [7]
    model = _model()
    optimizer = _train(model, steps=1)
    module, same = processes.prepare(model, optimizer)
    assert module is model and same is optimizer
    assert processes.full_model_state(model) is None
    assert processes.optimizer_state(model, optimizer) == optimizer.state_dict()


def test_optimizer_states_convert_between_indices_and_names() -> None:
    model = _model()
    optimizer = _train(model, steps=1)
    names = trainable_names(model)
    assert names == ["0.weight", "2.weight", "2.bias", "4.weight", "4.bias"]
    state = optimizer.state_dict()
    by_name = name_keyed(state, names)
    assert sorted(by_name["state"]) == sorted(names)
    assert by_name["param_groups"][0]["params"] == names
    _same_optimizer_state(index_keyed(by_name, names), state)
