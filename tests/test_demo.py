"""The demo's StageBeside: a stage in a spawned process beside the main one gives back its value or its one-line
error, and leaving its block ends it. (The whole demo runs in tests/test_cli.py's quick-demo test.)"""
import operator
import time

import pytest
import torch

from vild_pipe.errors import DataError, VildError
from vild_pipe.stages import demo, fit_teacher


def test_a_stage_beside_gives_back_its_value_and_its_error_as_one_line(tmp_path):
    with demo.StageBeside("adding", operator.add, 2, 3) as job:
        assert job.result() == 5 and job.seconds >= 0
    missing = tmp_path / "no-world"
    with pytest.raises(DataError) as expected:
        fit_teacher.run(missing, tmp_path / "teacher.pt")
    with demo.StageBeside("fit-teacher", fit_teacher.run, missing, tmp_path / "teacher.pt") as job:
        with pytest.raises(VildError) as raised:
            job.result()
    assert str(raised.value) == str(expected.value) and "\n" not in str(raised.value)


def test_leaving_the_block_ends_a_stage_still_running():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the main stage failed"):
        with demo.StageBeside("sleeping", time.sleep, 120) as job:
            raise RuntimeError("the main stage failed")
    assert not job._process.is_alive() and time.monotonic() - started < 60


def test_the_demo_gives_torch_its_threads_back_when_train_rpn_fails(tmp_path, monkeypatch):
    def failing_train_rpn(*args, threads=0, **kwargs):
        torch.set_num_threads(threads)
        raise VildError("train-rpn failed")

    monkeypatch.setattr(demo.train_rpn, "run", failing_train_rpn)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with pytest.raises(VildError, match="train-rpn failed"):
            demo.run(tmp_path / "demo", quick=True)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
