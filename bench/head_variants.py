"""Train one ViLD head variant on a demo run's caches and score it on val (ViLD and ViLD-ensemble AP50).

    python bench/head_variants.py vild-demo OUT '{"iterations": 1000, "batch_size": 16}'

The JSON holds `train_head.run` keyword arguments over the demo's head settings; one line per run is
appended to OUT/results.txt. This is how bench/RESULTS.md's head-schedule table was measured.
"""
import argparse
import json
import time
from pathlib import Path

from vild_pipe.stages import evaluate, train_head
from vild_pipe.stages.demo import FULL, HEAD_SETTINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a finished `vild-pipe demo` output folder")
    parser.add_argument("out", type=Path, help="where each variant's head and evaluation go")
    parser.add_argument("settings", nargs="?", default="{}", help="JSON: train_head.run keyword arguments")
    args = parser.parse_args()
    settings = {**HEAD_SETTINGS, "iterations": FULL["head_iterations"], "warmup": FULL["head_warmup"],
                "batch_size": FULL["head_batch_size"], "losses": "text+image", **json.loads(args.settings)}
    name = "-".join(f"{key}={value}" for key, value in json.loads(args.settings).items()) or "demo-settings"
    run_dir, demo, teacher = args.out / name, args.demo, str(args.demo / "teacher.pt")

    started = time.perf_counter()
    train_head.run(demo / "proposals/train", demo / "embeddings/train", demo / "world/train.json",
                   run_dir / "head", clip=teacher, **settings)
    seconds = time.perf_counter() - started
    metrics = evaluate.run(demo / "proposals/val", demo / "embeddings/val", demo / "world/val.json",
                           run_dir / "evaluation", heads={"ViLD": run_dir / "head"}, clip=teacher,
                           modes=["ViLD", "ViLD-ensemble"])
    scores = ", ".join(f"{mode} base / novel AP50 {100 * m['AP50_base']:.1f} / {100 * m['AP50_novel']:.1f}"
                       for mode, m in metrics.items())
    line = f"{name}: train {seconds:.0f} s; {scores}"
    print(line)
    with open(args.out / "results.txt", "a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
