"""Device choice, seeding, shard assignment, and the property the training stages rest on: DDP over W ranks,
each on its slice of the global batch, trains the same weights as one process on the whole batch."""
import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from vild_pipe.errors import VildError
from vild_pipe.pipeline.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    gather_objects,
    init_distributed,
    is_main,
    pick_device,
    seed_everything,
    unwrap_model,
    wrap_ddp,
)

from child_processes import free_port

# Run under torchrun with 2 CPU ranks; the test also imports it to train the single-process reference.
DDP_SCRIPT = '''
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from vild_pipe.pipeline.checkpoint import (
    CHECKPOINT_NAME, GracefulStop, StepSampler, TrainingStopped, resume_or_start, save_training_state,
)
from vild_pipe.pipeline.distributed import (
    all_reduce_mean, any_rank, cleanup_distributed, gather_objects, init_distributed, is_main,
    seed_everything, unwrap_model, wrap_ddp,
)

SEED = 3
STEPS = 12
GLOBAL_BATCH = 8
N_SAMPLES = 20


def train(info, dropout, run_dir=None, sigterm_rank_1_at=None):
    config = {"seed": SEED, "dropout": dropout, "steps": STEPS, "global_batch": GLOBAL_BATCH}
    seed_everything(SEED, info.rank)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    data = torch.Generator().manual_seed(99)
    inputs, targets = torch.randn(N_SAMPLES, 4, generator=data), torch.randn(N_SAMPLES, 2, generator=data)
    sampler = StepSampler(N_SAMPLES, GLOBAL_BATCH, SEED, info.rank, info.world_size)

    with GracefulStop() as stop:
        step = resume_or_start(run_dir, config, model, optimizer, scheduler) if run_dir else 0
        model = wrap_ddp(model, info)
        while step < STEPS:
            batch = torch.from_numpy(sampler.indices(step))
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == sigterm_rank_1_at and info.rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            stopping = stop.requested_on_any_rank(info.device)
            if run_dir and (stopping or step % 5 == 0):
                save_training_state(run_dir, step, config, model, optimizer, scheduler)
            if stopping:
                raise TrainingStopped(stop.signal_name, step, Path(run_dir) / CHECKPOINT_NAME)
    return unwrap_model(model)


def main(out):
    info = init_distributed("cpu")
    collectives = {
        "mean": all_reduce_mean(torch.tensor([float(info.rank)])).item(),
        "any_rank": any_rank(info.rank == 1),
        "gathered": gather_objects(info.rank),
        "world_size": info.world_size,
        "backend": torch.distributed.get_backend(),
    }
    no_dropout = train(info, dropout=0.0).state_dict()
    uninterrupted = train(info, dropout=0.3).state_dict()
    stopped_at = None
    try:
        train(info, dropout=0.3, run_dir=out / "run", sigterm_rank_1_at=7)
    except TrainingStopped as err:
        stopped_at = err.step
    saved_step = torch.load(out / "run" / CHECKPOINT_NAME, weights_only=True)["step"]
    resumed = train(info, dropout=0.3, run_dir=out / "run").state_dict()
    results = {"collectives": collectives, "stopped_at": stopped_at, "saved_step": saved_step,
               "no_dropout": no_dropout, "uninterrupted": uninterrupted, "resumed": resumed}
    torch.save(results, out / f"rank{info.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(VildError, match="--device cuda: no CUDA device is available") as caught:
        pick_device("cuda")
    assert "\n" not in str(caught.value)
    with pytest.raises(VildError, match="not a device name"):
        pick_device("gpu7")


def test_pick_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


def test_single_process_without_torchrun_environment(no_torchrun_env):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False, device=torch.device("cpu"))
    assert is_main(info) and is_main()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model and unwrap_model(model) is model
    value = torch.tensor([1.5, 2.5])
    reduced = all_reduce_mean(value)
    assert torch.equal(reduced, value) and reduced is not value
    assert gather_objects(5) == [5]
    assert any_rank(True) and not any_rank(False)


def test_seed_everything_repeats_draws_and_separates_ranks():
    def draws():
        return np.random.rand(), torch.rand(1).item(), __import__("random").random()

    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first
    seed_everything(11, rank=1)
    assert all(a != b for a, b in zip(draws(), first))


def test_torchrun_ddp_matches_one_process_and_resumes_exactly(tmp_path, no_torchrun_env):
    script = tmp_path / "ddp_tiny.py"
    script.write_text(DDP_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session so a hang (ranks out of step in a collective) can be killed whole: the ranks catch SIGTERM.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun hung for 90 s:\n{output}")
    assert process.returncode == 0, output
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    collectives = ranks[1]["collectives"]
    assert collectives["world_size"] == 2 and collectives["backend"] == "gloo"
    assert collectives["mean"] == 0.5
    assert collectives["any_rank"] is True
    assert collectives["gathered"] == [0, 1]

    spec = importlib.util.spec_from_file_location("ddp_tiny", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.train(init_distributed("cpu"), dropout=0.0).state_dict()
    for name, expected in single.items():
        for rank in ranks:
            torch.testing.assert_close(rank["no_dropout"][name], expected, rtol=0, atol=1e-6)

    # SIGTERM on rank 1 only: both ranks stop at the same step, rank 0 saves, and the rerun ends where an
    # uninterrupted run ends (each rank's dropout stream restored from the checkpoint).
    assert ranks[0]["stopped_at"] == ranks[1]["stopped_at"] == ranks[0]["saved_step"] == 7
    for rank in ranks:
        for name, expected in ranks[0]["uninterrupted"].items():
            assert torch.equal(rank["resumed"][name], expected), name
