"""embed-text: ViLD prompt ensemble with a tiny CLIP, reuse for the same model and names, clear name errors."""
import json

import pytest
import torch

from vild_pipe.errors import VildError
from vild_pipe.pipeline import teacher as teacher_module
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher, save_clip
from vild_pipe.pipeline.text_embeddings import embed_text, load_text_embeddings, vocabulary_names
from vild_pipe.stages import embed_text as embed_text_stage

TINY = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                       transformer_width=64, transformer_layers=1)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    save_clip(TINY.build(), folder / "a.pt")
    torch.manual_seed(1)
    save_clip(TINY.build(), folder / "b.pt")
    return folder / "a.pt", folder / "b.pt"


def test_embeddings_are_the_teachers_prompt_ensemble_with_its_identity(clip_files, tmp_path):
    names = ["circle", "hollow_square", "arrow"]
    result = embed_text(str(clip_files[0]), names, out=tmp_path / "text.pt")
    teacher = load_teacher(str(clip_files[0]))
    assert torch.allclose(result.embeddings, teacher.text_embeddings(names), atol=1e-6)
    saved = load_text_embeddings(tmp_path / "text.pt")
    assert saved.names == names and saved.clip == teacher.identity
    assert torch.equal(saved.embeddings, result.embeddings)
    assert torch.allclose(saved.embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_same_model_and_names_reuse_the_file_others_recompute(clip_files, tmp_path, monkeypatch):
    out = tmp_path / "text.pt"
    first = embed_text(str(clip_files[0]), ["circle", "star"], out=out)
    calls = []
    real_load = teacher_module.load_teacher
    monkeypatch.setattr(teacher_module, "load_teacher", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    again = embed_text(str(clip_files[0]), ["circle", "star"], out=out)
    assert calls == [] and torch.equal(again.embeddings, first.embeddings)
    other_names = embed_text(str(clip_files[0]), ["circle", "moon"], out=out)
    assert len(calls) == 1 and load_text_embeddings(out).names == ["circle", "moon"]
    assert torch.equal(other_names.embeddings[0], first.embeddings[0])
    other_model = embed_text(str(clip_files[1]), ["circle", "moon"], out=out)
    assert len(calls) == 2 and not torch.allclose(other_model.embeddings, other_names.embeddings)
    assert load_text_embeddings(out).clip["sha256"] != first.clip["sha256"]


@pytest.mark.parametrize("vocab, message", [("circle,,star", "empty category name"),
                                            ("circle,star,circle", "duplicate category name"),
                                            ("hollow_square,hollow square", "duplicate category name"),
                                            ("", "empty category name")])
def test_empty_or_duplicate_names_are_one_line_errors(vocab, message):
    with pytest.raises(VildError, match=message) as err:
        vocabulary_names(vocab=vocab)
    assert "\n" not in str(err.value)


def test_names_from_an_annotation_file_a_list_or_a_file(tmp_path):
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 2, "name": "star"}, {"id": 1, "name": "circle"}]}))
    assert vocabulary_names(annotations=annotations) == ["circle", "star"]
    assert vocabulary_names(vocab=" kite , zebra") == vocabulary_names(vocab="kite, zebra, ") == ["kite", "zebra"]
    names = tmp_path / "names.txt"
    names.write_text("# my names\nkite\n\nzebra\n")
    assert vocabulary_names(vocab_file=names) == ["kite", "zebra"]
    with pytest.raises(VildError) as caught:
        vocabulary_names(annotations=annotations, vocab="kite")
    assert str(caught.value) == ("give the category names one way: --annotations FILE, --vocab NAME,NAME,..."
                                 " or --vocab-file FILE")


def test_an_unreadable_vocabulary_file_is_named_once_with_the_reason(tmp_path):
    with pytest.raises(VildError) as caught:
        vocabulary_names(vocab_file=tmp_path / "absent.txt")
    assert str(caught.value) == (
        f"{tmp_path / 'absent.txt'}: cannot read the vocabulary file (no such file or directory)")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(VildError) as caught:
        vocabulary_names(vocab_file=latin1)
    assert str(caught.value) == (
        f"{latin1}: cannot read the vocabulary file (not UTF-8 text, invalid continuation byte at byte 3)")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcircle\r\nmoon\r\n# a comment\r\n\r\n\u661f\r\n".encode("utf-8"))
    assert vocabulary_names(vocab_file=bom) == ["circle", "moon", "\u661f"]   # the BOM is no part of "circle"


def test_stage_writes_the_file(clip_files, tmp_path):
    summary = embed_text_stage.run(tmp_path / "t.pt", str(clip_files[0]), vocab="kite,zebra", device="cpu")
    assert summary["names"] == 2 and summary["embed_dim"] == 32
    assert load_text_embeddings(tmp_path / "t.pt").names == ["kite", "zebra"]
