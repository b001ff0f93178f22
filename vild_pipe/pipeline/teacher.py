"""The CLIP teacher: one loader for every model, batched encoders, ViLD's prompt ensemble.

Every teacher goes through `clip.load(NAME_OR_PATH)`: a name such as `ViT-B/32` downloads on a connected
machine, a local file works anywhere. The small teachers this project fits are `clip.model.CLIP`
instances saved as plain state dicts, which is exactly what `clip.load` accepts for a path.
"""
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from vild_pipe.data.prompts import prompt_texts
from vild_pipe.errors import DataError, VildError, describe_error
from vild_pipe.pipeline.checkpoint import describe_load_error, save_checkpoint
from vild_pipe.pipeline.shards import sha256_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns on recent setuptools
    import clip
    from clip.model import CLIP

log = logging.getLogger(__name__)


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """CLIP's BPE tokenizer; over-long texts are truncated rather than refused."""
    return clip.tokenize(list(texts), context_length=context_length, truncate=True)


def encode_text_trimmed(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text`, computed on the tokens up to the longest text's end instead of all 77.

    CLIP's text transformer is causal and reads its output at the end-of-text token, so the padding after
    the longest text changes nothing; cutting it makes training on short captions about four times cheaper.
    The result equals `encode_text` (tested)."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens).type(model.dtype) + model.positional_embedding[:length].type(model.dtype)
    x = x.permute(1, 0, 2)
    for block in model.transformer.resblocks:
        mask = block.attn_mask[:length, :length].to(dtype=x.dtype, device=x.device)
        x = x + block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2)).type(model.dtype)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@dataclass
class Teacher:
    """A loaded CLIP model with the identity a cache records (name, or file hash) and batched encoders."""

    model: CLIP
    preprocess: Callable
    identity: dict
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def input_resolution(self) -> int:
        return int(self.model.visual.input_resolution)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Normalised pixels (N, 3, S, S) -> L2-normalised float32 embeddings (N, D), on the teacher's device."""
        out = []
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(self.device, self.dtype, non_blocking=True)
            out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1))
        if not out:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """Texts -> L2-normalised float32 embeddings (N, D)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(texts[start:start + batch_size], self.model.context_length)
            out.append(F.normalize(encode_text_trimmed(self.model, tokens.to(self.device)).float(), dim=-1))
        return torch.cat(out)

    def text_embeddings(self, names: Sequence[str], templates: Optional[Sequence[str]] = None) -> torch.Tensor:
        """ViLD's prompt ensemble: per name, normalise each template's embedding, average, normalise again."""
        per_name = [self.encode_texts(prompt_texts(name, templates)).mean(0) for name in names]
        return F.normalize(torch.stack(per_name), dim=-1)


def check_clip_file(name_or_path: str) -> None:
    """VildError when a --clip value reads as a file (a path separator or a .pt/.pth suffix, and no CLIP model
    name such as ViT-B/32) that is not there: said first, before it is compared with a recorded model."""
    looks_like_a_file = os.sep in name_or_path or "/" in name_or_path or name_or_path.lower().endswith((".pt", ".pth"))
    if looks_like_a_file and name_or_path not in clip.available_models() and not os.path.exists(name_or_path):
        raise VildError(f"--clip {name_or_path}: no such file")


def load_teacher(name_or_path: str, device="cpu") -> Teacher:
    """Load any CLIP model through `clip.load`; fp16 on CUDA (clip's own behaviour), fp32 on the CPU."""
    device = torch.device(device)
    is_file = os.path.isfile(name_or_path)
    if not is_file and name_or_path not in clip.available_models():
        raise VildError(f"{name_or_path}: not a file and not a CLIP model name "
                        f"(known names: {', '.join(clip.available_models())})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip.load first tries torch.jit.load, deprecated in new torch
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
    except (RuntimeError, KeyError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        if is_file and isinstance(err, KeyError):   # a readable torch file, but clip's model builder lacks a key
            missing = repr(err.args[0]) if err.args else "a key CLIP's model needs"
            raise DataError(f"{name_or_path}: not a CLIP model's weights (a PyTorch file without"
                            f" {missing}; a detector, head or text-embeddings file?)") from err
        if is_file:
            reason = describe_load_error(name_or_path, err, otherwise=None)
            raise DataError(f"{name_or_path}: not a loadable CLIP checkpoint ({reason})") from err
        raise VildError(f"{name_or_path}: could not load CLIP model ({describe_error(err)})") from err
    model.eval()
    if is_file:
        identity = {"model": Path(name_or_path).name, "sha256": sha256_file(name_or_path)}
    else:
        identity = {"model": name_or_path, "sha256": None}
    identity.update(embed_dim=int(model.text_projection.shape[1]),
                    input_resolution=int(model.visual.input_resolution))
    log.info("CLIP teacher %s: embed dim %d, input %d px, on %s", identity["model"],
             identity["embed_dim"], identity["input_resolution"], device)
    return Teacher(model, preprocess, identity, device)


@dataclass(frozen=True)
class SmallClipConfig:
    """A CLIP of OpenAI's own architecture, small enough to fit on a CPU in minutes.

    The default image tower is CLIP's ModifiedResNet (as in RN50) with one block per stage: on 2 CPU
    cores a ViT of the same cost learned far slower from scratch (the conv prior matters at this data
    size). An int `vision_layers` with a `vision_patch_size` gives CLIP's ViT instead. `build_model`
    infers text heads as width // 64, so the text width is a multiple of 64; the context length stays 77
    so `clip.tokenize` works unchanged."""

    embed_dim: int = 128
    image_resolution: int = 32
    vision_layers: tuple = (1, 1, 1, 1)
    vision_width: int = 16
    vision_patch_size: Optional[int] = None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 128
    transformer_layers: int = 2

    def build(self) -> CLIP:
        return CLIP(self.embed_dim, self.image_resolution, self.vision_layers, self.vision_width,
                    self.vision_patch_size, self.context_length, self.vocab_size, self.transformer_width,
                    self.transformer_width // 64, self.transformer_layers)


def save_clip(model: CLIP, path) -> None:
    """Save a state dict that `clip.load(path)` accepts: fp32 tensors, published whole (`save_checkpoint`)."""
    save_checkpoint(path, {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                           for k, v in model.state_dict().items()})
