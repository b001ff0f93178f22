#!/usr/bin/env bash
# The checks only a GPU can make, as one prepared script for a lent GPU (about 15 minutes a session):
#   1. issue 4's figure: cache-embeddings end to end (JPEG files -> shards, fp16, 300 boxes x 2 scales) against
#      the bare ViT-B/32 image tower at the same batch size, and the reference path, in one run;
#   2. every stage on CUDA: `vild-pipe demo --quick` (each stage takes cuda when there is one), then `detect`
#      on a photograph with a free-text vocabulary;
#   3. nvJPEG against PIL on the kinds of JPEG datasets hold (grey, CMYK, progressive, subsamplings), seconds.
# Usage: bench/gpu_check.sh OUT [KIT]
#   KIT (default .whl): wheels for what the GPU machine lacks (pycocotools, clip-anytorch, ftfy, wcwidth, regex,
#   tqdm, setuptools<81; `pip download --only-binary=:all: --python-version 3.12 ...`), pillow/ (a Pillow >= 10.1
#   wheel, installed only where the machine's is older) and photos/ (JPEGs).
#   DEVICE=cpu BENCH_ARGS="--model small --images 4 --boxes 10" runs the same steps on a CPU, small.
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUT [KIT]}
kit=${2:-.whl}
device=${DEVICE:-cuda}
read -r -a bench_args <<< "${BENCH_ARGS:---model ViT-B/32 --images 256 --boxes 300 --reference-images 8}"

# What the machine lacks goes to /tmp/site from the kit's wheels; the package runs from this checkout.
wheels=()
if ! python3 -c "import clip, pycocotools, ftfy" 2>/dev/null; then wheels+=("$kit"/*.whl); fi
if ! python3 -c "import sys, PIL; sys.exit(tuple(map(int, PIL.__version__.split('.')[:2])) < (10, 1))" 2>/dev/null
then wheels+=("$kit"/pillow/*.whl); fi
if [ ${#wheels[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
vild() { python3 -c 'import sys; from vild_pipe.cli import main; sys.argv[0] = "vild-pipe"; main()' "$@"; }
date -u
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
fi

# The reference path's workers pass finished crops through /dev/shm (360 MB an image at 300 boxes): a small
# /dev/shm (a container's default is 64 MB) would kill them, so they run in-process there.
df -h /dev/shm || true
shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
reference_workers=()
if [ "${shm_kb:-0}" -lt 16000000 ]; then reference_workers=(--reference-workers 0); fi
python3 bench/cache_embeddings.py "${bench_args[@]}" --device "$device" --photos "$kit/photos" \
    --out "$out/bench-embeddings" "${reference_workers[@]}"
vild demo --quick --out "$out/quick"
vild detect "$kit/photos/chelsea.jpg" --detector "$out/quick/rpn" --head "$out/quick/heads/text-image" \
    --clip "$out/quick/teacher.pt" --vocab "cat, whiskers, red car" --out "$out/photo" --device "$device"
python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(len(d['images']), 'image,',
    len(d['annotations']), 'detections above the threshold')" "$out/photo/detections.json"
ls -l "$out/photo"
python3 bench/decode_parity.py --device "$device" --photos "$kit/photos"
