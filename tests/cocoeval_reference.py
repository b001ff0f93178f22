"""The numbers the project's evaluation must reproduce: pycocotools' own COCOeval, run on files alone."""
import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def fresh_stats(annotation_file, results_file, category_ids):
    """COCOeval's own summary (`stats`) over `category_ids`, from the annotation and results files alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iouType="bbox")
        evaluator.params.catIds = category_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats
