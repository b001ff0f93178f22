"""Benchmark: the proposals' class-agnostic NMS and boxes per image against AP50, on a finished demo folder.

    python bench/proposal_nms.py vild-demo 0.5:20 0.7:20 0.7:40           # val re-dumped, the demo's heads
    python bench/proposal_nms.py vild-demo 0.7:20 --retrain                # train and val re-dumped, heads retrained

Each NMS:TOP_N setting runs the stages' own code into DEMO/nms-bench/<setting>: dump-proposals (val, or train
and val with --retrain) -> cache-embeddings -> [train-head x3 with the demo's settings] -> evaluate, and prints
novel / base AP50 per mode. The demo's own setting (0.5:20) reproduces its table digit for digit.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vild_pipe.stages import cache_embeddings, dump_proposals, evaluate, train_head
from vild_pipe.stages.demo import FULL, HEAD_SETTINGS, HEADS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a folder `vild-pipe demo` finished in")
    parser.add_argument("settings", nargs="+", help="NMS:TOP_N, e.g. 0.7:20")
    parser.add_argument("--retrain", action="store_true", help="re-dump train too and retrain the three heads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    demo = args.demo
    for setting in args.settings:
        nms, top_n = float(setting.split(":")[0]), int(setting.split(":")[1])
        out = demo / "nms-bench" / f"nms{nms}-top{top_n}{'-retrained' if args.retrain else ''}"
        for split in ("train", "val") if args.retrain else ("val",):
            dump_proposals.run(demo / "rpn", demo / "world" / f"{split}.json", out / "proposals" / split,
                               top_n=top_n, nms_threshold=nms)
            cache_embeddings.run(out / "proposals" / split, demo / "world" / f"{split}.json",
                                 out / "embeddings" / split, str(demo / "teacher.pt"))
        heads = {mode: demo / "heads" / losses.replace("+", "-") for mode, losses in HEADS.items()}
        if args.retrain:
            for mode, losses in HEADS.items():
                heads[mode] = out / "heads" / losses.replace("+", "-")
                train_head.run(out / "proposals" / "train", out / "embeddings" / "train",
                               demo / "world" / "train.json", heads[mode], clip=str(demo / "teacher.pt"), losses=losses,
                               iterations=FULL["head_iterations"], warmup=FULL["head_warmup"],
                               batch_size=FULL["head_batch_size"], seed=0, **HEAD_SETTINGS)
        metrics = evaluate.run(out / "proposals" / "val", out / "embeddings" / "val", demo / "world" / "val.json",
                               out / "evaluation", heads=heads, text=demo / "evaluation" / "text_all.pt")
        scores = " ".join(f"{mode} {100 * m['AP50_novel']:.1f}/{100 * m['AP50_base']:.1f}"
                          for mode, m in metrics.items())
        print(setting, "retrained" if args.retrain else "the demo's heads", scores, flush=True)


if __name__ == "__main__":
    main()
