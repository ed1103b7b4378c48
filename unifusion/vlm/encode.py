"""Encode prompts and reference images into stacked VLM layer features for LAP.

One forward of the base model (no LM head, no cache) inside a `LayerCapture` gives
``(B, S, L, H)``. Without Verifi the paper keeps the image tokens and the user's
prompt tokens and masks the system prompt and the template tokens; `VLMFeatures.keep`
holds that choice and `condition_tokens` compacts the kept tokens for the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from .images import to_pil_list
from .layers import LayerCapture, layer_progress
from .loader import LoadedVLM
from .prompt import PromptInputs, build_prompts, images_then_text


@dataclass
class VLMFeatures:
    """Selected-layer states of a batch of chats and which tokens condition the DiT."""

    features: torch.Tensor  # (B, S, L, H)
    attention_mask: torch.Tensor  # (B, S) bool, False on padding
    is_image: torch.Tensor  # (B, S) bool, image feature tokens and their start/end markers
    keep: torch.Tensor  # (B, S) bool, tokens that condition the DiT
    input_ids: torch.Tensor  # (B, S)
    text: list[str]  # the user text of each prompt
    layers: tuple[int, ...] = ()
    is_system: torch.Tensor | None = None
    is_instruction: torch.Tensor | None = None
    is_template: torch.Tensor | None = None
    # (B, S, 2) where each image token lies on its image's frame grid, NaN elsewhere (see `vlm.prompt`)
    frame_positions: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    def _kept_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, S') indices of the kept tokens, front-packed in their order; (B, S') bool mask)."""
        keep = self.keep & self.attention_mask
        counts = keep.sum(dim=1)  # (B,)
        width = max(int(counts.max()), 1) if counts.numel() else 1
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # (B, S')
        mask = torch.arange(width, device=keep.device)[None, :] < counts[:, None]  # (B, S')
        return order, mask

    def condition_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept tokens moved to the front in their original order: ``(B, S', L, H)`` with zeros
        after each row's last kept token, and the ``(B, S')`` bool mask; S' = most kept."""
        order, mask = self._kept_order()
        index = order[:, :, None, None].expand(-1, -1, *self.features.shape[2:])
        tokens = torch.gather(self.features, 1, index)  # (B, S', L, H)
        return tokens * mask[:, :, None, None].to(tokens.dtype), mask

    def condition_positions(self) -> torch.Tensor:
        """``(B, S', 2)`` frame positions of the tokens `condition_tokens` returns, in the same
        order (NaN for text, tiles of a part of an image, padding, or features without positions)."""
        order, mask = self._kept_order()
        if self.frame_positions is None:
            return torch.full((*order.shape, 2), float("nan"), device=order.device)
        places = torch.gather(self.frame_positions.to(order.device).float(), 1,
                              order[:, :, None].expand(-1, -1, 2))  # (B, S', 2)
        return places.masked_fill(~mask[:, :, None], float("nan"))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "VLMFeatures":
        """Move the tensors; `dtype` applies to the features only."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("attention_mask", "is_image", "keep", "input_ids", "is_system", "is_instruction",
                         "is_template", "frame_positions")
            if getattr(self, name) is not None
        }
        return replace(self, features=self.features.to(device=device, dtype=dtype), **moved)


def _no_images(images: Any) -> bool:
    if images is None:
        return True
    return isinstance(images, (list, tuple)) and len(images) == 0


def _expand(items: Sequence[Any]) -> list[Any]:
    """Strings stay; each image-like item (maybe a ComfyUI batch) becomes PIL images."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        else:
            out.extend(to_pil_list(item))
    return out


def _contents(text: str | Sequence[str] | None, images: Any, content: Sequence | None
              ) -> tuple[list[list[Any]], list[str]]:
    """(User content per prompt, its user text): explicit interleaved lists, or images first
    (labelled when several, `images_then_text`) then the text."""
    if content is not None:
        if text or not _no_images(images):
            raise InputError("pass either `content` (interleaved text and images) or `text`/`images`, not both")
        nested = len(content) > 0 and all(isinstance(c, (list, tuple)) for c in content)
        contents = [_expand(c) for c in (content if nested else [content])]
        return contents, [" ".join(item for item in c if isinstance(item, str)) for c in contents]
    texts = [text or ""] if text is None or isinstance(text, str) else list(text)
    if len(texts) == 1:
        per_prompt = [to_pil_list(images)]
    elif _no_images(images):
        per_prompt = [[] for _ in texts]
    elif isinstance(images, (list, tuple)) and len(images) == len(texts):
        per_prompt = [to_pil_list(item) for item in images]
    else:
        raise InputError(f"{len(texts)} prompts need `images` as a list of {len(texts)} image lists (one per prompt)")
    return [images_then_text(pics, t) for pics, t in zip(per_prompt, texts)], texts


def _check_not_empty(contents: list[list[Any]]) -> None:
    for index, content in enumerate(contents):
        if not any(not isinstance(item, str) or item.strip() for item in content):
            raise InputError(f"prompt {index} is empty: give some text or at least one image")


def paper_keep(prompt: PromptInputs) -> torch.Tensor:
    """The paper's rule without Verifi: image tokens and the user's instruction tokens."""
    return (prompt.is_image | prompt.is_instruction) & prompt.attention_mask


def encode_prompt(vlm: LoadedVLM, prompt: PromptInputs, progress: Callable[[int, int], None] | None = None,
                  ) -> torch.Tensor:
    """``(B, S, L, H)`` selected-layer states for built prompt inputs (one forward, no LM head)."""
    kwargs = prompt.model_kwargs(device=vlm.device, dtype=vlm.dtype)
    with torch.inference_mode(), LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture, \
            layer_progress(vlm.decoder_layers, progress):
        vlm.base_model(**kwargs, use_cache=False)
    return capture.stacked()


def encode(
    vlm: LoadedVLM,
    text: str | Sequence[str] | None = None,
    images: Any = (),
    max_tiles: int | Sequence[int] = 6,
    system_prompt: str | None = None,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    content: Sequence[Any] | None = None,
) -> VLMFeatures:
    """Encode one prompt (or a list of prompts, padded into a batch) with its images.

    Images go before the text unless `content` gives an explicit interleaved list of str and
    images (a list of such lists for a batch). With several prompts, `images` is one list of
    images per prompt. `max_tiles` is an int or one value per image in order. A chat longer
    than `max_length` (default and upper bound: the model's limit) keeps its start and loses
    the end of its user text, with a logged warning. `progress(done, total)` is called after
    each decoder layer and may raise to abort.
    """
    contents, texts = _contents(text, images, content)
    _check_not_empty(contents)
    prompt = build_prompts(vlm, contents, system_prompt=system_prompt, add_generation_prompt=False,
                           max_tiles=max_tiles, max_length=max_length)
    features = encode_prompt(vlm, prompt, progress)
    device = features.device
    return VLMFeatures(
        features=features,
        attention_mask=prompt.attention_mask.to(device),
        is_image=prompt.is_image.to(device),
        keep=paper_keep(prompt).to(device),
        input_ids=prompt.input_ids.to(device),
        text=texts,
        layers=tuple(vlm.selected_layers),
        is_system=prompt.is_system.to(device),
        is_instruction=prompt.is_instruction.to(device),
        is_template=prompt.is_template.to(device),
        frame_positions=prompt.frame_positions.to(device) if prompt.frame_positions is not None else None,
    )
