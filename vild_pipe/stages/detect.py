"""vild-pipe detect: open-vocabulary detection on your own images, with any list of category names.

Per image (DESIGN.md §2, inference): the class-agnostic detector's top boxes and their RoIAlign features
(`propose_with_features`, as dump-proposals stores them) -> the ViLD head's region embeddings -> softmax over
[the head's background, the vocabulary's CLIP text embeddings] / τ, background dropped. Unless the ensemble
is switched off, the teacher also embeds each box's 1x and 1.5x crops exactly as cache-embeddings does
(normalise(e1x + e1.5x), the same crops and fp16 rounding) and the two are combined geometrically
(`ensemble_probabilities`): a name among the head's base categories is weighted like a base category, every
other name like a novel one. Per-class NMS, a score threshold and a cap per image give the detections.

Writes OUT/detections.json (COCO format: the vocabulary as categories, detections as annotations with a
`score`) and OUT/<image stem>.png, the image with its detections drawn. An image is first turned upright as
its EXIF orientation tag says (a phone's portrait photograph is often stored sideways), so boxes, sizes and
drawings are in the frame a viewer shows. A run's drawings are written under temp names and renamed into place
with its JSON only once every image is done: a run that fails part way leaves OUT as it was.

The text embeddings come from `clip`, which must be the CLIP model the head was trained against (its
recorded identity is checked): a head's region embeddings live in its own teacher's space. Likewise `detector`
must be the one whose features the head was trained on (the sha256 train-head records; for an older head,
the one in its training cache's manifest, where that is still found).
"""
from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vild_pipe import __version__
from vild_pipe.data.coco import read_rgb_image
from vild_pipe.data.prompts import clean_name
from vild_pipe.errors import DataError, VildError, counted, describe_error, require_at_least, require_between
from vild_pipe.pipeline.crops import crop_boxes_1x_15x, crop_squares, pil_to_uint8_chw
from vild_pipe.pipeline.detector import check_fits_detector, check_head_detector, load_detector, model_sizes
from vild_pipe.pipeline.distributed import pick_device, use_threads
from vild_pipe.pipeline.drawing import ImageDetections, draw_detections, write_detections_json
from vild_pipe.pipeline.embedding_cache import (
    ENSEMBLE_FIELD, embedding_fields, image_embedding_rows, training_detector, training_proposal_nms,
)
from vild_pipe.pipeline.head import TEMPERATURE, load_head, resolve_head_file
from vild_pipe.pipeline.proposals import feature_shape, propose_with_features
from vild_pipe.pipeline.scoring import (
    BASE_TEXT_WEIGHT, NMS_IOU_THRESHOLD, NOVEL_TEXT_WEIGHT, crop_probabilities, detections_from_scores,
    ensemble_probabilities, head_probabilities,
)
from vild_pipe.pipeline.shards import make_output_folder, remove_stale_temps_in, sha256_file, temp_path
from vild_pipe.pipeline.teacher import Teacher, check_clip_file, load_teacher
from vild_pipe.pipeline.text_embeddings import clip_file_identity, same_clip, vocabulary_names

log = logging.getLogger(__name__)

JSON_NAME = "detections.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def found_lines(summary: dict, shown: int = 5) -> list[str]:
    """A line per image: its best detections, name and score, as a user reads them at the terminal."""
    lines = []
    for image in summary["found"]:
        detections = sorted(image["detections"], key=lambda found: -found[1])
        listed = ", ".join(f"{name} {score:.2f}" for name, score in detections[:shown])
        more = ", ..." if len(detections) > shown else ""
        count = counted(len(detections), "detection")
        lines.append(f"{image['image']}: {count}: {listed}{more}" if detections else f"{image['image']}: nothing found")
    return lines


def run(images: Sequence[str | os.PathLike], detector: str | os.PathLike, head: str | os.PathLike,
        out: str | os.PathLike, vocab: str | None = None, vocab_file: str | os.PathLike | None = None,
        clip: str | None = None, ensemble: bool = True, score_threshold: float = 0.05, top_k: int = 100,
        proposals: int = 300, proposal_nms: float | None = None, nms_threshold: float = NMS_IOU_THRESHOLD,
        base_text_weight: float = BASE_TEXT_WEIGHT, novel_text_weight: float = NOVEL_TEXT_WEIGHT,
        crop_batch_size: int = 256, skip_bad_images: bool = False, device: str = "auto", threads: int = 0) -> dict:
    """Detect the `vocab` (comma-separated) or `vocab_file` names in `images`; write OUT/detections.json and
    OUT/<stem>.png per image; return a summary.

    `detector`: a train-rpn run folder or checkpoint; `head`: a train-head run folder or head file; `clip`: the
    CLIP model (file or name) the head was trained against, required. `proposals` boxes per image (after the
    detector's class-agnostic NMS at `proposal_nms`; None: that of the proposal cache the head was trained on,
    else dump-proposals' default) are scored; detections above
    `score_threshold`, at most `top_k` per image after per-class NMS at `nms_threshold`, are kept. `ensemble`
    False uses the head alone (no CLIP image encoding).
    `skip_bad_images`: an unreadable image is left out with a warning (listed in the summary's "skipped")
    instead of stopping the run.
    """
    started = time.monotonic()
    use_threads(threads)
    names = vocabulary_names(vocab=vocab, vocab_file=vocab_file, offered=("vocab", "vocab_file"))
    _check_options(clip, score_threshold, top_k, proposals, proposal_nms, nms_threshold, crop_batch_size,
                   base_text_weight, novel_text_weight)
    paths = _image_paths(images)
    torch_device = pick_device(device)

    head_file = resolve_head_file(head)
    vild_head, info = load_head(head_file, torch_device)
    head_clip = info.get("clip") or {}
    if not same_clip(head_clip, clip_file_identity(clip)):
        raise DataError(f"--clip {clip}: the head {os.fspath(head)} was trained against CLIP {head_clip.get('model')}"
                        f" ({str(head_clip.get('sha256'))[:12]}); give that model")
    model, _, detector_identity = load_detector(detector, torch_device)
    channels, resolution, _ = feature_shape(model)
    config = vild_head.config
    if (config.in_channels, config.resolution) != (channels, resolution):
        raise DataError(f"{os.fspath(head)}: head takes {config.in_channels}x{config.resolution}x{config.resolution}"
                        f" RoI features, detector {os.fspath(detector)} gives {channels}x{resolution}x{resolution};"
                        " use the detector the head was trained on")
    check_head_detector(head_file, training_detector(info), detector_identity,
                        f"--detector {os.fspath(detector)} is",
                        "use the head's detector, or a head trained on this detector's proposals")
    teacher = load_teacher(clip, torch_device)
    if teacher.embed_dim != config.embed_dim:
        raise DataError(f"--clip {clip}: embeds in {teacher.embed_dim} dimensions, the head in {config.embed_dim}")
    texts = teacher.text_embeddings(names).float()
    is_novel = _novel_names(names, info)
    if proposal_nms is None:
        proposal_nms = training_proposal_nms(info)
    temperature = float(info.get("temperature", TEMPERATURE))
    log.info("detect: %d image(s), %d names (%d among the head's base categories), %s, proposals' NMS %g, on %s",
             len(paths), len(names), int((~is_novel).sum()), "head + CLIP ensemble" if ensemble else "head only",
             proposal_nms, torch_device)

    out = make_output_folder(out)
    remove_stale_temps_in(out)
    found: list[ImageDetections] = []
    staged: dict[Path, Path] = {}    # drawing -> its temp file, renamed into place once every image is done
    skipped: list[str] = []
    detector_sizes = model_sizes(model)
    try:
        for path, drawing_name in tqdm(list(zip(paths, _drawing_names(paths))), desc="detect", unit="img",
                                       disable=None):
            try:
                image = read_rgb_image(path, upright=True)
                check_fits_detector(path, image.height, image.width, *detector_sizes)
            except DataError as err:
                if not skip_bad_images:
                    raise
                log.warning("%s (skipped: --skip-bad-images)", err)
                skipped.append(os.fspath(path))
                continue
            pixels = pil_to_uint8_chw(image).to(torch_device)
            proposed = propose_with_features(model, [pixels], top_n=proposals, nms_threshold=proposal_nms)[0]
            with torch.no_grad():
                regions = vild_head(proposed.features.to(torch_device))
                probs = head_probabilities(regions, texts, vild_head.background_embedding(), temperature)
                if ensemble:
                    crops = crop_embeddings(teacher, pixels, proposed.boxes.numpy(), crop_batch_size)
                    probs = ensemble_probabilities(probs, crop_probabilities(crops, texts), is_novel,
                                                   base_text_weight, novel_text_weight)
                boxes, scores, classes = detections_from_scores(proposed.boxes.to(torch_device), probs,
                                                                nms_threshold, top_k, score_threshold)
            detections = ImageDetections(os.fspath(path), image.width, image.height, boxes.cpu().numpy(),
                                         scores.cpu().numpy(), classes.cpu().numpy())
            found.append(detections)
            labels = [names[k] for k in detections.class_index.tolist()]
            drawing = out / drawing_name
            staged[drawing] = _stage_drawing(draw_detections(image, detections.boxes, labels, detections.scores),
                                             drawing)
    except BaseException:
        for temp in staged.values():
            temp.unlink(missing_ok=True)
        raise

    made_by = {"description": "vild-pipe detect", "version": __version__, "detector": detector_identity,
               "head": {"file": head_file.name, "sha256": sha256_file(head_file), "losses": info.get("losses")},
               "clip": teacher.identity,
               "settings": {"ensemble": ensemble, "score_threshold": score_threshold, "top_k": top_k,
                            "proposals": proposals, "proposal_nms": proposal_nms, "nms_threshold": nms_threshold,
                            "base_text_weight": base_text_weight, "novel_text_weight": novel_text_weight}}
    _publish_drawings(staged)
    write_detections_json(out / JSON_NAME, found, names, made_by)
    total = sum(len(d.scores) for d in found)
    seconds = time.monotonic() - started
    log.info("detect: %d detections on %d image(s)%s in %.1f s -> %s", total, len(found),
             f" ({len(skipped)} unreadable, skipped)" if skipped else "", seconds, out / JSON_NAME)
    return {"out": os.fspath(out), "json": os.fspath(out / JSON_NAME), "drawings": list(map(os.fspath, staged)),
            "names": names,
            "images": len(found), "skipped": skipped, "detections": total,
            "found": [{"image": d.file_name, "detections": [[names[k], round(float(score), 3)] for k, score in
                                                        zip(d.class_index.tolist(), d.scores.tolist())]}
                      for d in found],
            "ensemble": ensemble, "proposal_nms": proposal_nms, "detector": detector_identity, "clip": teacher.identity,
            "seconds": round(seconds, 1)}


def _stage_drawing(drawing: Image.Image, path: Path) -> Path:
    """Write the PNG for `path` under its temp name (`shards.temp_path`) and return that name."""
    encoded = io.BytesIO()
    drawing.save(encoded, format="PNG")
    temp = temp_path(path)
    try:
        temp.write_bytes(encoded.getvalue())
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise VildError(f"{path}: cannot write ({describe_error(err)})") from err
    return temp


def _publish_drawings(staged: dict[Path, Path]) -> None:
    """Rename every staged drawing into place (a drawing that exists is complete)."""
    for drawing, temp in staged.items():
        try:
            os.replace(temp, drawing)
        except OSError as err:
            raise VildError(f"{drawing}: cannot write ({describe_error(err)})") from err


def crop_embeddings(teacher: Teacher, pixels: torch.Tensor, boxes: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """(R, D) normalise(e1x + e1.5x) of one image's boxes, exactly what cache-embeddings stores as `emb`.

    The same crop boxes (`crop_boxes_1x_15x`), the same fast crops (`crop_squares`), the same sum, normalisation
    and fp16 rounding (`image_embedding_rows`), so detect scores a box as evaluate scores its cached row.
    """
    height, width = pixels.shape[-2:]
    crop_boxes = torch.from_numpy(crop_boxes_1x_15x(boxes, int(width), int(height)))
    dtype = teacher.dtype if teacher.device.type == "cuda" else torch.float32
    crops = crop_squares([pixels.to(teacher.device)], [crop_boxes], teacher.input_resolution, dtype=dtype)
    encoded = teacher.encode_images(crops, batch_size=batch_size).cpu().numpy()
    fields = embedding_fields(teacher.embed_dim, ensemble_only=True)
    [(_, rows)] = image_embedding_rows(encoded, [(0, len(boxes))], fields)
    return torch.from_numpy(rows[ENSEMBLE_FIELD]).to(pixels.device)


def _check_options(clip, score_threshold, top_k, proposals, proposal_nms, nms_threshold, crop_batch_size,
                   base_text_weight, novel_text_weight) -> None:
    if not clip:
        raise VildError("--clip is required: the CLIP model (file or name) the head was trained against")
    check_clip_file(clip)
    require_at_least("--top-k", top_k)
    require_at_least("--proposals", proposals)
    require_at_least("crop_batch_size", crop_batch_size)
    require_between("--proposal-nms", proposal_nms, 0, 1, low_open=True)
    require_between("--nms-threshold", nms_threshold, 0, 1, low_open=True)
    require_between("--score-threshold", score_threshold, 0, 1)
    require_between("--base-text-weight", base_text_weight, 0, 1)
    require_between("--novel-text-weight", novel_text_weight, 0, 1)


def _image_paths(images: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files, checked before any model is loaded: a folder stands for its image files (by suffix,
    sorted, not recursive), a file given twice is taken once; VildError naming the first argument that is
    neither an image file nor such a folder."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if not images:
        raise VildError("no images given")
    paths = []
    for image in map(Path, images):
        if image.is_dir():
            found = sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise VildError(f"{os.fspath(image)}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif image.is_file():
            paths.append(image)
        else:
            raise VildError(f"{os.fspath(image)}: no such image file or folder")
    first_given: dict[Path, Path] = {}
    for path in paths:
        first_given.setdefault(path.resolve(), path)
    if len(first_given) < len(paths):
        log.info("detect: %d image(s) given more than once (a file and its folder?); each is detected once",
                 len(paths) - len(first_given))
    return list(first_given.values())


def _drawing_names(paths: list[Path]) -> list[str]:
    """OUT/<stem>.png per image; a name already taken gets -2, -3, ... so no drawing overwrites another."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, count = f"{path.stem}.png", 1
        while name in taken:
            count += 1
            name = f"{path.stem}-{count}.png"
        if count > 1:
            log.info("%s is drawn as %s (another image is %s.png)", path, name, path.stem)
        taken.add(name)
        names.append(name)
    return names


def _novel_names(names: list[str], info: dict) -> np.ndarray:
    """Per vocabulary name: True unless it is one of the head's base categories, compared as their prompts
    read them (`clean_name`: "teddy_bear" is "Teddy bear"). With an arbitrary vocabulary there is no split;
    what the head was trained on is the only base there is."""
    base = info.get("base_names")
    if base is None:
        log.warning("the head records no base categories: every name is weighted as novel in the ensemble")
        base = []
    base_keys = {" ".join(clean_name(name).split()) for name in base}
    return np.array([" ".join(clean_name(name).split()) not in base_keys for name in names], dtype=bool)
