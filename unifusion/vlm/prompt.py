"""Build a VLM chat with the model's own chat template, plus a role for every token.

The template is rendered twice: once with unique marker strings in place of the
system and user texts, which shows where the template puts them and what it writes
around them, and once with the real texts. The rendered string is tokenised in one go
(the tokenisation the model was trained on) and each token gets the role of the
characters it covers: ``system`` (system prompt), ``instruction`` (user text),
``image`` or ``template`` (role headers, separators, the template's own default system
prompt, the generation prompt).

``is_image`` covers the tokens that receive vision features *and* the start/end
markers around each image (InternVL ``<img>``/``</img>``, Qwen
``<|vision_start|>``/``<|vision_end|>``): the markers belong to the image block and
separate consecutive images once the kept tokens are compacted for the DiT.
``image_token_counts`` counts the feature tokens alone. ``frame_positions`` places the
feature tokens that cover a whole image in a grid (InternVL: the single tile or the
thumbnail, which comes last; Qwen: every token of the image) at their (row, column)
centre as fractions of the image, for a DiT that lays them over its latent grid.

Image placeholders are expanded in token-id space (one template placeholder ->
``<img>`` + ``<IMG_CONTEXT>`` x (256 per tile) + ``</img>`` for InternVL, ``<|image_pad|>``
x (grid / merge^2) for Qwen), so each image gets its own tile budget.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import InputError
from .images import max_pixels_for_tiles, to_pil
from .loader import LoadedVLM

logger = logging.getLogger(__name__)

ROLES = ("template", "system", "instruction", "image")
_TEMPLATE, _SYSTEM, _INSTRUCTION, _IMAGE = range(4)
_MARK = "\u27e6UF{}\u27e7"  # unlikely in any prompt, untouched by trim/strip
_MARK_RE = re.compile("\u27e6UF(\\d+)\u27e7")


@dataclass
class PromptInputs:
    """A padded batch of chats ready for the VLM, with per-token roles (all ``(B, S)``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # bool
    is_image: torch.Tensor
    is_system: torch.Tensor
    is_instruction: torch.Tensor
    is_template: torch.Tensor
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    texts: list[str] = field(default_factory=list)  # rendered chats, one placeholder per image
    image_token_counts: list[list[int]] = field(default_factory=list)  # feature tokens per image, per chat
    frame_positions: torch.Tensor | None = None  # (B, S, 2) float (row, column) fractions, NaN off the frame grid

    def model_kwargs(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Keyword arguments for the VLM's forward or ``generate``."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask.long()}
        for key, value in self.image_inputs.items():
            kwargs[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        return {k: v.to(device) if device is not None else v for k, v in kwargs.items()}


@dataclass
class _Chat:
    ids: list[int]
    roles: list[int]
    text: str
    image_counts: list[int]
    image_tensors: list[dict[str, torch.Tensor]]
    places: list[tuple[float, float]]  # per token: (row, column) fraction on its image's frame grid, or NaN


class _Images:
    """How one family turns an image into pixel inputs and placeholder token ids."""

    def __init__(self, vlm: LoadedVLM) -> None:
        config, tokenizer = vlm.model.config, vlm.tokenizer
        self.family = vlm.family
        self.processor = vlm.image_processor
        self.image_id = getattr(config, "image_token_id", None)
        if self.family == "internvl":
            self.start_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "start_image_token", "<img>"))
            self.end_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "end_image_token", "</img>"))
            vision = config.vision_config
            size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
            patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
            self.tokens_per_tile = int((size // patch) ** 2 * config.downsample_ratio**2)
        elif self.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            self.start_id = config.vision_start_token_id
            self.end_id = config.vision_end_token_id
        else:
            self.start_id = self.end_id = None
        self.marker_ids = {i for i in (self.image_id, self.start_id, self.end_id) if i is not None}
        self.marker_texts = [tokenizer.convert_ids_to_tokens(i) for i in self.marker_ids]

    @property
    def supported(self) -> bool:
        return self.family in ("internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl") and self.processor is not None

    def process(self, image: Image.Image, max_tiles: int
                ) -> tuple[list[int], int, dict[str, torch.Tensor], tuple[int, int]]:
        """(ids replacing the one template placeholder, feature-token count, pixel tensors, (rows, columns)
        of the grid the image's last feature tokens lay over the whole image)."""
        if self.family == "internvl":
            out = self.processor(images=[image], crop_to_patches=max_tiles > 1, max_patches=max_tiles,
                                 return_tensors="pt")
            count = int(out["num_patches"][0]) * self.tokens_per_tile
            side = math.isqrt(self.tokens_per_tile)
            frame = (side, side) if side * side == self.tokens_per_tile else (0, 0)
            return [self.start_id] + [self.image_id] * count + [self.end_id], count, {
                "pixel_values": out["pixel_values"]}, frame
        size = dict(self.processor.size)
        size["longest_edge"] = max(max_pixels_for_tiles(max_tiles), int(size.get("shortest_edge") or 0))
        out = self.processor(images=[image], size=size, return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        merge = self.processor.merge_size
        count = t * h * w // merge**2
        frame = (h // merge, w // merge) if t == 1 else (0, 0)
        return [self.image_id] * count, count, {"pixel_values": out["pixel_values"],
                                                "image_grid_thw": out["image_grid_thw"]}, frame


_NO_PLACE = (math.nan, math.nan)


def frame_places(ids: list[int], image_id: int, frame: tuple[int, int]) -> list[tuple[float, float]]:
    """Per id of one expanded image: the (row, column) centre fraction of each of the last
    ``rows * columns`` feature tokens on the frame grid (row-major), NaN for the others."""
    rows, cols = frame
    places = [_NO_PLACE] * len(ids)
    features = [i for i, token in enumerate(ids) if token == image_id]
    if rows * cols == 0 or len(features) < rows * cols:
        return places
    for k, index in enumerate(features[len(features) - rows * cols:]):
        places[index] = ((k // cols + 0.5) / rows, (k % cols + 0.5) / cols)
    return places


def _messages(system_prompt: str | None, content: list[Any], texts: list[str], as_string: bool) -> list[dict]:
    """Chat messages where text item i reads texts[i]; images become {"type": "image"}."""
    it = iter(texts)
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": next(it) if as_string else [{"type": "text", "text": next(it)}]})
    if as_string:
        messages.append({"role": "user", "content": "".join(it)})
    else:
        messages.append({"role": "user", "content": [
            {"type": "text", "text": next(it)} if isinstance(item, str) else {"type": "image"} for item in content]})
    return messages


def _render_marked(tokenizer: Any, system_prompt: str | None, content: list[Any], marks: list[str],
                   generation: bool) -> tuple[str, bool]:
    """The chat rendered with marker texts, and whether the contents are plain strings.

    Text-only chats try plain strings first (every template takes them), then content
    lists; a render that shows a content list's Python repr is rejected."""
    from jinja2 import TemplateError

    has_images = any(not isinstance(c, str) for c in content)
    for as_string in (False,) if has_images else (True, False):
        try:
            marked = tokenizer.apply_chat_template(_messages(system_prompt, content, marks, as_string),
                                                   tokenize=False, add_generation_prompt=generation)
        except (TemplateError, TypeError, KeyError, IndexError):
            continue
        found = [int(m) for m in _MARK_RE.findall(marked)]
        if found == list(range(len(marks))) and "{'type'" not in marked:
            return marked, as_string
    raise InputError(
        "the model's chat template does not show each prompt text exactly once (it drops, repeats or reorders "
        "them); use a VLM whose template renders system and user text items"
    )


class TemplateText(str):
    """User-message text the pack writes around the user's own (the ``Image-k: `` labels): rendered in
    the user message like any text, but its tokens take the ``template`` role, so the DiT's plain
    condition (image and instruction tokens) leaves them out and an over-long chat never drops them."""


def _render(tokenizer: Any, system_prompt: str | None, content: list[Any], generation: bool,
            ) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered chat and the character spans (start, end, role) of the system and user texts."""
    user_texts = [c for c in content if isinstance(c, str)]
    texts = ([system_prompt] if system_prompt is not None else []) + user_texts
    roles = [_SYSTEM] * (len(texts) - len(user_texts)) + [
        _TEMPLATE if isinstance(c, TemplateText) else _INSTRUCTION for c in user_texts]
    marks = [_MARK.format(i) for i in range(len(texts))]
    marked, as_string = _render_marked(tokenizer, system_prompt, content, marks, generation)
    real = tokenizer.apply_chat_template(_messages(system_prompt, content, texts, as_string), tokenize=False,
                                         add_generation_prompt=generation)
    pieces = _MARK_RE.split(marked)[::2]  # template text around the markers
    spans, assembled = [], pieces[0]
    for text, role, piece in zip(texts, roles, pieces[1:]):
        spans.append((len(assembled), len(assembled) + len(text), role))
        assembled += text + piece
    if assembled == real:
        return real, spans
    # The template changed the texts (e.g. stripped them): template pieces are unchanged, so
    # each text starts right after its piece and ends where the next piece begins.
    spans, pos = [], len(pieces[0])
    for index, (role, piece) in enumerate(zip(roles, pieces[1:])):
        end = real.find(piece, pos) if index < len(roles) - 1 else len(real) - len(piece)
        if end < pos or not real.endswith(pieces[-1]):
            raise InputError("cannot locate the prompt texts in the rendered chat template")
        spans.append((pos, end, role))
        pos = end + len(piece)
    return real, spans


def _token_roles(tokenizer: Any, text: str, spans: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Tokenise the whole chat at once; a token takes the role of the text span it overlaps.
    Tokenizers without offsets (slow ones) tokenise span by span instead."""
    if not getattr(tokenizer, "is_fast", False):
        ids, roles, pos = [], [], 0
        for start, end, role in sorted(spans) + [(len(text), len(text), _TEMPLATE)]:
            for chunk, chunk_role in ((text[pos:start], _TEMPLATE), (text[start:end], role)):
                part = tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else []
                ids += part
                roles += [chunk_role] * len(part)
            pos = end
        return ids, roles
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    roles = []
    for start, end in encoded["offset_mapping"]:
        role = _TEMPLATE
        for s, e, span_role in spans:
            if start < e and end > s:
                role = max(role, span_role)
        roles.append(role)
    return list(encoded["input_ids"]), roles


def _check_content(content: Sequence[Any], markers: list[str]) -> list[Any]:
    items = []
    for item in content:
        if isinstance(item, str):
            bad = [m for m in markers if m and m in item]
            if bad:
                raise InputError(f"prompt text contains the image token(s) {bad}; pass images as images, not as text")
            if item:
                items.append(item)
        elif item is not None:
            items.append(item)
    return items


def _build_chat(vlm: LoadedVLM, images: _Images, content: Sequence[Any], system_prompt: str | None,
                generation: bool, max_tiles: list[int]) -> _Chat:
    items = _check_content(content, images.marker_texts)
    pictures = [to_pil(item, name=f"image {i}") for i, item in enumerate(x for x in items if not isinstance(x, str))]
    if pictures and not images.supported:
        raise InputError(f"images are supported for InternVL and Qwen-VL models; this {vlm.family} model can "
                         "only encode text")
    text, spans = _render(vlm.tokenizer, system_prompt, items, generation)
    raw_ids, raw_roles = _token_roles(vlm.tokenizer, text, spans)
    placeholders = sum(1 for i in raw_ids if i == images.image_id)
    if placeholders != len(pictures):
        raise InputError(f"the chat template wrote {placeholders} image placeholders for {len(pictures)} images")
    ids, roles, counts, tensors, places = [], [], [], [], []
    pending = iter(zip(pictures, max_tiles))
    for token, role in zip(raw_ids, raw_roles):
        if token == images.image_id and pictures:
            picture, tiles = next(pending)
            expanded, count, pixels, frame = images.process(picture, tiles)
            ids += expanded
            roles += [_IMAGE] * len(expanded)
            places += frame_places(expanded, images.image_id, frame)
            counts.append(count)
            tensors.append(pixels)
        else:
            ids.append(token)
            roles.append(_IMAGE if token in images.marker_ids and pictures else role)
            places.append(_NO_PLACE)
    return _Chat(ids, roles, text, counts, tensors, places)


def _truncate(chat: _Chat, limit: int, index: int) -> None:
    """Drop the last user-text tokens until the chat fits; template and image tokens stay."""
    excess = len(chat.ids) - limit
    if excess <= 0:
        return
    text_positions = [i for i, r in enumerate(chat.roles) if r == _INSTRUCTION]
    if len(text_positions) < excess:
        raise InputError(
            f"prompt {index} needs {len(chat.ids) - len(text_positions)} tokens without its text, more than the "
            f"limit of {limit}; use fewer images or a smaller max_tiles"
        )
    drop = set(text_positions[-excess:])
    logger.warning("prompt %d is %d tokens, over the limit of %d: dropped its last %d text tokens",
                   index, len(chat.ids), limit, excess)
    chat.ids = [t for i, t in enumerate(chat.ids) if i not in drop]
    chat.roles = [r for i, r in enumerate(chat.roles) if i not in drop]
    chat.places = [p for i, p in enumerate(chat.places) if i not in drop]


def _tiles_per_image(max_tiles: int | Sequence[int], total: int) -> list[int]:
    if isinstance(max_tiles, int):
        tiles = [max_tiles] * total
    else:
        tiles = [int(t) for t in max_tiles]
        if len(tiles) != total:
            raise InputError(f"max_tiles lists {len(tiles)} values for {total} images; give one per image or an int")
    if any(t < 1 for t in tiles):
        raise InputError(f"max_tiles must be >= 1 for every image, got {tiles}")
    return tiles


IMAGE_LABEL = "Image-{}: "  # how InternVL's multi-image chat names each image in its user text


def images_then_text(pictures: Sequence[Any], text: str | None) -> list[Any]:
    """User content for reference images followed by an instruction (None: images alone).

    Several images each come after a label (``Image-1: <image>``, ``Image-2: <image>``, one per
    line, as InternVL's multi-image chat writes them), so an instruction's "image 2" has tokens to
    match instead of a block position to count; a single image goes unlabelled, as there. The labels are
    `TemplateText`: the pack's scaffolding, not the user's instruction."""
    content: list[Any] = []
    for number, picture in enumerate(pictures, start=1):
        if len(pictures) > 1:
            content += [TemplateText(IMAGE_LABEL.format(number)), picture, TemplateText("\n")]
        else:
            content.append(picture)
    return content + ([text] if text is not None else [])


def build_prompts(
    vlm: LoadedVLM,
    contents: Sequence[Sequence[Any]],
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
    max_tiles: int | Sequence[int] = 6,
    max_length: int | None = None,
    padding_side: str = "right",
) -> PromptInputs:
    """Chats for a batch of user contents (each a list interleaving str and images).

    `max_tiles` is an int or one value per image in order across the batch. Chats longer
    than `max_length` (default: the model's limit) lose the end of their user text, with a
    logged warning. Right padding keeps causal states of real tokens identical to an
    unpadded forward; use ``padding_side="left"`` for batched generation.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    images = _Images(vlm)
    n_images = [sum(1 for c in content if c is not None and not isinstance(c, str)) for content in contents]
    tiles = iter(_tiles_per_image(max_tiles, sum(n_images)))
    limit = min(max_length or vlm.max_length, vlm.max_length)
    chats = []
    for index, (content, count) in enumerate(zip(contents, n_images)):
        chat = _build_chat(vlm, images, content, system_prompt, add_generation_prompt,
                           [next(tiles) for _ in range(count)])
        _truncate(chat, limit, index)
        chats.append(chat)
    return _pad(vlm, images, chats, padding_side)


def build_prompt(
    vlm: LoadedVLM,
    content: Sequence[Any],
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
    max_tiles: int | Sequence[int] = 6,
    max_length: int | None = None,
) -> PromptInputs:
    """One chat (batch of 1); see `build_prompts`."""
    return build_prompts(vlm, [content], system_prompt, add_generation_prompt, max_tiles, max_length)


def _pad(vlm: LoadedVLM, images: _Images, chats: list[_Chat], side: str) -> PromptInputs:
    tokenizer = vlm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    length = max(len(c.ids) for c in chats)
    ids = torch.full((len(chats), length), pad_id, dtype=torch.long)
    roles = torch.full((len(chats), length), -1, dtype=torch.long)
    places = torch.full((len(chats), length, 2), math.nan)
    for b, chat in enumerate(chats):
        window = slice(0, len(chat.ids)) if side == "right" else slice(length - len(chat.ids), length)
        ids[b, window] = torch.tensor(chat.ids, dtype=torch.long)
        roles[b, window] = torch.tensor(chat.roles, dtype=torch.long)
        places[b, window] = torch.tensor(chat.places, dtype=torch.float32).reshape(-1, 2)
    tensors = [t for chat in chats for t in chat.image_tensors]
    image_inputs = {key: torch.cat([t[key] for t in tensors]) for key in tensors[0]} if tensors else {}
    if tensors and images.family != "internvl":
        image_inputs["mm_token_type_ids"] = (ids == images.image_id).int()  # Qwen 3D RoPE needs it
    return PromptInputs(
        input_ids=ids,
        attention_mask=roles >= 0,
        is_image=roles == _IMAGE,
        is_system=roles == _SYSTEM,
        is_instruction=roles == _INSTRUCTION,
        is_template=roles == _TEMPLATE,
        image_inputs=image_inputs,
        texts=[c.text for c in chats],
        image_token_counts=[c.image_counts for c in chats],
        frame_positions=places,
    )
