"""The embedding cache's schema, and the rules that tie the caches to each other and to their annotation file.

An embedding cache (stage `cache-embeddings`) has the same shards as the proposal cache it was made from:
shard `shard-00012.h5` of both holds the same images, in the same order, with the same `row_start`, so row
r of one is the box of row r of the other. Its manifest names the proposal cache's fingerprint and the CLIP
model's identity (and, for messages only, where the proposal cache was); `open_cache_pair` refuses a pair that
does not belong together, and `annotations_of` an annotation file other than the one the proposal cache was
made from.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vild_pipe.data.coco import CocoDataset, read_annotation_json
from vild_pipe.errors import DataError
from vild_pipe.pipeline.proposals import PROPOSAL_NMS_THRESHOLD
from vild_pipe.pipeline.shards import CacheFolder, RowField, ShardReader, sha256_file
from vild_pipe.pipeline.text_embeddings import describe_clip, same_clip

STAGE = "cache-embeddings"
PROPOSAL_STAGE = "dump-proposals"

ENSEMBLE_FIELD = "emb"


def embedding_fields(dim: int, ensemble_only: bool = False) -> dict[str, RowField]:
    """The per-row datasets of an embedding shard; `ensemble_only` keeps just the ViLD-image target."""
    fields = {
        "emb_1x": RowField("float16", (dim,), "L2-normalised CLIP image embedding of the box's crop"),
        "emb_15x": RowField("float16", (dim,), "L2-normalised CLIP image embedding of the 1.5x box's crop"),
        ENSEMBLE_FIELD: RowField("float16", (dim,), "normalise(emb_1x + emb_15x): the ViLD-image target"),
    }
    return {ENSEMBLE_FIELD: fields[ENSEMBLE_FIELD]} if ensemble_only else fields


def image_embedding_rows(embeddings: np.ndarray, images: list[tuple[int, int]], fields) -> list[tuple[int, dict]]:
    """Split the embeddings of several images' crops (per image: its R 1x rows, then its R 1.5x rows; `images`
    lists (image id, R)) into each image's cache rows of `fields`, fp16."""
    out, offset = [], 0
    for image_id, num_boxes in images:
        one = torch.from_numpy(embeddings[offset:offset + num_boxes])
        enlarged = torch.from_numpy(embeddings[offset + num_boxes:offset + 2 * num_boxes])
        offset += 2 * num_boxes
        rows = {"emb_1x": one, "emb_15x": enlarged, ENSEMBLE_FIELD: F.normalize(one + enlarged, dim=-1)}
        out.append((image_id, {name: rows[name].numpy().astype(np.float16) for name in fields}))
    if offset != len(embeddings):
        raise RuntimeError(f"{len(embeddings)} embeddings for {offset} crops")
    return out


def embedding_dim(embeddings: CacheFolder) -> int:
    return int(embeddings.fields[ENSEMBLE_FIELD].shape[0])


def clip_identity(embeddings: CacheFolder) -> dict:
    """The CLIP model an embedding cache was computed with (`Teacher.identity`)."""
    return embeddings.inputs["clip"]


def check_text_clip(embeddings: CacheFolder | None, where: str, text_clip: dict, embed_dim: int | None = None) -> None:
    """DataError unless the text embeddings of `where` come from the CLIP model that embedded the cache's crops
    (and have its embedding size, when `embed_dim` is known): the two must share one space."""
    if embeddings is None:
        return
    image_clip = clip_identity(embeddings)
    if not same_clip(text_clip, image_clip) or embed_dim not in (None, embedding_dim(embeddings)):
        raise DataError(f"{where}: text embeddings are from CLIP {describe_clip(text_clip)}, the crop embeddings in"
                        f" {embeddings.path} from {describe_clip(image_clip)}; use one model")


def belongs_to(embeddings: CacheFolder, proposals: CacheFolder) -> bool:
    source = embeddings.inputs.get("proposals", {})
    return source.get("fingerprint") == proposals.fingerprint and embeddings.num_shards == proposals.num_shards


def open_cache_pair(
    proposals: str | os.PathLike, embeddings: str | os.PathLike, require_complete: bool = True
) -> tuple[CacheFolder, CacheFolder]:
    """The proposal cache and the embedding cache made from it; DataError if they do not belong together."""
    proposal_folder = CacheFolder.open(proposals, stage=PROPOSAL_STAGE)
    embedding_folder = CacheFolder.open(embeddings, stage=STAGE)
    if not belongs_to(embedding_folder, proposal_folder):
        raise DataError(
            f"{embedding_folder.path}: embedding cache was made from another proposal cache"
            f" ({_made_from(embedding_folder)}), not from {proposal_folder.path} (fingerprint"
            f" {proposal_folder.fingerprint}); rerun cache-embeddings on it"
        )
    if require_complete:
        proposal_folder.require_complete()
        embedding_folder.require_complete()
    return proposal_folder, embedding_folder


def check_same_rows(proposal_shard: ShardReader, embedding_shard: ShardReader) -> None:
    """DataError unless the two shards hold the same images with the same rows each: an embedding belongs to
    the box at its position, so a proposal shard rebuilt with other rows would hand boxes others' embeddings."""
    if not (np.array_equal(embedding_shard.image_ids, proposal_shard.image_ids)
            and np.array_equal(embedding_shard.row_start, proposal_shard.row_start)):
        raise DataError(f"{embedding_shard.path}: images or rows differ from {proposal_shard.path}; rebuild the"
                        " embedding cache")


def _made_from(embeddings: CacheFolder) -> str:
    """What the embedding cache records of its proposal cache: where it was (caches made before the path was
    kept record none) and its fingerprint."""
    known = [embeddings.manifest.get("sources", {}).get("proposals"),
             embeddings.inputs.get("proposals", {}).get("fingerprint")]
    if known[1] is not None:
        known[1] = f"fingerprint {known[1]}"
    return ", ".join(part for part in known if part) or "which one is not recorded"


def open_caches(proposals: str | os.PathLike, embeddings: str | os.PathLike | None
                ) -> tuple[CacheFolder, CacheFolder | None]:
    """The complete proposal cache, and the embedding cache made from it when `embeddings` is given."""
    if embeddings is not None:
        return open_cache_pair(proposals, embeddings)
    folder = CacheFolder.open(proposals, stage=PROPOSAL_STAGE)
    folder.require_complete()
    return folder, None


def training_proposal_cache(head_info: dict) -> CacheFolder | None:
    """The proposal cache a head was trained on, where the path train-head recorded (as typed, so relative to
    wherever it ran) still leads to that very cache (same fingerprint); None otherwise."""
    trained_on = head_info.get("proposals") or {}
    path = trained_on.get("path")
    if not path or not os.path.isfile(os.path.join(path, "manifest.json")):
        return None
    try:
        folder = CacheFolder.open(path, stage=PROPOSAL_STAGE)
    except DataError:
        return None
    return folder if folder.fingerprint == trained_on.get("fingerprint") else None


LEGACY_PROPOSAL_NMS = 0.5
"""dump-proposals' default before heads recorded the NMS of their training proposals."""


def training_proposal_nms(head_info: dict) -> float:
    """The class-agnostic NMS of the proposals a head was trained on: recorded in the head, else in its
    training cache's manifest where that is still found, else the default of the time (an older head)."""
    if "proposal_nms" in head_info:
        return float(head_info["proposal_nms"] or PROPOSAL_NMS_THRESHOLD)
    folder = training_proposal_cache(head_info)
    recorded = folder.config.get("nms_threshold") if folder is not None else None
    return float(recorded or LEGACY_PROPOSAL_NMS)


def training_detector(head_info: dict) -> dict:
    """The identity of the detector whose features a head was trained on: recorded in the head, else in its
    training cache's manifest where that is still found, else {} (unknown: an older head moved away)."""
    if head_info.get("detector"):
        return dict(head_info["detector"])
    folder = training_proposal_cache(head_info)
    return dict(folder.inputs.get("detector") or {}) if folder is not None else {}


def annotations_of(proposals: CacheFolder, annotations: str | os.PathLike,
                   images: str | os.PathLike | None = None) -> CocoDataset:
    """`annotations` loaded, once its sha256 shows it is the file the proposal cache was made from."""
    _check_made_from(proposals, annotations)
    return CocoDataset.load(annotations, images)


def annotation_json_of(proposals: CacheFolder, annotations: str | os.PathLike) -> Any:
    """The parsed JSON of `annotations`, once its sha256 shows it is the file the proposal cache was made from
    (for a caller that builds more than the dataset from it: `CocoDataset.load(parsed_json=)`)."""
    _check_made_from(proposals, annotations)
    return read_annotation_json(annotations)


def _check_made_from(proposals: CacheFolder, annotations: str | os.PathLike) -> None:
    made_from = proposals.inputs.get("annotations", {})
    if made_from.get("sha256") != sha256_file(annotations):
        raise DataError(
            f"{os.fspath(annotations)}: not the annotation file the proposal cache {proposals.path} was made from"
            f" (it was made from another annotation file, {made_from.get('file')},"
            f" sha256 {str(made_from.get('sha256'))[:12]}...)"
        )

