"""Greedy Verifi rewrites of many prompts in one ``generate`` call.

`unifusion.vlm.verifi.verifi_rewrite` handles one prompt per call; building the demo's
feature cache needs thousands of rewrites, and on a CPU one generate step costs about
the same for 1 row as for 64. This runs the same chats (built by `build_prompts` with
left padding, so every row's answer starts at the same column) through one greedy
``generate`` with the same layer capture, then cuts each row exactly as
`verifi_rewrite` does: prompt without its padding, plus the kept generated tokens
(`kept_count`). Results equal `verifi_rewrite`'s up to float tolerance (padding only
changes the summation order of masked attention). `train-demo` passes it to `build_cache`
as its ``verifi_batch``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import InputError
from ..vlm.encode import VLMFeatures, paper_keep
from ..vlm.images import to_pil_list
from ..vlm.layers import LayerCapture
from ..vlm.loader import LoadedVLM
from ..vlm.prompt import PromptInputs, build_prompts, images_then_text
from ..vlm.verifi import DEFAULT_SYSTEM_PROMPT, VerifiResult, eos_token_ids, extend_positions, kept_count, pad_token_id


def _row(prompt: PromptInputs, b: int, start: int) -> dict[str, torch.Tensor]:
    """Row ``b`` of the prompt masks without its left padding, each (1, P_b)."""
    return {name: getattr(prompt, name)[b:b + 1, start:]
            for name in ("attention_mask", "is_image", "is_system", "is_instruction", "is_template")}


def _result(vlm: LoadedVLM, prompt: PromptInputs, states: torch.Tensor, sequence: torch.Tensor, b: int,
            eos: set[int], max_new_tokens: int) -> VerifiResult:
    width = prompt.input_ids.shape[1]
    start = width - int(prompt.attention_mask[b].sum())
    generated = sequence[b, width:].tolist()
    kept, finished = kept_count(generated, eos, max_new_tokens, states.shape[1] - width)
    token_ids = sequence[b, width: width + kept].cpu()
    text = vlm.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True).strip()
    masks = _row(prompt, b, start)

    def extend(mask: torch.Tensor, value: bool) -> torch.Tensor:  # (1, P_b) -> (1, P_b + kept)
        return torch.cat([mask.cpu(), torch.full((1, kept), value, dtype=torch.bool)], dim=1).to(states.device)

    if kept:
        keep = extend(masks["is_image"] & masks["attention_mask"], True)
    else:  # same fallback as verifi_rewrite: condition on the prompt tokens
        keep = extend(paper_keep(PromptInputs(input_ids=prompt.input_ids[b:b + 1, start:], **masks)), False)
    features = VLMFeatures(
        features=states[b:b + 1, start: width + kept],
        attention_mask=extend(masks["attention_mask"], True),
        is_image=extend(masks["is_image"], False),
        keep=keep,
        input_ids=sequence[b:b + 1, start: width + kept].to(states.device),
        text=[text],
        layers=tuple(vlm.selected_layers),
        is_system=extend(masks["is_system"], False),
        is_instruction=extend(masks["is_instruction"], False),
        is_template=extend(masks["is_template"], False),
        frame_positions=extend_positions(None if prompt.frame_positions is None
                                         else prompt.frame_positions[b:b + 1, start:], kept, states.device),
    )
    return VerifiResult(text, features, kept, token_ids, finished)


def verifi_rewrite_batch(
    vlm: LoadedVLM,
    texts: Sequence[str],
    images: Optional[Sequence[Any]] = None,
    system_prompt: Optional[str] = None,
    max_new_tokens: int = 128,
    max_tiles: int = 6,
    seeds: Optional[Sequence[int]] = None,
) -> list[VerifiResult]:
    """Greedy `verifi_rewrite` of every ``texts[i]`` with its reference ``images[i]`` (placed
    before the text), as one batch. ``system_prompt`` follows `verifi_rewrite`: None is the
    default Verifi prompt, an empty string sends none. ``seeds`` is accepted for the
    `unifusion.train.cache_build.VerifiBatch` signature; greedy decoding draws no random numbers."""
    if images is None:
        images = [()] * len(texts)
    if len(images) != len(texts) or not texts:
        raise InputError(f"verifi_rewrite_batch needs one image list per text, got {len(texts)} texts and "
                         f"{len(images)} image lists")
    contents = [images_then_text(to_pil_list(list(pics)), text or "") for text, pics in zip(texts, images)]
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else (system_prompt.strip() or None)
    prompt = build_prompts(vlm, contents, system_prompt=system, add_generation_prompt=True, max_tiles=max_tiles,
                           max_length=vlm.max_length - max_new_tokens - 1, padding_side="left")
    eos = eos_token_ids(vlm)
    pad = pad_token_id(vlm)
    with torch.no_grad(), LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture:
        sequence = vlm.model.generate(
            **prompt.model_kwargs(device=vlm.device, dtype=vlm.dtype), max_new_tokens=max_new_tokens + 1,
            eos_token_id=eos or None, pad_token_id=pad, do_sample=False, temperature=None, top_p=None, top_k=None,
        )
    states = capture.stacked()  # (B, P + fed back tokens, L, H)
    return [_result(vlm, prompt, states, sequence, b, set(eos), max_new_tokens) for b in range(len(texts))]
