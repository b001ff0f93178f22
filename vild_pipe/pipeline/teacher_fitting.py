"""Fitting a small CLIP on image–caption pairs, and measuring how well a teacher classifies crops.

The synthetic world has no web to learn from, so its teacher learns the way CLIP did, from images with
captions, for every category (novel ones included): each "web image" is a crop around an object of a
training image, its caption one of ViLD's templates filled with the object's name. The detector and the
ViLD head never see these pairs; they only ever meet the teacher through its embeddings.
"""
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vild_pipe.data.prompts import fill_template, vild_templates
from vild_pipe.pipeline.crops import centre_square_crop, crop_box_pil, normalize_pixels, pil_to_uint8_chw
from vild_pipe.pipeline.teacher import tokenize

log = logging.getLogger(__name__)


def cut_caption_crops(dataset, resolution: int, views_per_object: int, seed: int,
                      scale_range=(1.0, 1.7), shift: float = 0.08):
    """Jittered crops around every annotated object -> (uint8 (N,3,S,S), category index (N,)).

    Scales cover both the 1x and the 1.5x boxes the teacher will later be shown; the crop geometry is
    CLIP's preprocess (shorter side, centre crop), the same as the reference crop path."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for record in tqdm(dataset.images, desc="cutting caption crops", unit="img", disable=None):
        boxes, cat_ids, _ = dataset.annotations_for(record.id)
        if len(boxes) == 0:
            continue
        image = dataset.open_image(record)
        for box, cat_id in zip(boxes, cat_ids):
            size = box[2:] - box[:2]
            for _ in range(views_per_object):
                centre = (box[:2] + box[2:]) / 2 + rng.normal(0, shift, 2) * size
                half = size * rng.uniform(*scale_range) / 2 * rng.uniform(0.9, 1.1, 2)
                view = np.concatenate([centre - half, centre + half])
                crop = centre_square_crop(crop_box_pil(image, view), resolution)
                crops.append(pil_to_uint8_chw(crop))
                labels.append(dataset.category_index(int(cat_id)))
    return torch.stack(crops), torch.tensor(labels, dtype=torch.long)


def caption_batch(num_categories: int, names, rng: np.random.Generator, per_category: int):
    """`per_category` random-template captions for every category -> (texts, category index per text)."""
    templates = vild_templates()
    texts, owners = [], []
    for index in range(num_categories):
        for template_id in rng.integers(0, len(templates), per_category):
            texts.append(fill_template(templates[template_id], names[index]))
            owners.append(index)
    return texts, torch.tensor(owners)


def multi_positive_clip_loss(image_emb, text_emb, image_labels, text_labels, logit_scale):
    """CLIP's symmetric contrastive loss where every pair of the same category counts as a positive.

    Several images of one category share a batch, so the one-hot targets of CLIP would call true pairs
    negatives; the target is instead uniform over the pairs of the same category."""
    logits = logit_scale * image_emb @ text_emb.t()
    positives = (image_labels[:, None] == text_labels[None, :]).float()
    loss_images = -(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    present = positives.sum(0) > 0
    col = positives[:, present]
    loss_texts = -(col / col.sum(0, keepdim=True) * logits[:, present].log_softmax(0)).sum(0).mean()
    return (loss_images + loss_texts) / 2


def fit_small_clip(model, crops, labels, names, steps: int, batch_size: int, lr: float, seed: int,
                   captions_per_category: int = 2, warmup: int = 50):
    """AdamW with warm-up and cosine decay; random horizontal flips; returns the per-step losses."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    bar = tqdm(range(steps), desc="fitting teacher", unit="step", disable=None)
    for step in bar:
        index = torch.from_numpy(rng.integers(0, len(crops), batch_size))
        pixels = normalize_pixels(crops[index])
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        pixels[flip] = pixels[flip].flip(-1)
        texts, text_labels = caption_batch(len(names), names, rng, captions_per_category)
        tokens = tokenize(texts, model.context_length)
        image_emb = F.normalize(model.encode_image(pixels), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens), dim=-1)
        loss = multi_positive_clip_loss(image_emb, text_emb, labels[index], text_labels,
                                        model.logit_scale.exp().clamp(max=100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def crop_accuracy(teacher, dataset, split, batch_size: int = 256) -> dict:
    """Top-1 accuracy of the teacher on every ground-truth crop of `dataset` (CLIP's own preprocess on PIL
    crops), against the prompt-ensembled names of all categories; split into base and novel."""
    text = teacher.text_embeddings(dataset.category_names)
    pixels, truth = [], []
    for record in tqdm(dataset.images, desc="teacher accuracy", unit="img", disable=None):
        boxes, cat_ids, _ = dataset.annotations_for(record.id)
        if len(boxes):
            image = dataset.open_image(record)
            pixels += [teacher.preprocess(crop_box_pil(image, box)) for box in boxes]
            truth += [dataset.category_index(int(c)) for c in cat_ids]
    predicted = (teacher.encode_images(torch.stack(pixels), batch_size) @ text.t()).argmax(1).cpu()
    truth = torch.tensor(truth)
    correct = predicted == truth
    novel = torch.tensor([split.is_novel(dataset.categories[i].id) for i in truth.tolist()])
    return {"base": correct[~novel].float().mean().item() if (~novel).any() else math.nan,
            "novel": correct[novel].float().mean().item() if novel.any() else math.nan,
            "all": correct.float().mean().item(), "crops": len(truth),
            "base_crops": int((~novel).sum()), "novel_crops": int(novel.sum())}
