"""Does torchvision's JPEG decoder on a device (nvJPEG on CUDA) give the pixels PIL gives, for the kinds of JPEG
real datasets hold? cache-embeddings decodes JPEGs there (`--decode torchvision`, the default on CUDA), and
every other stage with PIL, so a kind that decodes differently would give the teacher other pixels.

For one photograph saved as each kind (baseline 4:2:0, 4:4:4, 4:2:2, progressive, with restart markers,
grey, CMYK, and an EXIF orientation tag), prints: the decoded size, the mean and largest absolute difference
to PIL's `convert("RGB")` (a few levels are two libjpeg builds' rounding; tens are wrong colours), or the
error, which cache-embeddings meets by decoding that image with PIL and a warning. Then the same images
through cache-embeddings' own batched decode, which must give PIL's kind of pixels for every one. (The stage
never hands a CMYK JPEG to the device decoder: its loader sends those to PIL. The CMYK rows say whether it
needs to.)

Usage: python bench/decode_parity.py --device cuda [--photos DIR]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torchvision
from PIL import Image

from vild_pipe.stages.cache_embeddings import _decode_jpegs

warnings.simplefilter("ignore")


def jpeg_kinds(photo: Image.Image) -> dict[str, bytes]:
    """The photograph as each kind of JPEG, as bytes."""
    exif = Image.Exif()
    exif[0x0112] = 6
    savers = {
        "baseline 4:2:0": dict(quality=90),
        "4:4:4": dict(quality=90, subsampling=0),
        "4:2:2": dict(quality=90, subsampling=1),
        "progressive": dict(quality=90, progressive=True),
        "restart markers": dict(quality=90, restart_marker_blocks=4),
        "EXIF orientation 6": dict(quality=90, exif=exif.tobytes()),
    }
    kinds = {}
    for name, options in savers.items():
        kinds[name] = _jpeg_bytes(photo, **options)
    kinds["grey"] = _jpeg_bytes(photo.convert("L"), quality=90)
    kinds["CMYK"] = _jpeg_bytes(photo.convert("CMYK"), quality=90)
    return kinds


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def pil_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def difference(decoded: torch.Tensor, expected: np.ndarray) -> str:
    got = decoded.permute(1, 2, 0).cpu().numpy().astype(np.int16)
    if got.shape != expected.shape:
        return f"size {got.shape[1]}x{got.shape[0]}, PIL's {expected.shape[1]}x{expected.shape[0]}"
    gap = np.abs(got - expected)
    return f"{got.shape[1]}x{got.shape[0]} | {gap.mean():.2f} | {gap.max()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--photos", type=Path, help="folder of JPEGs (default: scikit-image's chelsea)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.photos is not None:
        photo = Image.open(sorted(args.photos.glob("*.jpg"))[0]).convert("RGB")
    else:
        import skimage.data
        photo = Image.fromarray(skimage.data.chelsea())
    kinds = jpeg_kinds(photo)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}")
    print("| JPEG kind | decode_jpeg alone on the device: size | mean abs diff to PIL | max |")
    print("| --- | --- | --- | --- |")
    for name, data in kinds.items():
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            decoded = torchvision.io.decode_jpeg([payload], mode=torchvision.io.ImageReadMode.RGB, device=device)[0]
            print(f"| {name} | {difference(decoded, pil_pixels(data))} |")
        except RuntimeError as err:
            print(f"| {name} | refused: {str(err).splitlines()[0][:100]} | | |")

    with tempfile.TemporaryDirectory(prefix="decode_parity.") as folder:
        records, items = {}, []
        for image_id, (name, data) in enumerate(kinds.items(), start=1):
            path = Path(folder) / f"{image_id}.jpg"
            path.write_bytes(data)
            records[image_id] = path
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            items.append(SimpleNamespace(image_id=image_id, payload=payload))

        def open_image(record):
            with Image.open(record.path) as image:
                return image.convert("RGB")

        dataset = SimpleNamespace(image=lambda image_id: SimpleNamespace(path=records[image_id], id=image_id),
                                  open_image=open_image)
        decoded = _decode_jpegs(items, dataset, device)
    print("\n| JPEG kind | cache-embeddings' batched decode: size | mean abs diff to PIL | max |")
    print("| --- | --- | --- | --- |")
    for (name, data), pixels in zip(kinds.items(), decoded):
        print(f"| {name} | {difference(pixels, pil_pixels(data))} |")


if __name__ == "__main__":
    main()
