"""vild-pipe cache-embeddings: the CLIP teacher's embedding of every cached box, at 1x and 1.5x, into a cache.

Reads a complete proposal cache and the images it was made from, and writes the embedding cache of
DESIGN.md §5: shard by shard, row-aligned with the proposal shard of the same name, the L2-normalised CLIP
image embedding of each box's 1x crop (`emb_1x`), of its 1.5x crop (`emb_15x`, the box enlarged about its
centre and clipped to the image) and of their normalised sum (`emb`, the ViLD-image target), fp16.

Crops. The fast path (default) decodes each image once and resamples every box of a batch of images with
one `roi_align` call on the teacher's device (`pipeline.crops.crop_squares`): the central square of the
box, which is what CLIP's `preprocess` keeps of a crop. The reference path (`crop_method="reference"`)
runs CLIP's own `preprocess` on a PIL crop of each box, in the loader workers; it is the exact, slow
path the fast one is checked against (tests/test_cache_embeddings.py measures their agreement). Workers hand
over finished crops only while the batches in flight hold under CROPS_IN_FLIGHT_LIMIT of them (a 300-box
image is 361 MB of crops at 224 px); else this process crops.

Speed. Decoding runs ahead in DataLoader workers (or batched on the GPU with nvJPEG: `decode="torchvision"`,
the default on CUDA); the fast crops are made on the GPU, or in the workers on a CPU; the encoder sees
`batch_size` crops at a time (fp16 on CUDA, as `clip.load` gives), and a finished shard is written by a
background thread while the next is computed.

Determinism. Crops are batched within a shard only, so every shard's arrays are a function of the shard's
images and the model: a killed-and-resumed run, a torchrun run and a `--shard` run fill the same cache as
one uninterrupted process on the same device. Claims, signals and shards left to another run are handled as
in dump-proposals (`pipeline.shard_work`).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.errors import DataError, VildError, counted, describe_error, require_at_least
from vild_pipe.pipeline.cache_loader import shared_memory_share
from vild_pipe.pipeline.crops import CROP_SCALES, crop_boxes_1x_15x, crop_squares, pil_to_uint8_chw, reference_crops
from vild_pipe.pipeline.distributed import loader_workers, made_on, use_threads
from vild_pipe.pipeline.embedding_cache import (
    PROPOSAL_STAGE, STAGE, annotations_of, embedding_fields, image_embedding_rows,
)
from vild_pipe.pipeline.shard_work import (
    ClaimingSampler,
    OpenShard,
    ShardSequence,
    cache_summary,
    joined_process_group,
    log_measured_cost,
    log_nothing_to_write,
)
from vild_pipe.pipeline.shards import (
    CacheFolder,
    Worker,
    bytes_per_row,
    format_bytes,
    parse_shard_option,
)
from vild_pipe.pipeline.teacher import Teacher, load_teacher

log = logging.getLogger(__name__)

CROP_METHODS = ("fast", "reference")
DECODERS = ("auto", "pil", "torchvision")
CROPS_IN_FLIGHT_LIMIT = 1 << 30   # bytes of finished crops the loader may hold between its workers and the encoder


def run(
    proposals: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    clip: str,
    images: str | os.PathLike | None = None,
    crop_method: str = "fast",
    ensemble_only: bool = False,
    batch_size: int | None = None,
    images_per_batch: int = 8,
    decode: str = "auto",
    shard: str | tuple[int, int] | None = None,
    device: str = "auto",
    workers: int = 2,
    threads: int = 0,
    overwrite: bool = False,
) -> dict:
    """Fill the embedding cache `out` for every box of the proposal cache `proposals`; returns a summary.

    `annotations` is the file the proposal cache was made from (its images are read again; the file's hash
    must match); `clip` a CLIP model name or file for `clip.load`. `batch_size` is in crops (default 1024
    on CUDA, 256 on the CPU); `images_per_batch` images are decoded and cropped together. `ensemble_only`
    stores just `emb`, a third of the size. `shard` "i/n" takes this job's part of the shards (with
    torchrun, split again between the ranks). The crop method and the precision make the cache's config:
    a rerun with another one is refused unless `overwrite`. The batch size and the device, which move values
    only in their last bits, are recorded as the run that began the cache had them; a resume with others warns.
    """
    if crop_method not in CROP_METHODS:
        raise VildError(f"--crop-method must be one of {', '.join(CROP_METHODS)}, got {crop_method!r}")
    if decode not in DECODERS:
        raise VildError(f"--decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    if batch_size is not None and batch_size < 1:
        raise VildError(f"--batch-size must be at least 1 crop, got {batch_size}")
    require_at_least("--images-per-batch", images_per_batch)
    require_at_least("--workers", workers, 0)
    shard_option = parse_shard_option(shard) if isinstance(shard, str) else shard
    use_threads(threads)
    with joined_process_group(device) as info:
        started = time.monotonic()
        proposal_folder = CacheFolder.open(proposals, stage=PROPOSAL_STAGE)
        proposal_folder.require_complete()
        dataset = annotations_of(proposal_folder, annotations, images)

        teacher = load_teacher(clip, info.device)
        if batch_size is None:
            batch_size = 1024 if info.device.type == "cuda" else 256
        if decode == "auto":
            decode = "torchvision" if info.device.type == "cuda" else "pil"
        fields = embedding_fields(teacher.embed_dim, ensemble_only)
        config = {
            "crop_method": crop_method,
            "crop_scales": list(CROP_SCALES),
            "precision": "fp16" if teacher.dtype == torch.float16 else "fp32",
            "ensemble_only": bool(ensemble_only),
        }
        inputs = {"clip": teacher.identity, "proposals": {"fingerprint": proposal_folder.fingerprint}}
        folder = CacheFolder.open_or_create(
            out, stage=STAGE, config=config, inputs=inputs, fields=fields, num_shards=proposal_folder.num_shards,
            images_per_shard=proposal_folder.images_per_shard, overwrite=overwrite,
            sources={"proposals": os.path.abspath(proposal_folder.path)},
            made_with={"batch_size": batch_size, **made_on(info.device)},
        )
        worker = Worker.of(shard_option, info.rank, info.world_size)
        pending = [i for i in worker.shards(folder.num_shards) if not folder.is_complete(i)]
        markers = {i: proposal_folder.read_marker(i) for i in pending}
        rows = {i: marker["rows"] for i, marker in markers.items()}
        rows_per_image = sum(rows.values()) / max(1, sum(marker["images"] for marker in markers.values()))
        if info.rank == 0:
            _log_expected_cost(folder, proposal_folder, rows, teacher.embed_dim)

        if pending:
            log.info("%s: %s to write on %s (%s crops, %s, batch %d crops, %s decode)",
                     worker, counted(len(pending), "shard"), info.device, crop_method, config["precision"],
                     batch_size, decode)
            written = _write_shards(
                teacher, dataset, proposal_folder, folder, rows, rows_per_image, crop_method, decode, batch_size,
                images_per_batch, workers, show_progress=info.rank == 0,
            )
        else:
            written = []
            log_nothing_to_write(folder.num_shards, worker)

        complete = folder.finalize()
        summary = cache_summary(folder, written, complete, time.monotonic() - started)
        summary["crops"] = 2 * sum(rows[i] for i in written)
        log_measured_cost(folder, summary)
        return summary


def _log_expected_cost(folder: CacheFolder, proposal_folder: CacheFolder, pending_rows: dict[int, int], dim: int
                       ) -> None:
    """What the cache will take on disk, known exactly from the proposal cache's row counts, before writing."""
    totals = proposal_folder.manifest_summary()
    row_bytes = bytes_per_row(folder.fields)
    images = max(totals["images"], 1)
    log.info(
        "embedding cache %s: %s per image (%.1f boxes x %d vectors x %d dims x 2 bytes), %s for %d images in %d"
        " shards; this worker has %d shards (%d crops) to compute", folder.path,
        format_bytes(totals["rows"] * row_bytes / images), totals["rows"] / images, len(folder.fields), dim,
        format_bytes(totals["rows"] * row_bytes), totals["images"], folder.num_shards, len(pending_rows),
        2 * sum(pending_rows.values()),
    )


# ---------------------------------------------------------------------------------------------- the shard loop


class _LoadedImage(NamedTuple):
    shard: int
    image_id: int
    boxes: np.ndarray
    payload: torch.Tensor | None
    error: str | None


class _ImagesToCrop(Dataset):
    """What a loader worker hands over for one image of a shard, as a `_LoadedImage`.

    The payload is the decoded uint8 image (decode "pil") or the file's bytes (decode "torchvision") for
    cropping on the device in the main process, or the finished crops themselves: always for the
    reference path, and for the fast path when `crop_size` is given (on the CPU, where the workers are the
    parallel hardware). A bad image comes back as its one-line error instead of an exception (DataLoader
    would bury it in a traceback).
    """

    def __init__(self, dataset: CocoDataset, crop_method: str, decode: str, preprocess, crop_size: int | None):
        self.dataset = dataset
        self.crop_method = crop_method
        self.decode = decode
        self.preprocess = preprocess
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> _LoadedImage:
        shard_index, (image_id, boxes) = key
        record = self.dataset.image(image_id)
        crop_boxes = crop_boxes_1x_15x(boxes, record.width, record.height)
        try:
            if self.crop_method == "reference":
                payload = reference_crops(self.dataset.open_image(record), crop_boxes, self.preprocess)
            elif self.decode == "torchvision" and (data := _device_decodable_jpeg(record.path)) is not None:
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                payload = pil_to_uint8_chw(self.dataset.open_image(record))
                if self.crop_size is not None:
                    payload = crop_squares([payload], [torch.from_numpy(crop_boxes)], self.crop_size)
        except DataError as err:
            return _LoadedImage(shard_index, image_id, boxes, None, str(err))
        except OSError as err:
            problem = f"{os.fspath(record.path)}: cannot read image file ({describe_error(err)})"
            return _LoadedImage(shard_index, image_id, boxes, None, problem)
        return _LoadedImage(shard_index, image_id, boxes, payload, None)


def _device_decodable_jpeg(path: Path) -> bytes | None:
    """The file's bytes if it is a JPEG of 1 or 3 colour components, else None (the PIL path takes it).

    A 4-component JPEG (CMYK, YCCK) stays with PIL: torchvision does not turn on nvJPEG's CMYK handling, so
    on CUDA it would be refused or its colours wrong. An unreadable file is left to the PIL path too, which
    names the problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if jpeg_components(data) in (1, 3) else None


_START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_components(data: bytes) -> int | None:
    """The number of colour components in a JPEG's frame header (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK);
    None for data that is not a JPEG or whose header ends before the frame's."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:           # fill byte
            at += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            at += 2
        elif marker in _START_OF_FRAME:
            return data[at + 9] if at + 9 < len(data) else None   # FF Cn, length, precision, height, width, Nf
        elif marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        else:
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


class _CropEncoder:
    """Encodes crops in batches of exactly `batch_size` as they come; `finish` encodes the rest.

    Batches never span two shards (the stage calls `finish` at each shard's end), so a shard's embeddings
    do not depend on which shard came before it.
    """

    def __init__(self, teacher: Teacher, batch_size: int):
        self.teacher = teacher
        self.batch_size = batch_size
        self._waiting: list[torch.Tensor] = []
        self._num_waiting = 0
        self._encoded: list[torch.Tensor] = []

    def add(self, crops: torch.Tensor) -> None:
        self._waiting.append(crops)
        self._num_waiting += len(crops)
        if self._num_waiting < self.batch_size:
            return
        waiting = torch.cat(self._waiting)  # one copy; the full batches and the rest are views of it
        full = len(waiting) - len(waiting) % self.batch_size
        for start in range(0, full, self.batch_size):
            self._encode(waiting[start:start + self.batch_size])
        self._waiting = [waiting[full:]]
        self._num_waiting = len(waiting) - full

    def _encode(self, crops: torch.Tensor) -> None:
        if len(crops):
            self._encoded.append(self.teacher.encode_images(crops, batch_size=self.batch_size))

    def finish(self) -> np.ndarray:
        """Every embedding since the last `finish`, in order, as float32 (N, D) on the CPU."""
        if self._waiting:
            self._encode(torch.cat(self._waiting))
        if self._encoded:
            encoded = torch.cat(self._encoded).cpu().numpy()
        else:
            encoded = np.zeros((0, self.teacher.embed_dim), np.float32)
        self._waiting, self._num_waiting, self._encoded = [], 0, []
        return encoded


def _write_shards(teacher, dataset, proposal_folder, folder, pending_rows, rows_per_image, crop_method, decode,
                  batch_size, images_per_batch, workers, show_progress) -> list[int]:
    """Compute and publish the pending shards (`pending_rows`: shard -> rows; `rows_per_image` over them) this
    process can claim; returns the ones it wrote."""
    def images_of(index: int) -> list[tuple[int, np.ndarray]]:
        with proposal_folder.read_shard(index) as reader:
            boxes = reader.arrays(["boxes"])["boxes"]
            starts = reader.row_start
            return [(int(image_id), boxes[starts[k]:starts[k + 1]]) for k, image_id in enumerate(reader.image_ids)]

    crops_from_workers = (crop_method == "reference" or teacher.device.type == "cpu") and _workers_may_crop(
        rows_per_image, workers, images_per_batch, teacher.input_resolution)
    if crop_method == "reference" and not crops_from_workers:
        workers = 0
    sampler = ClaimingSampler(folder, list(pending_rows), images_of)
    loader = DataLoader(
        _ImagesToCrop(dataset, crop_method, decode, teacher.preprocess,
                      crop_size=teacher.input_resolution if crops_from_workers else None),
        batch_size=images_per_batch,
        sampler=sampler, collate_fn=list, **loader_workers(workers),
        pin_memory=teacher.device.type == "cuda" and crop_method != "reference",  # not 360 MB of crops an image
    )
    encoder = _CropEncoder(teacher, batch_size)
    shard_images: list[tuple[int, int]] = []
    total = 2 * sum(pending_rows.values())
    progress = tqdm(total=total, desc="cache-embeddings", unit="crop", unit_scale=True,
                    disable=None if show_progress else True)

    def add_embeddings(shard: OpenShard) -> None:
        for image_id, rows in image_embedding_rows(encoder.finish(), shard_images, folder.fields):
            shard.writer.add_image(image_id, **rows)
        shard_images.clear()

    with ShardSequence(sampler, before_publish=add_embeddings) as shards, progress:
        for batch in loader:
            for item in batch:
                if item.error is not None:
                    raise DataError(f"{item.error} (image {item.image_id} has rows in the proposal cache, so it"
                                    " cannot be skipped here; restore the file)")
            for shard_index, group in _by_shard(batch):
                shards.shard(shard_index)
                encoder.add(_crops_of(group, dataset, teacher))
                shard_images.extend((item.image_id, len(item.boxes)) for item in group)
                progress.update(2 * sum(len(item.boxes) for item in group))
    return shards.published


def _workers_may_crop(rows_per_image: float, workers: int, images_per_batch: int, size: int) -> bool:
    """Whether loader workers may hand over finished crops instead of images: only while the batches in flight
    (torch's two per worker, and the one being encoded) hold under CROPS_IN_FLIGHT_LIMIT bytes of them and
    under half the free shared memory they pass through. At CLIP's 224 px a 300-box image is 361 MB of float32
    crops against under 1 MB decoded; at the demo's 32 px with 20 boxes, 0.5 MB. Where they may not, this
    process crops (the reference path: reads the images too)."""
    if workers < 1:
        return False
    crop_bytes = 2 * rows_per_image * 3 * size * size * 4   # 1x and 1.5x, float32
    in_flight = (2 * workers + 1) * images_per_batch * crop_bytes
    share = shared_memory_share()
    shared = share[0] / share[1] if share is not None else float("inf")   # None: torch shares memory another way
    if in_flight <= min(CROPS_IN_FLIGHT_LIMIT, shared / 2):
        return True
    log.info("crops are made in this process, not in the loader workers: a batch of %d images is %s of crops"
             " (--images-per-batch sets it)", images_per_batch, format_bytes(images_per_batch * crop_bytes))
    return False


def _by_shard(batch: list[_LoadedImage]) -> list[tuple[int, list[_LoadedImage]]]:
    """Consecutive runs of a loader batch that belong to one shard."""
    groups: list[tuple[int, list[_LoadedImage]]] = []
    for item in batch:
        if not groups or groups[-1][0] != item.shard:
            groups.append((item.shard, []))
        groups[-1][1].append(item)
    return groups


def _crops_of(group: list[_LoadedImage], dataset: CocoDataset, teacher: Teacher) -> torch.Tensor:
    """The normalised crops of every box of a group of images: per image its 1x crops, then its 1.5x crops.

    Crops the loader workers made (the reference path; the fast path on a CPU with workers) are taken as they
    are; the other images (JPEG bytes under --decode torchvision, where a PNG beside them comes cropped) are
    decoded and cropped here, on the teacher's device.
    """
    size = teacher.input_resolution
    to_crop = [item for item in group if item.payload.ndim != 4]
    if not to_crop:
        return torch.cat([torch.zeros(0, 3, size, size)] + [item.payload for item in group if len(item.boxes)])
    cropped_here = _crop_here(to_crop, dataset, teacher)
    if len(to_crop) == len(group):
        return cropped_here
    pieces = iter(cropped_here.split([2 * len(item.boxes) for item in to_crop]))
    return torch.cat([item.payload if item.payload.ndim == 4 else next(pieces) for item in group])


def _crop_here(group: list[_LoadedImage], dataset: CocoDataset, teacher: Teacher) -> torch.Tensor:
    size = teacher.input_resolution
    images = _decode(group, dataset, teacher.device)
    records = [dataset.image(item.image_id) for item in group]
    boxes = [torch.from_numpy(crop_boxes_1x_15x(item.boxes, record.width, record.height))
             for item, record in zip(group, records)]
    dtype = teacher.dtype if teacher.device.type == "cuda" else torch.float32
    return crop_squares(images, boxes, size, dtype=dtype)


def _decode(group: list[_LoadedImage], dataset: CocoDataset, device: torch.device) -> list[torch.Tensor]:
    """The group's images as uint8 (3, H, W) on `device`: JPEG bytes decoded in one batched call there
    (nvJPEG on CUDA), images the workers decoded moved over as they are."""
    images: list[torch.Tensor | None] = [None] * len(group)
    encoded = [k for k, item in enumerate(group) if item.payload.ndim == 1]
    for k, item in enumerate(group):
        if item.payload.ndim == 3:
            images[k] = item.payload.to(device, non_blocking=True)
    if encoded:
        decoded = _decode_jpegs([group[k] for k in encoded], dataset, device)
        for k, pixels in zip(encoded, decoded):
            record = dataset.image(group[k].image_id)
            if tuple(pixels.shape[1:]) != (record.height, record.width):
                raise dataset.wrong_size_error(record, (pixels.shape[2], pixels.shape[1]))
            images[k] = pixels
    return images


def _decode_jpegs(items: list[_LoadedImage], dataset: CocoDataset, device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, H, W) on `device`, in one batched decode_jpeg call (nvJPEG on CUDA).

    nvJPEG refuses some files libjpeg reads (DALI falls back to the host for unusual chroma subsampling), and
    one refusal fails the whole batched call; then each image is tried alone, and one that still fails is
    decoded by PIL with a warning. A file PIL cannot decode either is a DataError naming it.
    """
    try:
        return _decode_jpeg_batch([item.payload for item in items], device)
    except RuntimeError as err:
        if len(items) > 1:
            return [pixels for item in items for pixels in _decode_jpegs([item], dataset, device)]
        record = dataset.image(items[0].image_id)
        log.warning("%s: torchvision cannot decode this JPEG on %s (%s); decoding it with PIL", record.path,
                    device, describe_error(err))
        return [pil_to_uint8_chw(dataset.open_image(record)).to(device)]


def _decode_jpeg_batch(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        return torchvision.io.decode_jpeg(payloads, mode=torchvision.io.ImageReadMode.RGB, device=device)
