"""vild-pipe embed-text: category names -> ViLD prompt-ensembled CLIP text embeddings in one file.

The names come from an annotation file (all its categories, base and novel, in id order), a comma-separated
list or a file of names. The file keeps the names, the embeddings and the CLIP model's identity; rerunning
with the same model and names reuses it, anything else recomputes it. train-head takes it (--text) and
picks the base rows; the evaluation classifies over all of them.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from vild_pipe.pipeline.distributed import pick_device
from vild_pipe.pipeline.text_embeddings import embed_text, vocabulary_names

log = logging.getLogger(__name__)


def run(out: str | os.PathLike, clip: str, annotations: str | os.PathLike | None = None, vocab: str | None = None,
        vocab_file: str | os.PathLike | None = None, device: str = "auto") -> dict[str, Any]:
    """Write (or reuse) the text embeddings of the chosen names at `out`; returns a summary."""
    names = vocabulary_names(annotations, vocab, vocab_file)
    texts = embed_text(clip, names, out=out, device=str(pick_device(device)))
    summary = {"out": os.fspath(out), "names": len(texts.names), "embed_dim": texts.embed_dim,
               "clip": texts.clip}
    log.info("embed-text: %d names, dim %d, CLIP %s -> %s", len(texts.names), texts.embed_dim,
             texts.clip.get("model"), out)
    return summary
