import json

import numpy as np
import pytest
import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.errors import VildError
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher
from vild_pipe.pipeline.teacher_fitting import CaptionCropSampler, fit_small_clip
from vild_pipe.stages import fit_teacher, make_synthetic

TINY = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                       transformer_width=64, transformer_layers=1)


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
