"""Checkpoints are atomic, RNG state round-trips, and a killed-then-resumed run ends with the exact weights of
an uninterrupted one (in process, after SIGKILL, after SIGTERM)."""
import errno
import importlib.util
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline import checkpoint
from vild_pipe.pipeline.checkpoint import (
    CHECKPOINT_NAME,
    GracefulStop,
    StepSampler,
    epoch_permutation,
    load_checkpoint,
    resume_or_start,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)

# The loop the training stages follow, reduced to a small MLP. Written to a file so the very same function
# runs in this process and in subprocesses that the tests kill.
TRAIN_SCRIPT = '''
import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vild_pipe.errors import VildError
from vild_pipe.pipeline.checkpoint import (
    CHECKPOINT_NAME, GracefulStop, StepSampler, TrainingStopped, resume_or_start, save_training_state,
)
from vild_pipe.pipeline.distributed import seed_everything

SEED = 7
N_SAMPLES = 40
BATCH_SIZE = 6  # does not divide N_SAMPLES, so some batches span two epochs


class SimulatedCrash(Exception):
    pass


def train(run_dir, steps, checkpoint_every, crash_after=None, step_seconds=0.0):
    config = {"seed": SEED, "lr": 0.05, "momentum": 0.9, "batch_size": BATCH_SIZE, "steps": steps}
    seed_everything(SEED)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    data = torch.Generator().manual_seed(1234)
    inputs, targets = torch.randn(N_SAMPLES, 5, generator=data), torch.randn(N_SAMPLES, 1, generator=data)
    sampler = StepSampler(N_SAMPLES, BATCH_SIZE, SEED)

    with GracefulStop() as stop:
        step = resume_or_start(run_dir, config, model, optimizer, scheduler)
        while step < steps:
            batch = torch.from_numpy(sampler.indices(step))
            noise = torch.from_numpy(np.random.normal(0.0, 0.01, size=(len(batch), 5)).astype(np.float32))
            scale = 1.0 if random.random() < 0.5 else 0.5
            loss = nn.functional.mse_loss(model(inputs[batch] + noise) * scale, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            time.sleep(step_seconds)
            if stop.requested or step % checkpoint_every == 0 or step == steps:
                save_training_state(run_dir, step, config, model, optimizer, scheduler)
            if stop.requested:
                raise TrainingStopped(stop.signal_name, step, Path(run_dir) / CHECKPOINT_NAME)
            if step == crash_after:
                raise SimulatedCrash(step)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("weights_out")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    try:
        model = train(args.run_dir, args.steps, args.checkpoint_every, step_seconds=args.step_seconds)
    except VildError as err:  # what the CLI does with it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    torch.save(model.state_dict(), args.weights_out)
'''

STEPS = 30
CHECKPOINT_EVERY = 4


@pytest.fixture
def train_script(tmp_path):
    path = tmp_path / "train_tiny.py"
    path.write_text(TRAIN_SCRIPT)
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def uninterrupted_weights(train_script, tmp_path):
    return train_script.train(tmp_path / "uninterrupted", STEPS, checkpoint_every=STEPS).state_dict()


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), f"{name} differs"


def run_script(script_path, run_dir, weights_out, step_seconds=0.0, wait=True):
    command = [
        sys.executable, str(script_path), str(run_dir), str(weights_out),
        "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY), "--step-seconds", str(step_seconds),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"script ended before writing {path}: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- atomic save / load -------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(path, {"step": 3, "weights": torch.arange(5.0)})
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], torch.arange(5.0))
    assert list(path.parent.iterdir()) == [path]


def test_load_absent_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_write_failing_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})

    def save_half_then_fail(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(VildError) as caught:
        save_checkpoint(path, {"step": 2})
    assert str(caught.value) == f"{path}: cannot write checkpoint (no space left on device)"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(tmp_path.iterdir()) == [path]


def test_torch_writer_runtime_error_becomes_vild_error(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"

    def writer_fails(obj, handle, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file\nmore")

    monkeypatch.setattr(torch, "save", writer_fails)
    with pytest.raises(VildError, match="PytorchStreamWriter failed writing file") as caught:
        save_checkpoint(path, {"step": 2})
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_failing_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})

    def replace_fails(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(VildError, match=str(path)):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(tmp_path.iterdir()) == [path]


def test_stale_tmp_from_killed_save_is_removed_with_a_log_line(tmp_path, caplog):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 4})
    stale = tmp_path / "ck.pt.tmp"
    stale.write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level(logging.INFO, logger=checkpoint.__name__):
        assert load_checkpoint(path)["step"] == 4
    assert not stale.exists()
    assert [r.getMessage() for r in caplog.records if "ck.pt.tmp" in r.getMessage()]


CUT_ZIP = "truncated or corrupt: its zip directory is missing"


def test_truncated_checkpoint_is_a_data_error(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"weights": torch.randn(256, 256)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: not a readable checkpoint ({CUT_ZIP})"
    path.write_bytes(data[:4000])  # cut inside the first record: torch's reader fails with EINVAL, not a read error
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: not a readable checkpoint ({CUT_ZIP})"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_files_that_are_not_checkpoints_get_a_short_reason_without_torchs_advice(tmp_path):
    """torch's weights_only paragraphs never reach the user: the reason says what the file is instead."""
    def reason(path):
        with pytest.raises(DataError) as caught:
            load_checkpoint(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: not a readable checkpoint (") and "weights_only" not in message
        return message[len(f"{path}: not a readable checkpoint ("):-1]

    text = tmp_path / "notes.pt"
    text.write_bytes(b"this is not a checkpoint\n" * 10)
    assert reason(text) == "not a PyTorch file, it looks like text"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    assert reason(metrics) == "not a PyTorch file, it looks like JSON"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert reason(empty) == "empty file"
    binary = tmp_path / "noise.pt"
    binary.write_bytes(bytes(range(256)))
    assert reason(binary) == "not a PyTorch file"
    arrays = tmp_path / "arrays.pt"
    torch.save({"weights": np.zeros(3)}, arrays)  # loads only with weights_only=False, i.e. running pickled code
    assert reason(arrays).startswith("holds pickled Python objects besides tensors, e.g. numpy.")
    assert reason(arrays).endswith(", which vild-pipe does not load")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": {1, 2}}, protocol=4))
    assert reason(plain) == "holds pickled Python objects besides tensors, which vild-pipe does not load"


def test_checkpoint_that_is_not_a_dict_is_a_data_error(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(DataError, match="not a dict"):
        load_checkpoint(path)


# --- RNG state ------------------------------------------------------------------------------------------


def draw_from_every_rng():
    return random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.gauss(0, 1)  # leaves a cached second gaussian in python's state
    np.random.standard_normal()  # and in numpy's legacy state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": rng_state()})
    expected = draw_from_every_rng()
    assert draw_from_every_rng()[0] != expected[0]

    set_rng_state(torch.load(path, weights_only=True)["rng"])
    actual = draw_from_every_rng()
    assert actual[:2] == expected[:2]
    np.testing.assert_array_equal(actual[2], expected[2])
    assert actual[3] == expected[3]
    assert torch.equal(actual[4], expected[4])


# --- data order -----------------------------------------------------------------------------------------


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    np.random.seed(0)
    first = epoch_permutation(3, 5, 50)
    np.random.seed(1)
    assert np.array_equal(first, epoch_permutation(3, 5, 50))
    assert sorted(first.tolist()) == list(range(50))
    assert not np.array_equal(first, epoch_permutation(3, 6, 50))
    assert not np.array_equal(first, epoch_permutation(4, 5, 50))


def test_step_sampler_streams_whole_epochs_and_needs_no_iterator_state():
    sampler = StepSampler(n=10, global_batch_size=4, seed=2)
    stream = np.concatenate([sampler.global_indices(step) for step in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])
    fresh = StepSampler(n=10, global_batch_size=4, seed=2)
    assert np.array_equal(fresh.indices(3), sampler.global_indices(3))


def test_step_sampler_ranks_split_the_global_batch():
    one = StepSampler(n=13, global_batch_size=6, seed=1)
    ranks = [StepSampler(n=13, global_batch_size=6, seed=1, rank=r, world_size=3) for r in range(3)]
    for step in (0, 2, 7):
        assert np.array_equal(np.concatenate([r.indices(step) for r in ranks]), one.indices(step))
    with pytest.raises(VildError, match="multiple of the number of processes"):
        StepSampler(n=13, global_batch_size=5, seed=1, world_size=2)


# --- signals --------------------------------------------------------------------------------------------


def test_graceful_stop_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert stop.requested_on_any_rank()
    assert signal.getsignal(signal.SIGTERM) is before


# --- resuming -------------------------------------------------------------------------------------------


def test_resume_refuses_a_different_config_naming_the_keys(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(tmp_path, 5, {"lr": 0.1, "steps": 10, "data": {"root": "a"}}, model, optimizer)
    changed = {"lr": 0.2, "steps": 20, "data": {"root": "a"}}
    with pytest.raises(VildError, match=r"lr: 0\.1 -> 0\.2; steps: 10 -> 20") as caught:
        resume_or_start(tmp_path, changed, model, optimizer)
    assert "\n" not in str(caught.value) and "data.root" not in str(caught.value)
    assert resume_or_start(tmp_path, changed, model, optimizer, resumable_changes=["lr", "steps"]) == 5


def test_resume_refuses_a_scheduler_the_checkpoint_lacks(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(tmp_path, 1, {"lr": 0.1}, model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    with pytest.raises(VildError, match="lacks a scheduler state"):
        resume_or_start(tmp_path, {"lr": 0.1}, model, optimizer, scheduler)


def test_crashed_run_resumes_to_identical_weights(train_script, uninterrupted_weights, tmp_path, caplog):
    run_dir = tmp_path / "crashed"
    with pytest.raises(train_script.SimulatedCrash):
        train_script.train(run_dir, STEPS, CHECKPOINT_EVERY, crash_after=10)  # last checkpoint: step 8
    with caplog.at_level(logging.INFO, logger=checkpoint.__name__):
        resumed = train_script.train(run_dir, STEPS, CHECKPOINT_EVERY)
    assert any("at step 8" in r.getMessage() for r in caplog.records)
    assert_same_weights(resumed.state_dict(), uninterrupted_weights)


def test_resume_without_rng_restore_would_differ(train_script, uninterrupted_weights, tmp_path, monkeypatch):
    """Shows the equality above is earned: dropout and augmentation make the RNG state matter."""
    run_dir = tmp_path / "crashed"
    with pytest.raises(train_script.SimulatedCrash):
        train_script.train(run_dir, STEPS, CHECKPOINT_EVERY, crash_after=8)
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    resumed = train_script.train(run_dir, STEPS, CHECKPOINT_EVERY).state_dict()
    assert not all(torch.equal(resumed[name], uninterrupted_weights[name]) for name in resumed)


def test_sigkilled_process_reruns_to_identical_weights(train_script, uninterrupted_weights, tmp_path):
    run_dir, weights = tmp_path / "killed", tmp_path / "weights.pt"
    process = run_script(train_script.__file__, run_dir, weights, step_seconds=0.03, wait=False)
    wait_for(run_dir / CHECKPOINT_NAME, process)
    delay = random.uniform(0.0, 0.5)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"finished before the kill after {delay:.2f} s"
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] < STEPS

    rerun = run_script(train_script.__file__, run_dir, weights)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_weights(torch.load(weights, weights_only=True), uninterrupted_weights)


def test_sigterm_saves_exits_2_and_rerun_finishes_identically(train_script, uninterrupted_weights, tmp_path):
    run_dir, weights = tmp_path / "terminated", tmp_path / "weights.pt"
    process = run_script(train_script.__file__, run_dir, weights, step_seconds=0.03, wait=False)
    wait_for(run_dir / CHECKPOINT_NAME, process)
    time.sleep(random.uniform(0.0, 0.3))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2, stderr
    assert "stopped by SIGTERM after step" in stderr and "rerun the same command to resume" in stderr
    stopped_at = int(stderr.split("after step ")[1].split()[0])
    assert 0 < stopped_at < STEPS
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == stopped_at
    assert not weights.exists()

    rerun = run_script(train_script.__file__, run_dir, weights)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_weights(torch.load(weights, weights_only=True), uninterrupted_weights)
