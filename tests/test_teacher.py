
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip.model import convert_weights

from vild_pipe.data.prompts import prompt_texts
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.crops import centre_square_crop, clip_boxes, crop_box_pil, scale_boxes
from vild_pipe.pipeline.teacher import SmallClipConfig, encode_text_trimmed, load_teacher, save_clip, tokenize
from vild_pipe.pipeline.teacher_fitting import multi_positive_clip_loss

TINY = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                       transformer_width=64, transformer_layers=1)


@pytest.fixture(scope="module")
def tiny_teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    model = TINY.build().eval()
    model.requires_grad_(False)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    save_clip(model, path)
    return model, path


def test_saved_teacher_round_trips_through_clip_load(tiny_teacher_file):
    model, path = tiny_teacher_file
    teacher = load_teacher(str(path))
    assert teacher.identity["sha256"] and teacher.identity["embed_dim"] == 32
    assert teacher.input_resolution == 32
    pixels = torch.randn(3, 3, 32, 32)
    convert_weights(model)  # clip.load rounds weights through fp16, as for OpenAI's own checkpoints
    model.float()
    with torch.no_grad():
        expected = F.normalize(model.encode_image(pixels), dim=-1)
    assert torch.allclose(teacher.encode_images(pixels, batch_size=2), expected, atol=1e-5)
    with torch.no_grad():
        expected_text = F.normalize(model.encode_text(tokenize(["a kite", "a zebra"])), dim=-1)
    assert torch.allclose(teacher.encode_texts(["a kite", "a zebra"]), expected_text, atol=1e-5)


def test_a_vit_teacher_round_trips_too(tmp_path):
    config = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                             vision_patch_size=16, transformer_width=64, transformer_layers=1)
    save_clip(config.build(), tmp_path / "vit.pt")
    teacher = load_teacher(str(tmp_path / "vit.pt"))
    assert teacher.encode_images(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_prompt_ensemble_normalises_averages_normalises(tiny_teacher_file):
    _, path = tiny_teacher_file
    teacher = load_teacher(str(path))
    names = ["hollow_square", "apple"]
    got = teacher.text_embeddings(names)
    with torch.no_grad():
        manual = []
        for name in names:
            emb = teacher.model.encode_text(tokenize(prompt_texts(name)))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            manual.append(mean / mean.norm())
    assert torch.allclose(got, torch.stack(manual), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_loader_errors_are_one_line(tmp_path):
    with pytest.raises(VildError, match="not a file and not a CLIP model name"):
        load_teacher(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pt: not a loadable CLIP checkpoint"):
        load_teacher(str(bad))
    annotations = tmp_path / "annotations_va.json"
    annotations.write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(DataError) as caught:
        load_teacher(str(annotations))
    assert str(caught.value) == (f"{annotations}: not a loadable CLIP checkpoint"
                                 " (not a PyTorch file, it looks like JSON)")
    tensors = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(2)}, tensors)
    with pytest.raises(DataError) as caught:
        load_teacher(str(tensors))
    assert str(caught.value) == (f"{tensors}: not a CLIP model's weights (a PyTorch file without"
                                 " 'visual.layer1.0.conv1.weight'; a detector, head or text-embeddings file?)")


def test_one_point_five_box_geometry():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]])
    big = scale_boxes(boxes, 1.5)
    x1, y1, x2, y2 = boxes[0]
    assert np.allclose(big[0], [1.25 * x1 - 0.25 * x2, 1.25 * y1 - 0.25 * y2,
                                1.25 * x2 - 0.25 * x1, 1.25 * y2 - 0.25 * y1])
    assert np.allclose(clip_boxes(scale_boxes(np.array([[0.0, 0, 40, 40]]), 1.5), 50, 45), [[0, 0, 50, 45]])


def test_reference_crop_matches_clips_own_preprocess(tiny_teacher_file):
    _, path = tiny_teacher_file
    teacher = load_teacher(str(path))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    crop = crop_box_pil(image, [5.5, 7.2, 61.0, 30.9])
    ours = torch.from_numpy(np.array(centre_square_crop(crop, 32))).permute(2, 0, 1).float() / 255
    theirs = teacher.preprocess(crop)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    assert torch.allclose((ours - mean) / std, theirs, atol=1e-5)
    assert crop_box_pil(image, [10, 10, 10, 10]).size == (1, 1)  # zero-area box: one pixel, not an error


def test_multi_positive_loss_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    image_labels, text_labels = torch.tensor([0, 1, 0]), torch.tensor([0, 1])
    scale = 10.0
    logits = scale * image @ text.t()
    by_image = -(logits.log_softmax(1)[[0, 1, 2], [0, 1, 0]]).mean()
    col = logits.log_softmax(0)
    by_text = (-(col[0, 0] + col[2, 0]) / 2 - col[1, 1]) / 2
    expected = (by_image + by_text) / 2
    assert torch.allclose(multi_positive_clip_loss(image, text, image_labels, text_labels, scale), expected)


def test_trimmed_text_encoding_equals_clips_own(tiny_teacher_file):
    model, _ = tiny_teacher_file
    tokens = tokenize(["a kite", "There is an elephant in the scene.", "itap of a hollow square."])
    with torch.no_grad():
        assert torch.allclose(encode_text_trimmed(model, tokens), model.encode_text(tokens), atol=1e-5)
