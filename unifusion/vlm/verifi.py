"""Verifi: the VLM rewrites the prompt in one ``generate`` pass, and the DiT is conditioned
on the selected-layer states of the tokens it generated (plus the image tokens).

No second encode: forward hooks (`LayerCapture`) record the selected decoder layers of
every forward that ``generate`` runs. The prefill forward gives the whole chat (system
prompt, images, instruction, template); each decoded step gives one new token.

The last token. A generated token's states come from the forward that *consumes* it,
and ``generate`` never feeds its final token back. We therefore ask for
``max_new_tokens + 1`` tokens and drop the extra one: the forward that produced it is
exactly the cached step that the last kept token needed. This is chosen over a
hand-made extra cached step because ``generate`` already builds the right inputs for
that step on every family (Qwen's 3D RoPE ``rope_deltas`` and ``mm_token_type_ids``,
cache positions, attention masks), so nothing model-specific is re-implemented here.
The first ``n`` tokens equal those of an ``n``-token run: greedy decoding is
deterministic, and seeded sampling draws the same random numbers for the same steps.
The extra cost is one decode step plus one LM-head projection.

Stops. If the model ends its answer (EOS / end-of-turn) first, the tokens before the
EOS are kept; the EOS itself is neither text nor a condition token, and since it was
never fed back it has no states anyway. In general the kept count is
``min(max_new_tokens, tokens before the first EOS, tokens that were fed back)``.

Forced answers. `forced_rewrite` runs the same chat with a given answer appended, in one
forward: for training data whose image a description fits, it gives the features Verifi would
capture had the VLM written that description, without the details a rewrite of a short caption
would invent. `forced_rewrite_batch` runs many such chats in one right-padded forward.

Seeds. Sampling uses the global generator of the model's device (transformers takes no
generator argument), so the seed is set inside `torch.random.fork_rng` for that device
only; the caller's RNG state is restored afterwards, also on errors.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import InputError
from .encode import VLMFeatures, paper_keep
from .images import to_pil_list
from .layers import LayerCapture, LayerCaptureError
from .loader import LoadedVLM
from .prompt import PromptInputs, build_prompt, images_then_text

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You write prompts for an image generator. Rewrite the user's request as one detailed, fully specified "
    "description of the image to generate: name every object with its colour, shape, size, count and position, "
    "then the background and the style. If reference images are given, say what to keep from them and what to "
    "change. Reply with the description only."
)


@dataclass
class VerifiResult:
    """A rewritten prompt and the features that condition the DiT on it."""

    text: str  # rewritten prompt, special tokens stripped
    features: VLMFeatures  # whole sequence; keep = image tokens + generated tokens
    generated_token_count: int  # kept generated tokens (EOS and the look-ahead token excluded)
    token_ids: torch.Tensor  # (generated_token_count,) the kept generated ids
    finished: bool  # the answer is complete: EOS within max_new_tokens or as the look-ahead token


class _Progress(StoppingCriteria):
    """Calls ``callback(step, total)`` after each kept generated token; never stops generation
    itself, but an exception from the callback (an interrupt) aborts ``generate``."""

    def __init__(self, callback: Callable[[int, int], None], prompt_length: int, total: int) -> None:
        self.callback, self.prompt_length, self.total = callback, prompt_length, total

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        if step <= self.total:
            self.callback(step, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def eos_token_ids(vlm: LoadedVLM) -> list[int]:
    """End-of-answer ids: the generation config's (Qwen lists several) and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(vlm.model.generation_config, "eos_token_id", None), vlm.tokenizer.eos_token_id):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def pad_token_id(vlm: LoadedVLM) -> int | None:
    """The id that pads rows: the tokenizer's pad token, else the first end-of-answer id (None if neither)."""
    if vlm.tokenizer.pad_token_id is not None:
        return int(vlm.tokenizer.pad_token_id)
    eos = eos_token_ids(vlm)
    return eos[0] if eos else None


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that sampling on `device` uses, and restore it (and the CPU's) on exit."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), module.device(index):
        torch.random.default_generator.manual_seed(seed)
        module.manual_seed(seed)  # current device only
        yield


def _sampling(do_sample: bool, temperature: float, top_p: float) -> dict[str, Any]:
    """Explicit settings that override the model's generation config (which may, e.g.,
    turn sampling on or set top_k); None clears a value for greedy decoding."""
    if not do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if not temperature > 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}


def kept_count(generated: list[int], eos: set[int], max_new_tokens: int, fed_back: int) -> tuple[int, bool]:
    """(how many generated tokens to keep, whether the answer is complete).

    `fed_back` is how many generated tokens went through a forward (have states). An EOS
    as the look-ahead token (right after the budget) also marks a complete answer."""
    first_eos = next((i for i, t in enumerate(generated) if t in eos), None)
    limit = min(max_new_tokens, fed_back, len(generated))
    if first_eos is not None and first_eos <= limit:
        return first_eos, True
    return limit, False


def extend_positions(positions: Optional[torch.Tensor], kept: int, device: torch.device) -> Optional[torch.Tensor]:
    """Prompt frame positions (B, P, 2) followed by ``kept`` generated tokens without a place."""
    if positions is None:
        return None
    tail = torch.full((positions.shape[0], kept, 2), float("nan"))
    return torch.cat([positions.float().cpu(), tail], dim=1).to(device)


def _features(prompt: PromptInputs, states: torch.Tensor, sequence: torch.Tensor, kept: int, text: str,
              layers: tuple[int, ...]) -> VLMFeatures:
    """Features over prompt + kept tokens; keep = image tokens + generated tokens."""
    device = states.device

    def extend(mask: torch.Tensor, value: bool) -> torch.Tensor:  # (1, P) -> (1, P + kept)
        tail = torch.full((mask.shape[0], kept), value, dtype=torch.bool)
        return torch.cat([mask.cpu(), tail], dim=1).to(device)

    if kept:
        keep = extend(prompt.is_image & prompt.attention_mask, True)
    else:
        logger.warning("Verifi generated no tokens before the end of the answer; conditioning on the prompt "
                       "tokens instead (raise max_new_tokens or change the system prompt)")
        keep = extend(paper_keep(prompt), False)
    return VLMFeatures(
        features=states,
        attention_mask=extend(prompt.attention_mask, True),
        is_image=extend(prompt.is_image, False),
        keep=keep,
        input_ids=sequence.to(device),
        text=[text],
        layers=layers,
        is_system=extend(prompt.is_system, False),
        is_instruction=extend(prompt.is_instruction, False),
        is_template=extend(prompt.is_template, False),
        frame_positions=extend_positions(prompt.frame_positions, kept, device),
    )


def verifi_rewrite(
    vlm: LoadedVLM,
    text: str,
    images: Any = (),
    system_prompt: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    seed: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tiles: int | list[int] = 6,
    progress: Callable[[int, int], None] | None = None,
    min_new_tokens: int = 0,
) -> VerifiResult:
    """Rewrite `text` (with reference `images`, placed before it) and capture the condition
    features in the same ``generate`` pass.

    `system_prompt` None uses `DEFAULT_SYSTEM_PROMPT`; an empty string sends no system
    prompt (the chat template may add its own). `progress(step, total)` runs after each
    generated token and may raise to cancel; hooks are removed either way.
    `min_new_tokens` suppresses EOS for that many tokens (benchmarks use it to fix the length).
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = _rewrite_prompt(vlm, text, images, system_prompt, max_new_tokens + 1, max_tiles)
    eos = eos_token_ids(vlm)
    pad = pad_token_id(vlm)
    prompt_length = prompt.input_ids.shape[1]
    criteria = StoppingCriteriaList([_Progress(progress, prompt_length, max_new_tokens)] if progress else [])
    kwargs = prompt.model_kwargs(device=vlm.device, dtype=vlm.dtype)
    rng = seeded(vlm.device, seed) if do_sample else contextlib.nullcontext()
    with rng, LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture:
        sequence = vlm.model.generate(
            **kwargs, max_new_tokens=max_new_tokens + 1, min_new_tokens=min(min_new_tokens, max_new_tokens),
            eos_token_id=eos or None, pad_token_id=pad, stopping_criteria=criteria,
            **_sampling(do_sample, temperature, top_p),
        )
    states = capture.stacked()  # (1, P + fed back tokens, L, H)
    generated = sequence[0, prompt_length:].tolist()
    kept, finished = kept_count(generated, set(eos), max_new_tokens, states.shape[1] - prompt_length)
    length = prompt_length + kept
    if states.shape[1] < length:
        raise LayerCaptureError(f"captured {states.shape[1]} positions but need {length}; generate skipped a forward")
    token_ids = sequence[0, prompt_length:length].cpu()
    rewritten = vlm.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True).strip()
    logger.debug("Verifi kept %d generated tokens (finished=%s)", kept, finished)
    features = _features(prompt, states[:, :length], sequence[:, :length], kept, rewritten,
                         tuple(vlm.selected_layers))
    return VerifiResult(rewritten, features, kept, token_ids, finished)


def _rewrite_prompt(vlm: LoadedVLM, text: str, images: Any, system_prompt: str | None, answer_room: int,
                    max_tiles: int | list[int]) -> PromptInputs:
    """The chat a rewrite answers: system prompt, reference images, then the user's text, leaving
    ``answer_room`` tokens of the VLM's window for the answer."""
    pictures = to_pil_list(images)
    text = text or ""
    if not text.strip() and not pictures:
        raise InputError("Verifi got an empty prompt and no images; type a prompt or connect a reference image")
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else (system_prompt.strip() or None)
    room = vlm.max_length - answer_room
    if room < 1:
        raise InputError(f"an answer of {answer_room} tokens leaves no room for the prompt in this VLM's "
                         f"{vlm.max_length}-token window; lower max_new_tokens or shorten the rewrite")
    return build_prompt(vlm, images_then_text(pictures, text), system_prompt=system, add_generation_prompt=True,
                        max_tiles=max_tiles, max_length=room)


def forced_rewrite(
    vlm: LoadedVLM,
    text: str,
    answer: str,
    images: Any = (),
    system_prompt: str | None = None,
    max_tiles: int | list[int] = 6,
    max_new_tokens: int | None = None,
) -> VerifiResult:
    """Verifi features of a given rewrite: the chat of `verifi_rewrite` with ``answer`` as the
    VLM's reply, in one forward. An answer over ``max_new_tokens`` tokens is cut there, as
    generation would be (``finished`` False).

    For training data whose image a description fits (a dense caption, the demo world's
    detailed scene): a causal VLM gives an answer's tokens the same states whether it
    generated them or read them, so these are the features Verifi would capture had the VLM
    written ``answer``, without the rewrite inventing details the image does not show.
    """
    return forced_rewrite_batch(vlm, [text], [answer], [images], system_prompt=system_prompt, max_tiles=max_tiles,
                                max_new_tokens=max_new_tokens)[0]


def forced_rewrite_batch(
    vlm: LoadedVLM,
    texts: Sequence[str],
    answers: Sequence[str],
    image_lists: Sequence[Any] | None = None,
    system_prompt: str | None = None,
    max_tiles: int | list[int] = 6,
    max_new_tokens: int | None = None,
) -> list[VerifiResult]:
    """`forced_rewrite` of every ``(texts[i], answers[i], image_lists[i])`` in one forward.

    Each row is its own chat plus its answer, padded on the right: a causal VLM's real tokens
    never see the padding after them and keep their positions, so each row equals its own
    `forced_rewrite` up to float tolerance. Image inputs are concatenated in row order, the
    order of their placeholder tokens."""
    image_lists = [()] * len(texts) if image_lists is None else list(image_lists)
    if not texts or len(answers) != len(texts) or len(image_lists) != len(texts):
        raise InputError(f"forced_rewrite_batch needs one answer and one image list per text, got {len(texts)} "
                         f"texts, {len(answers)} answers and {len(image_lists)} image lists")
    rows = [_forced_row(vlm, text, answer, images, system_prompt, max_tiles, max_new_tokens)
            for text, answer, images in zip(texts, answers, image_lists)]
    kwargs = _pad_rows([row for _, row, _, _ in rows], vlm)
    with torch.no_grad(), LayerCapture(vlm.decoder_layers, vlm.selected_layers) as capture:
        vlm.model(**kwargs)
    states = capture.stacked()  # (B, T, L, H)
    results = []
    for b, (prompt, row, ids, finished) in enumerate(rows):
        sequence = row["input_ids"]  # (1, P + A)
        rewritten = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        features = _features(prompt, states[b:b + 1, :sequence.shape[1]], sequence, len(ids), rewritten,
                             tuple(vlm.selected_layers))
        results.append(VerifiResult(rewritten, features, len(ids), sequence[0, -len(ids):].cpu(), finished))
    return results


def _forced_row(vlm: LoadedVLM, text: str, answer: str, images: Any, system_prompt: str | None,
                max_tiles: int | list[int], max_new_tokens: int | None,
                ) -> tuple[PromptInputs, dict[str, Any], list[int], bool]:
    """(the chat, its forward kwargs with the answer appended, the answer ids kept, whether all were)."""
    ids = vlm.tokenizer(answer or "", add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError("forced_rewrite got an empty answer; give the description to condition on")
    finished = max_new_tokens is None or len(ids) <= max_new_tokens
    ids = ids if finished else ids[:max_new_tokens]
    prompt = _rewrite_prompt(vlm, text, images, system_prompt, len(ids), max_tiles)
    kwargs = prompt.model_kwargs(device=vlm.device, dtype=vlm.dtype)
    answer_ids = torch.tensor([ids], dtype=kwargs["input_ids"].dtype, device=kwargs["input_ids"].device)
    for key in _per_token_keys([kwargs]):  # the mask and any token-type ids grow with the answer
        if key != "input_ids":
            fill = torch.ones_like(answer_ids) if key == "attention_mask" else torch.zeros_like(answer_ids)
            kwargs[key] = torch.cat([kwargs[key], fill.to(kwargs[key].dtype)], dim=1)
    kwargs["input_ids"] = torch.cat([kwargs["input_ids"], answer_ids], dim=1)  # (1, P + A)
    return prompt, kwargs, ids, finished


def _per_token_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value is one entry per token in every row that has them (ids, mask, token
    types, which rows without images may lack)."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return [key for key in keys if all(
        torch.is_tensor(row[key]) and tuple(row[key].shape) == tuple(row["input_ids"].shape)
        for row in rows if key in row)]


def _pad_rows(rows: Sequence[dict[str, Any]], vlm: LoadedVLM) -> dict[str, Any]:
    """One batch from single-row kwargs: per-token tensors right-padded (the mask with 0, the ids
    with the pad id), image inputs concatenated in row order."""
    if len(rows) == 1:
        return dict(rows[0])
    width = max(row["input_ids"].shape[1] for row in rows)
    pad = pad_token_id(vlm)
    pad_id = 0 if pad is None else pad  # masked out: any id would do
    per_token = _per_token_keys(rows)
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        if key in per_token:  # a row without the key (no image: no token types) is all zeros
            fill = pad_id if key == "input_ids" else 0
            like = next(row[key] for row in rows if key in row)
            values = [F.pad(row[key], (0, width - row[key].shape[1]), value=fill) if key in row
                      else like.new_zeros((1, width)) for row in rows]
        else:
            values = [row[key] for row in rows if key in row]
        out[key] = torch.cat(values)
    return out


