#!/usr/bin/env bash
# Times the demo from an empty folder: every stage's seconds are in the table it prints, and each stage's
# own figures (teacher accuracy, detector recall, cache bytes) are in its output files named below.
# Usage: bench/demo.sh [OUT]   (default: a fresh temp folder)
set -euo pipefail
out=${1:-$(mktemp -d)/vild-demo}
echo "machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())'), $(date -u +%F)"
/usr/bin/time -v vild-pipe demo --out "$out" 2> >(grep -E "Elapsed|Maximum resident" >&2)
echo "teacher:   $out/teacher.json"
echo "detector:  $out/rpn/recall.json"
echo "proposals: $out/proposals/{train,val}/manifest.json"
echo "embeddings: $out/embeddings/{train,val}/manifest.json"
echo "heads:     $out/heads/{text,image,text-image}/metrics.jsonl"
echo "metrics:   $out/evaluation/metrics.json (and metrics.md); pictures: $out/detections/*.png"
