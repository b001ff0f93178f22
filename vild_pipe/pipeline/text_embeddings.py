"""Category names -> ViLD prompt-ensembled CLIP text embeddings, saved with the model identity and the names.

The embeddings are frozen (DESIGN.md §2), so they are computed once per (CLIP model, names, templates) and
reused: a saved file whose model, names and templates match is returned as is, anything else is recomputed.
The file is a plain torch dict (names, embeddings (K, D) float32, clip identity, templates hash), readable
with `torch.load(path, weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.prompts import clean_name, vild_templates
from vild_pipe.data.splits import read_name_file
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import load_checkpoint, save_checkpoint
from vild_pipe.pipeline.shards import sha256_file

log = logging.getLogger(__name__)

KIND = "vild-pipe text embeddings"


@dataclass
class TextEmbeddings:
    """One unit-length CLIP text embedding per name (row k is names[k]), and the CLIP model that made them."""

    names: list[str]
    embeddings: torch.Tensor
    clip: dict
    templates: str = ""

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        return save_checkpoint(path, {"kind": KIND, "names": list(self.names),
                                      "embeddings": self.embeddings.detach().float().cpu(),
                                      "clip": dict(self.clip), "templates": self.templates})


def templates_hash() -> str:
    """Identity of the prompt templates: other templates give other embeddings."""
    return hashlib.sha256("\n".join(vild_templates()).encode()).hexdigest()[:16]


def check_names(names: Sequence[str], where: str) -> list[str]:
    """The names as a list; VildError (one line) for an empty list, an empty name or two names that clean
    to the same text (they would get identical prompts, so identical embeddings)."""
    names = [str(name).strip() for name in names]
    if not names:
        raise VildError(f"{where}: no category names")
    empty = [position for position, name in enumerate(names) if not clean_name(name)]
    if empty:
        raise VildError(f"{where}: empty category name at position {empty[0] + 1} of {len(names)}")
    seen: dict[str, str] = {}
    for name in names:
        key = clean_name(name)
        if key in seen:
            same = f"{name!r}" if seen[key] == name else f"{seen[key]!r} and {name!r}"
            raise VildError(f"{where}: duplicate category name {same} (the same prompts after cleaning)")
        seen[key] = name
    return names


NAME_SOURCES = {"annotations": "--annotations FILE", "vocab": "--vocab NAME,NAME,...",
                "vocab_file": "--vocab-file FILE"}


def vocabulary_names(annotations: str | os.PathLike | None = None, vocab: str | None = None,
                     vocab_file: str | os.PathLike | None = None, offered: Sequence[str] = tuple(NAME_SOURCES)
                     ) -> list[str]:
    """Category names from exactly one source: an annotation file (all its categories, in id order), a
    comma-separated list (a comma at its end allowed), or a file with one name per line (blank lines and `#`
    comments skipped).
    `offered`: the sources (NAME_SOURCES keys) the caller's command has, which the message names."""
    given = [source for source in (annotations, vocab, vocab_file) if source is not None]
    if len(given) != 1:
        options = [NAME_SOURCES[source] for source in offered]
        listed = f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else "".join(options)
        raise VildError(f"give the category names one way: {listed}")
    if annotations is not None:
        return check_names(CocoDataset.load(annotations).category_names, os.fspath(annotations))
    if vocab is not None:
        pieces = vocab.split(",")
        return check_names(pieces[:-1] if len(pieces) > 1 and not pieces[-1].strip() else pieces, "--vocab")
    return check_names(read_name_file(vocab_file, "vocabulary file"), os.fspath(vocab_file))


def clip_file_identity(clip: str) -> dict:
    """The part of `Teacher.identity` known without loading the model: file name and sha256, or the model name."""
    if os.path.isfile(clip):
        return {"model": Path(clip).name, "sha256": sha256_file(clip)}
    return {"model": clip, "sha256": None}


def describe_clip(identity: dict) -> str:
    """A CLIP identity in a message: model name, the start of its sha256, and its embedding size when known."""
    dim = f", dim {identity['embed_dim']}" if identity.get("embed_dim") is not None else ""
    return f"{identity.get('model')} ({str(identity.get('sha256'))[:12]}{dim})"


def same_clip(a: dict, b: dict) -> bool:
    """Whether two identities name the same CLIP weights (a hash when there is one, else the model name)."""
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    return a.get("model") == b.get("model")


def load_text_embeddings(path: str | os.PathLike) -> TextEmbeddings:
    """The text embeddings saved by `embed_text` (DataError if the file is something else)."""
    state = load_checkpoint(path, remove_stale_tmp=False)
    if state is None:
        raise VildError(f"{path}: no such text-embeddings file; make one with vild-pipe embed-text")
    if state.get("kind") != KIND or not {"names", "embeddings", "clip"} <= state.keys():
        raise DataError(f"{path}: not a text-embeddings file written by vild-pipe embed-text")
    embeddings = state["embeddings"].float()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(state["names"]):
        raise DataError(f"{path}: {tuple(embeddings.shape)} embeddings for {len(state['names'])} names")
    return TextEmbeddings(list(state["names"]), embeddings, dict(state["clip"]), state.get("templates", ""))


def load_text_rows(path: str | os.PathLike, names: Sequence[str]) -> TextEmbeddings:
    """The embeddings of `names`, in that order, from an embed-text file that may hold more names."""
    loaded = load_text_embeddings(path)
    missing = [name for name in names if name not in loaded.names]
    if missing:
        raise DataError(f"{os.fspath(path)}: lacks the categories {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; rerun embed-text with them")
    rows = [loaded.names.index(name) for name in names]
    return TextEmbeddings(list(names), loaded.embeddings[rows], loaded.clip, loaded.templates)


def reusable_text_embeddings(out: str | os.PathLike, clip: str, names: Sequence[str]) -> TextEmbeddings | None:
    """The text embeddings in `out` if it was made by the CLIP model `clip` for exactly `names`, else None."""
    out = Path(out)
    if not out.is_file():
        return None
    try:
        saved = load_text_embeddings(out)
    except DataError as err:
        log.info("recomputing %s: %s", out, err)
        return None
    same_model = same_clip(saved.clip, clip_file_identity(clip))
    if saved.names == list(names) and same_model and saved.templates == templates_hash():
        return saved
    log.info("recomputing %s: it was made for other names, another CLIP model or other prompt templates", out)
    return None


def embed_text(clip: str, names: Sequence[str], out: str | os.PathLike | None = None,
               device: str = "cpu") -> TextEmbeddings:
    """Prompt-ensembled text embeddings of `names` with the CLIP model `clip` (file or name).

    With `out`, a file there made by the same model for the same names is reused; otherwise the embeddings
    are computed and written to `out` (temp file + rename).
    """
    names = check_names(names, os.fspath(out) if out is not None else "category names")
    if out is not None:
        reused = reusable_text_embeddings(out, clip, names)
        if reused is not None:
            log.info("text embeddings for %d names reused from %s", len(names), out)
            return reused
    from vild_pipe.pipeline.teacher import load_teacher   # imports clip: only when something is computed

    teacher = load_teacher(clip, device)
    result = TextEmbeddings(names, teacher.text_embeddings(names).float().cpu(), dict(teacher.identity),
                            templates_hash())
    if out is not None:
        result.save(out)
        log.info("wrote text embeddings of %d names (%s, dim %d) to %s", len(names), teacher.identity["model"],
                 result.embed_dim, out)
    return result
