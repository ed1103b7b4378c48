"""Tiny random VLMs of real transformers architectures, saved as loadable folders.

Nothing here downloads: the tokenizer is a word-level `tokenizers` model built from a
word list, the weights are random, and the processor files are written from config
classes. Tests and the demo use these folders exactly like real checkpoints
(``load_vlm(folder)``); the demo passes its own word list through ``vocab``.

InternVL note: ``InternVLProcessor`` insists on a video processor that needs
torchvision, so the folder holds the tokenizer (with the ``<img>``/``</img>``/
``<IMG_CONTEXT>`` tokens named as ``start_image_token`` / ``end_image_token`` /
``context_image_token``, like the official ``-hf`` conversions) and the GotOcr2 image
processor as separate files; `unifusion.vlm.prompt` expands the image tokens itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl")

# Words a prompt in the tests or a quick try is likely to use; callers replace it via `vocab`.
DEFAULT_WORDS = """
a an the of and or with without in on at to from by for is are be this that it its
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
circle square triangle star heart hexagon ring cross dot line shape shapes object objects
cat dog bird fish horse tree house car boat flower sun moon sky sea mountain city street
cats dogs birds trees houses cars boats flowers circles squares triangles stars rings
small big large tiny huge medium left right top bottom middle center above below next near
one two three four five six seven eight nine ten many few some no zero
photo picture image painting drawing sketch render scene background foreground style
make turn change add remove replace move put keep into onto over under behind front
describe rewrite detailed prompt caption edit instruction please show draw
you are helpful assistant user system
, . ! ? : ; - ' "
""".split()

INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-VL's template, including its default system prompt when none is given.
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL instruct template (tool calling left out): no default system prompt.
QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]


@dataclass(frozen=True)
class _Family:
    specials: list[str]  # ids 0.. in this order
    named: dict[str, str]  # tokenizer attributes, e.g. start_image_token
    template: str
    pad: str
    eos: str
    bos: str | None
    build: Callable[["_Sizes", dict[str, int]], tuple[PreTrainedConfig, type]]
    image_processor: Callable[["_Sizes"], object]


@dataclass(frozen=True)
class _Sizes:
    vocab_size: int
    num_layers: int
    hidden_size: int
    image_size: int
    vision_hidden_size: int = 32
    vision_layers: int = 2
    patches_per_side: int = 8  # InternVL: patches per tile side; the 0.5 pixel shuffle halves it

    @property
    def heads(self) -> int:
        return max(1, self.hidden_size // 16)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def kv_heads(self) -> int:
        return self.heads // 2 if self.heads % 2 == 0 else self.heads

    @property
    def mrope_section(self) -> list[int]:
        # Sums to head_dim / 2, the split of rotary frequencies over (time, row, column).
        half = self.head_dim // 2
        t = half // 4 or 1
        h = (half - t) // 2
        return [t, h, half - t - h]

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_hidden_size // 16)

    @property
    def qwen_vision(self) -> dict[str, Any]:
        """The vision-tower sizes both Qwen families spell the same way."""
        return dict(depth=self.vision_layers, hidden_size=self.vision_hidden_size,
                    intermediate_size=2 * self.vision_hidden_size, num_heads=self.vision_heads,
                    out_hidden_size=self.hidden_size, spatial_merge_size=2, temporal_patch_size=2)


def _internvl(s: _Sizes, ids: dict[str, int]) -> tuple[PreTrainedConfig, type]:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig

    # InternVL2.5-8B's language model is InternLM2.5 converted to the Llama layout.
    text = LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=2 * s.hidden_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048, bos_token_id=ids["<s>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["</s>"], tie_word_embeddings=False,
    )
    patch = s.image_size // s.patches_per_side  # e.g. 8x8 patches per tile -> 16 tokens after the 0.5 pixel shuffle
    vision = InternVLVisionConfig(
        hidden_size=s.vision_hidden_size, num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        intermediate_size=2 * s.vision_hidden_size, image_size=s.image_size, patch_size=patch,
    )
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=(s.patches_per_side // 2) ** 2, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    return config, InternVLForConditionalGeneration


def _qwen_text(s: _Sizes, ids: dict[str, int]) -> dict:
    return dict(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=2 * s.hidden_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _qwen_ids(ids: dict[str, int]) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen2_5_vl(s: _Sizes, ids: dict[str, int]) -> tuple[PreTrainedConfig, type]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _qwen_text(s, ids)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": s.mrope_section}
    vision = dict(s.qwen_vision, patch_size=14, window_size=56, fullatt_block_indexes=[s.vision_layers - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(ids))
    return config, Qwen2_5_VLForConditionalGeneration


def _qwen3_vl(s: _Sizes, ids: dict[str, int]) -> tuple[PreTrainedConfig, type]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _qwen_text(s, ids)
    text["head_dim"] = s.head_dim
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": s.mrope_section,
                               "mrope_interleaved": True}
    vision = dict(s.qwen_vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(ids))
    return config, Qwen3VLForConditionalGeneration


def _gotocr2_processor(s: _Sizes) -> object:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": s.image_size, "width": s.image_size}, crop_to_patches=True, min_patches=1, max_patches=12,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )


def _qwen_processor(patch: int) -> Callable[[_Sizes], object]:
    def make(s: _Sizes) -> object:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        unit = patch * 2  # pixels per LM token side (patch x spatial merge)
        return Qwen2VLImageProcessorPil(
            patch_size=patch, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 4 * unit * unit, "longest_edge": 256 * unit * unit},
        )

    return make


_FAMILIES: dict[str, _Family] = {
    "internvl": _Family(
        specials=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<video>"],
        named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"},
        template=INTERNVL_TEMPLATE, pad="</s>", eos="<|im_end|>", bos="<s>",
        build=_internvl, image_processor=_gotocr2_processor,
    ),
    "qwen2_5_vl": _Family(
        specials=_QWEN_SPECIALS, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        template=QWEN2_5_VL_TEMPLATE, pad="<|endoftext|>", eos="<|im_end|>", bos=None,
        build=_qwen2_5_vl, image_processor=_qwen_processor(14),
    ),
    "qwen3_vl": _Family(
        specials=_QWEN_SPECIALS, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        template=QWEN3_VL_TEMPLATE, pad="<|endoftext|>", eos="<|im_end|>", bos=None,
        build=_qwen3_vl, image_processor=_qwen_processor(16),
    ),
}


class TinyVLMError(ValueError):
    """The tiny model cannot be built as asked; the message says what to change."""


def _words(vocab: Sequence[str] | None, template: str) -> list[str]:
    """Lower-cased, de-duplicated word list plus the words the chat template writes itself."""
    source = list(DEFAULT_WORDS if vocab is None else vocab)
    literal = re.sub(r"\{[%{#].*?[%}#]\}|<\|[^|]*\|>|<[^<>\s]+>", " ", template)
    splitter = pre_tokenizers.Whitespace()
    extra = [w for w, _ in splitter.pre_tokenize_str(literal.replace("\\n", " ").lower())]
    out: list[str] = []
    seen: set[str] = set()
    for word in source + extra + ["user", "assistant", "system"]:
        for piece, _ in splitter.pre_tokenize_str(str(word).lower()):
            if piece not in seen:
                seen.add(piece)
                out.append(piece)
    return out


def build_tokenizer(family: str, vocab: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) with the
    family's special and image tokens added by name and its chat template set."""
    spec = _family(family)
    words = [w for w in _words(vocab, spec.template) if w not in spec.specials]
    table = {t: i for i, t in enumerate(spec.specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    named = dict(spec.named)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token=spec.pad, eos_token=spec.eos, bos_token=spec.bos,
        model_max_length=2048, extra_special_tokens=named,
    )
    others = [t for t in spec.specials if t not in {spec.pad, spec.eos, spec.bos, "<unk>", *named.values()}]
    tokenizer.add_special_tokens({"additional_special_tokens": others})
    tokenizer.chat_template = spec.template
    return tokenizer


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise TinyVLMError(f"unknown tiny VLM family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _FAMILIES[family]


def build_tiny_vlm(
    folder: str | Path,
    family: str,
    seed: int = 0,
    vocab: list[str] | None = None,
    num_layers: int = 8,
    hidden_size: int = 64,
    image_size: int = 448,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    patches_per_side: int = 8,
) -> Path:
    """Save a tiny random `family` VLM (config, safetensors, tokenizer, image processor,
    chat template) to `folder` and return it. `image_size` is InternVL's tile size; the Qwen
    families keep their native patch sizes (14 and 16) and cap pixels in the processor."""
    spec = _family(family)
    if hidden_size % 16 or hidden_size < 32:
        raise TinyVLMError(f"hidden_size must be a multiple of 16 and >= 32 (16-wide heads), got {hidden_size}")
    if num_layers < 1:
        raise TinyVLMError(f"num_layers must be >= 1, got {num_layers}")
    if patches_per_side < 2 or patches_per_side % 2 or image_size % patches_per_side:
        raise TinyVLMError(f"image_size must split into an even number of patches per side (patches_per_side, "
                           f"at least 2), got image_size {image_size} and patches_per_side {patches_per_side}")
    if vision_hidden_size % 16 or vision_hidden_size < 32 or vision_layers < 1:
        raise TinyVLMError(f"vision_hidden_size must be a multiple of 16 and >= 32, vision_layers >= 1; got "
                           f"{vision_hidden_size} and {vision_layers}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, vocab)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    sizes = _Sizes(vocab_size=len(tokenizer), num_layers=num_layers, hidden_size=hidden_size, image_size=image_size,
                   vision_hidden_size=vision_hidden_size, vision_layers=vision_layers,
                   patches_per_side=patches_per_side)
    config, model_class = spec.build(sizes, ids)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = ids[spec.eos]
    model.generation_config.pad_token_id = ids[spec.pad]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    spec.image_processor(sizes).save_pretrained(folder)
    logger.info("saved tiny %s VLM (%d layers, width %d) to %s", family, num_layers, hidden_size, folder)
    return folder
