"""Text conditioning of Stable Diffusion (one text encoder) and Stable Diffusion XL (two) pipelines.

One code path: a pipeline has one or two (tokenizer, text encoder) pairs. With one, the UNet reads the final
states; with two (SDXL), it reads the concatenated penultimate states of both (768 + 1280 wide on SDXL),
and its added conditioning takes the pooled projection of the second encoder plus six time ids
[original height, original width, crop top, crop left, target height, target width]. This is exactly what
diffusers' StableDiffusionXLPipeline.encode_prompt computes, including its pooling: a CLIP text config whose
eos_token_id is 2 (SDXL's text_encoder_2) pools at argmax(input_ids), which is an added token's position
once the prompt holds one (see docs/FORMAT.md); we keep that so files reproduce in stock diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

XL_PIPELINE = "StableDiffusionXLPipeline"
SD_PIPELINE = "StableDiffusionPipeline"


class TextSide(NamedTuple):
    """Where one encoder's pieces live: the delta key prefix of its token rows and the pipeline attributes."""

    prefix: str  # "tokens" or "tokens_2"
    tokenizer: str  # pipeline attribute of the tokenizer
    encoder: str  # pipeline attribute of the text encoder


SIDES = (TextSide("tokens", "tokenizer", "text_encoder"), TextSide("tokens_2", "tokenizer_2", "text_encoder_2"))


def is_xl(pipe: Any) -> bool:
    """True for an SDXL pipeline (a second text encoder feeding a text_time UNet)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_name(pipe: Any) -> str:
    """The pipeline family recorded in delta metadata: StableDiffusionXLPipeline or StableDiffusionPipeline."""
    return XL_PIPELINE if is_xl(pipe) else SD_PIPELINE


def sides(pipe: Any) -> list[TextSide]:
    """The text sides of a pipeline: one for SD, two for SDXL."""
    return list(SIDES[:2 if is_xl(pipe) else 1])


def pipeline_vocabulary(pipe: Any) -> set[str]:
    """Every token that a pipeline's tokenizers know (both of SDXL's), the deltas applied to it included."""
    return {w for side in sides(pipe) for w in getattr(pipe, side.tokenizer).get_vocab()}


def tokenize(tokenizers: Sequence[Any], prompts: Sequence[str], max_length: int | None = None) -> list[Tensor]:
    """Input ids (B, T) of the prompts for each tokenizer, padded to its max length as the pipelines do."""
    return [tok(list(prompts), padding="max_length", truncation=True,
                max_length=max_length or tok.model_max_length, return_tensors="pt").input_ids for tok in tokenizers]


def encode(encoders: Sequence[Any], ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """The UNet's text states (B, T, D) and, with two encoders, the pooled projection (B, P) of the second.

    One encoder: its final states (SD). Two: concatenated penultimate states, as diffusers' SDXL pipeline."""
    if len(encoders) == 1:
        return encoders[0](ids[0])[0], None
    states, pooled = [], None
    for enc, i in zip(encoders, ids, strict=True):
        out = enc(i, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (B, T, D_k)
        pooled = out[0]  # the last encoder's projection (text_embeds, (B, P)) is the pooled embedding
    return torch.cat(states, dim=-1), pooled


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """SDXL's six micro-conditioning numbers as a float tensor (6,)."""
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


@torch.no_grad()
def states_for(pipe: Any, texts: Sequence[str], padding: str = "longest") -> tuple[Tensor, Tensor]:
    """(input ids of the first tokenizer (B, T), the states the UNet reads (B, T, D)) for `texts`.

    With `padding="longest"` the rows up to end-of-text equal those of max-length padding (CLIP is causal)."""
    toks = [getattr(pipe, s.tokenizer) for s in sides(pipe)]
    encs = [getattr(pipe, s.encoder) for s in sides(pipe)]
    first = toks[0](list(texts), padding=padding, truncation=True, max_length=toks[0].model_max_length,
                    return_tensors="pt").input_ids
    ids = [first] + [t(list(texts), padding="max_length", truncation=True, max_length=first.shape[1],
                       return_tensors="pt").input_ids for t in toks[1:]]
    device = next(encs[0].parameters()).device
    states, _ = encode(encs, [i.to(device) for i in ids])
    return first, states
