import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.errors import VildError
from vild_pipe.pipeline import teacher_fitting
from vild_pipe.pipeline.checkpoint import load_checkpoint
from vild_pipe.pipeline.shards import sha256_file
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher
from vild_pipe.pipeline.teacher_fitting import CaptionCropSampler, fit_small_clip
from vild_pipe.stages import fit_teacher, make_synthetic

from child_processes import child_env

TINY = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                       transformer_width=64, transformer_layers=1)
RESUMED = dict(steps=8, batch_size=16, model=TINY)   # the fit the resume tests stop and rerun

# The CLI in a child process with the TINY model and a slow step (the fit's result is unchanged), so a signal
# sent after the first checkpoint reaches it mid-fit.
CLI_DRIVER = '''
import functools, sys, time
from vild_pipe import cli
from vild_pipe.pipeline import teacher_fitting
from vild_pipe.pipeline.teacher import SmallClipConfig
from vild_pipe.stages import fit_teacher
fit_teacher.run = functools.partial(fit_teacher.run, model=SmallClipConfig(**{model}))
loss = teacher_fitting.multi_positive_clip_loss
teacher_fitting.multi_positive_clip_loss = lambda *args: (time.sleep(0.5), loss(*args))[1]
cli.main(sys.argv[1:])
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_synthetic.run(out, seed=1, train_images=8, val_images=4, image_size=96, workers=1)
    return out


def test_fit_teacher_writes_a_file_clip_load_reads_and_a_report(world, tmp_path):
    out = tmp_path / "teacher.pt"
    report = fit_teacher.run(world, out, steps=4, batch_size=16, model=TINY)
    teacher = load_teacher(str(out))
    assert teacher.embed_dim == 32 and teacher.identity["sha256"] == report["teacher"]["sha256"]
    saved = json.loads((tmp_path / "teacher.json").read_text())
    accuracy = saved["val_crop_accuracy"]
    assert accuracy["crops"] == accuracy["base_crops"] + accuracy["novel_crops"] > 0
    assert all(0.0 <= accuracy[crop]["base"] <= 1.0 for crop in ("1x", "1.5x", "1x+1.5x"))

    before = out.stat().st_mtime_ns
    assert fit_teacher.run(world, out, steps=4, batch_size=16, model=TINY) == saved  # rerun: nothing to do
    assert out.stat().st_mtime_ns == before
    with pytest.raises(VildError, match="teacher.pt: a teacher fitted with another config"):
        fit_teacher.run(world, out, steps=5, batch_size=16, model=TINY)


def test_caption_crops_cover_every_category_novel_included(world):
    train = CocoDataset.load(world / "train.json")
    sampler = CaptionCropSampler(train, 32)
    crops, labels = sampler.sample(64, np.random.default_rng(0))
    assert crops.shape == (64, 3, 32, 32) and str(crops.dtype) == "torch.uint8"
    novel = {train.category_index(c.id) for c in train.categories if c.split == "novel"}
    assert novel & {label for _, _, label in sampler.objects}, "novel objects must reach the teacher"


def test_fitting_lowers_the_contrastive_loss(world):
    train = CocoDataset.load(world / "train.json")
    losses = fit_small_clip(TINY.build(), CaptionCropSampler(train, 32), train.category_names, steps=40,
                            batch_size=32, lr=3e-3, seed=0, text_warmup_steps=10)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1


def test_the_same_config_fits_the_same_teacher_bit_for_bit(world, tmp_path):
    """The seed decides the initial weights too (they were drawn before seeding, so runs differed by points)."""
    torch.manual_seed(12345)  # whatever the global generator holds must not matter
    first = fit_teacher.run(world, tmp_path / "a" / "teacher.pt", steps=3, batch_size=16, model=TINY)
    torch.rand(7)
    second = fit_teacher.run(world, tmp_path / "b" / "teacher.pt", steps=3, batch_size=16, model=TINY)
    assert first["teacher"]["sha256"] == second["teacher"]["sha256"]
    assert first["val_crop_accuracy"] == second["val_crop_accuracy"]


def test_a_file_fit_teacher_did_not_write_is_refused_and_a_stopped_fit_is_redone(world, tmp_path, monkeypatch):
    """A user's own CLIP file at --out is never replaced without --overwrite; a fit stopped between saving the
    teacher and writing its report (its report says only the config) is fitted again by the same command."""
    out = tmp_path / "teacher.pt"
    out.write_bytes(b"a user's CLIP weights")
    with pytest.raises(VildError, match="teacher.pt: a file is already there, with no fit-teacher report"):
        fit_teacher.run(world, out, steps=3, batch_size=16, model=TINY)
    assert out.read_bytes() == b"a user's CLIP weights"
    (tmp_path / "teacher.json").write_text("not json")
    with pytest.raises(VildError, match="teacher.json: not a fit-teacher report"):
        fit_teacher.run(world, out, steps=3, batch_size=16, model=TINY)
    assert out.read_bytes() == b"a user's CLIP weights"

    out.unlink()
    (tmp_path / "teacher.json").unlink()
    monkeypatch.setattr(fit_teacher, "crop_accuracy", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        fit_teacher.run(world, out, steps=3, batch_size=16, model=TINY)
    assert out.exists() and "teacher" not in json.loads((tmp_path / "teacher.json").read_text())
    monkeypatch.undo()
    report = fit_teacher.run(world, out, steps=3, batch_size=16, model=TINY)
    expected = fit_teacher.run(world, tmp_path / "uninterrupted" / "teacher.pt", steps=3, batch_size=16, model=TINY)
    assert report["teacher"]["sha256"] == expected["teacher"]["sha256"]


def teacher_and_report(out, report):
    """What a fit must reproduce: the teacher file's bytes and every number of its report but the time taken."""
    return sha256_file(out), {key: value for key, value in report.items() if key != "seconds"}


@pytest.fixture(scope="module")
def uninterrupted(one_torch_thread, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "teacher.pt"
    return teacher_and_report(out, fit_teacher.run(world, out, **RESUMED))


def interrupt_at_step(monkeypatch, step):
    """Make the joint step number `step` (1-based) raise KeyboardInterrupt, as a kill there would end it."""
    loss, calls = teacher_fitting.multi_positive_clip_loss, []

    def loss_until_interrupted(*args):
        calls.append(None)
        if len(calls) == step:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(teacher_fitting, "multi_positive_clip_loss", loss_until_interrupted)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_fit_killed_part_way_resumes_to_the_teacher_and_report_of_an_uninterrupted_fit(world, uninterrupted,
                                                                                        tmp_path, monkeypatch, caplog):
    out, checkpoint = tmp_path / "teacher.pt", tmp_path / "teacher.fitting.pt"
    interrupt_at_step(monkeypatch, 6)
    # The stopped fit's clock runs 1000 s ahead: its checkpoint says it took over 1000 s.
    monkeypatch.setattr(teacher_fitting, "time", SimpleNamespace(time=lambda: time.time() + 1000))
    with pytest.raises(KeyboardInterrupt):
        fit_teacher.run(world, out, checkpoint_every=2, **RESUMED)
    monkeypatch.undo()
    stopped = load_checkpoint(checkpoint)
    assert stopped["step"] == 4 and not out.exists() and stopped["extra"]["seconds"] > 1000
    with caplog.at_level(logging.INFO, logger="vild_pipe"):
        resumed_at = time.time()
        report = fit_teacher.run(world, out, checkpoint_every=2, **RESUMED)
        resumed_for = time.time() - resumed_at
    assert f"resuming from {checkpoint} at step 4" in caplog.text
    assert teacher_and_report(out, report) == uninterrupted
    # The report counts the stopped fit's seconds and the resumed part's.
    assert stopped["extra"]["seconds"] < report["seconds"] <= stopped["extra"]["seconds"] + resumed_for + 0.1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teacher.json", "teacher.pt"]


@pytest.mark.usefixtures("one_torch_thread")
def test_sigterm_saves_the_fit_exits_2_with_one_line_and_the_rerun_ends_as_an_uninterrupted_fit(world, uninterrupted,
                                                                                               tmp_path):
    out, checkpoint = tmp_path / "teacher.pt", tmp_path / "teacher.fitting.pt"
    script = tmp_path / "driver.py"
    script.write_text(CLI_DRIVER.format(model=dataclasses.asdict(TINY)))
    command = [sys.executable, str(script), "fit-teacher", str(world), "--out", str(out), "--steps", "8",
               "--batch-size", "16", "--checkpoint-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=child_env(), start_new_session=True)
    deadline = time.monotonic() + 60
    while not checkpoint.is_file():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no first checkpoint within 60 s"
        time.sleep(0.01)
    try:  # the same command started again while the fit runs is refused, its files left to the fit
        with pytest.raises(VildError) as refused:
            fit_teacher.run(world, out, checkpoint_every=1, **RESUMED)
        assert str(refused.value).startswith(f"{out}: pid {process.pid} on ")
        assert "is fitting this teacher; wait for it to end or stop it" in str(refused.value)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    step = load_checkpoint(checkpoint)["step"]
    assert 1 <= step < 8 and not out.exists() and not fit_teacher.lock_path(out).exists()
    expected = (f"error: {checkpoint}: stopped by SIGTERM after step {step} and saved; rerun the same command to "
                "resume")
    assert [line for line in output.splitlines() if "error" in line or "stopped" in line] == [expected], output

    report = fit_teacher.run(world, out, checkpoint_every=1, **RESUMED)
    assert teacher_and_report(out, report) == uninterrupted and not checkpoint.exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_stopped_fit_of_another_config_is_refused_not_resumed_and_overwrite_starts_over(world, uninterrupted,
                                                                                         tmp_path, monkeypatch):
    out, checkpoint = tmp_path / "teacher.pt", tmp_path / "teacher.fitting.pt"
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        fit_teacher.run(world, out, checkpoint_every=1, **{**RESUMED, "steps": 9})
    monkeypatch.undo()
    with pytest.raises(VildError, match=r"teacher.fitting.pt: a stopped fit with another config \(steps: 9 -> 8\);"
                                        " rerun its command to finish it, or give --overwrite to start this one over"):
        fit_teacher.run(world, out, **RESUMED)
    assert load_checkpoint(checkpoint)["step"] == 2
    assert json.loads((tmp_path / "teacher.json").read_text())["config"]["steps"] == 9

    report = fit_teacher.run(world, out, overwrite=True, **RESUMED)
    assert teacher_and_report(out, report) == uninterrupted and not checkpoint.exists()


def test_a_teacher_fitted_on_another_world_is_refused_not_taken(world, tmp_path):
    """The world regenerated under a fitted teacher: its report's accuracy and its weights belong to the old one."""
    regenerated = tmp_path / "world"
    make_synthetic.run(regenerated, seed=1, train_images=8, val_images=4, image_size=96, workers=1)
    out = regenerated / "teacher.pt"
    fit_teacher.run(regenerated, out, steps=3, batch_size=16, model=TINY)
    make_synthetic.run(regenerated, seed=2, train_images=8, val_images=4, image_size=96, workers=1, overwrite=True)
    report_before = (regenerated / "teacher.json").read_text()
    with pytest.raises(VildError, match=r"teacher.pt: a teacher fitted with another config is already there \("
                                        r"data.train_sha256: \w+ -> \w+; data.val_sha256"):
        fit_teacher.run(regenerated, out, steps=3, batch_size=16, model=TINY)
    assert (regenerated / "teacher.json").read_text() == report_before

    # A report written before reports named the world is taken as it is (its demo folder resumes).
    report = json.loads(report_before)
    del report["config"]["data"], report["config"]["split"]
    (regenerated / "teacher.json").write_text(json.dumps(report))
    assert fit_teacher.run(regenerated, out, steps=3, batch_size=16, model=TINY)["teacher"] == report["teacher"]


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "--steps must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"lr": -1.0}, "--lr must be positive, got -1.0"),
    ({"threads": -1}, "--threads must be at least 0, got -1"),
    ({"split": "coco48-17"}, "val.json: category split 'coco48-17' needs"),
], ids=["steps-0", "batch-size-0", "lr-negative", "threads-negative", "split-not-of-the-world"])
def test_impossible_options_are_one_line_and_leave_a_fitted_teacher_as_it_was(world, tmp_path, options, message):
    out = tmp_path / "teacher.pt"
    fit_teacher.run(world, out, steps=3, batch_size=16, model=TINY)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(VildError) as raised:
        fit_teacher.run(world, out, **{"steps": 3, "batch_size": 16, "model": TINY, **options}, overwrite=True)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
