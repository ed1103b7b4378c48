"""Train the tiny demo VLM: a real InternVL (-hf) model that captions and rewrites in the demo world.

The model is built by `build_tiny_vlm` (word-level tokenizer over the demo vocabulary, 64x64
tiles so one demo image is one tile of 16 tokens) and trained as a causal LM on three
Verifi-style tasks, all answered with the canonical detailed rewrite (`grammar.detailed`):

* captioning: an image alone -> its scene;
* rewriting: a paraphrased, possibly underspecified caption -> the scene;
* edit rewriting: a source image + an edit instruction -> the edited scene;
* composition rewriting: 2 or 3 one-shape images + an instruction that places them -> the combined
  scene. The DiT never trains on several references; this teaches the VLM, the stand-in for a
  pretrained one, to read several images, as a general VLM does.

Beside the answer loss, a scene read-out loss keeps every image's tokens telling shapes apart.

Every input is built by `unifusion.vlm.prompt.build_prompt` with the generation prompt, and
the answer ids plus the end-of-turn token follow it: exactly the sequence ``generate``
produces at inference, so the template seen in training is the one Verifi uses. Most
examples carry the fixed Verifi system prompt; a share carry none, because the feature
cache encodes captions and images without one. The loss covers the answer tokens only.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vlm.loader import LoadedVLM, load_vlm
from ..vlm.prompt import build_prompt, images_then_text
from ..vlm.tiny import build_tiny_vlm
from ..vlm.verifi import DEFAULT_SYSTEM_PROMPT
from .batch_verifi import verifi_rewrite_batch
from .grammar import VOCAB, GrammarError, parse_detailed, sample_compositions, sample_edits, sample_t2i, words
from .image_probe import CELL_CLASSES, cell_classes, projected_image_tokens
from .scorer import score_scene
from .world import GRID, SPLIT_SEEDS, Scene, SceneError, render

logger = logging.getLogger(__name__)

TASKS = ("caption", "rewrite", "edit", "compose")
IGNORE = -100


def demo_vocab() -> list[str]:
    """The demo grammar's words plus those of the Verifi system prompt, so that prompt
    tokenises into real words (a different system prompt can then steer the model)."""
    return list(dict.fromkeys(list(VOCAB) + words(DEFAULT_SYSTEM_PROMPT) + ["describe"]))


def normalise_rewrite(text: str) -> str:
    """A word-level tokenizer decodes with spaces around punctuation ('left , a'); the
    grammar writes 'left, a'. Re-attach , . : to the word before them."""
    return re.sub(r"\s+([,.:])", r"\1", " ".join(text.split()))


def parse_rewrite(text: str) -> Optional[Scene]:
    """The scene a decoded rewrite describes, or None when it does not follow the grammar."""
    try:
        return parse_detailed(normalise_rewrite(text))
    except (GrammarError, SceneError):  # SceneError: e.g. two shapes named in one cell
        return None


@dataclass(frozen=True)
class VLMTrainConfig:
    """Size and recipe of the demo VLM (defaults: the shipped model)."""

    num_layers: int = 12  # LAP pools layers 0, 4, 7, 10 (DemoRecipe.vlm_layers)
    hidden_size: int = 64
    # The vision tower (InternVL's own is 1024 wide, 24 layers). Wider did not read shapes better:
    # captions of 150 held-out images named the shape right in 52% at 32 x 2, 44% at 64 x 2, 51% at 96 x 4.
    vision_hidden_size: int = 32
    vision_layers: int = 2
    # InternVL tile side in pixels (the 64 px demo image is resized to it) and patches per tile side; the 0.5
    # pixel shuffle makes (patches_per_side / 2)^2 image tokens per tile. At 64 / 8 the 16 tokens cut the middle
    # cell's shape in four. 96 / 6 (16 px patches, one token per grid cell) read images worse: 200 held-out
    # images captioned exactly 23% against 38%, edits rewritten exactly 16.5% against 17.5%, rewrites 49% / 51%.
    # 64 / 16 (4 px patches: 64 tokens, one per latent cell) looked like 2.3x the CPU per training step (1.24 s
    # against 0.53 s, 30 steps each on one thread in a one-off script, not a benchmark); not trained.
    tile_size: int = 64
    patches_per_side: int = 8
    # Modules kept at their seeded random init (see `frozen_modules`). None: trained on these tasks, the image
    # path drops what tells shapes apart (`image_probe`: a linear read-out of the 16 image tokens, layer 0 for
    # LAP, names 77% of the shapes and 62% of 600 held-out scenes exactly; at the random init, 99% and 98%).
    # ("vision_tower", "multi_modal_projector") keeps it (99%, 98%; captions 38% -> 24% exact, rewrites
    # 51% -> 50%), yet the DiT did not learn to read those tokens: the full run on them reconstructed 0% of
    # scenes exactly from one tile (shapes 10%) and edited 2% (the shipped model: 12% and 8%).
    frozen: tuple[str, ...] = ()
    # Weight of a scene read-out loss beside the answer loss: a linear head (dropped after training) names
    # every grid cell's content from the flattened image tokens of each image shown, so the vision tower and
    # projector keep what tells shapes apart while they learn what the language model needs. At 1.0 (with
    # compositions, below) `image_probe` reads 98% of the shapes and 96% of the scenes back (77% and 62%
    # without); captions 35% exact (38%), rewrites 48% (51%), edit rewrites 20% (17.5%).
    image_readout_weight: float = 1.0
    # 3,600 (same mix, seed 0) binds attributes to shapes far better on 200 validation samples: captions 87.5%,
    # edit rewrites 46%, compositions 62% exact (2,400: 64.5 / 25.5 / 22.5%); seed 1: 81.5 / 42 / 38% (2,400:
    # 50.5 / 27 / 17.5%). The DiT on it doubles Verifi edits (49% against 29% on 96) but draws 7 points fewer
    # shapes from plain prompts (81% against 88%): kept at 2,400, see docs/demo_experiments.md, "undertrained".
    steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # Distinct training examples, cycled in seeded epochs. 8,000 (about ten epochs) overfit: 54% of training
    # images captioned exactly against 35% of held-out ones; 32,000 with more edits and compositions (below),
    # row-major: held-out captions 52%, edit rewrites 28%, compositions 29.5%.
    pool_size: int = 32000
    # caption, rewrite, edit, compose. Compositions (half with 2 images, half with 3) teach the VLM to read
    # several images: 17% of 200 two-image compositions rewritten exactly (1% without them). With the fixed
    # head, (0.18, 0.40, 0.26, 0.16) -> this mix: captions 52.5% -> 64.5% exact, edit rewrites 27% -> 25.5%,
    # compositions 19% -> 22.5%, rewrites 100% -> 99%; the DiT on it reconstructs and composes better
    # (docs/demo_experiments.md).
    # Seed 1 of this mix captioned 50.5% (edits 27%, compositions 17.5%): the caption gain is not the mix's alone.
    task_weights: tuple[float, ...] = (0.2, 0.3, 0.3, 0.2)
    no_system_prob: float = 0.2  # share of examples without the system prompt
    # "all": the VLM, standing in for a pretrained one that knows every word, also sees the colour/kind pairs
    # held out of the DiT's training split (world.HELDOUT_PAIRS), which then test the DiT alone; "train": unseen.
    split: str = "all"
    # Rewrites of a prompt list its shapes in the order the prompt names them (`T2ISample.rewrite`), so the
    # model copies them along; False: row-major, as captions of images do (`T2ISample.detailed`). First tried
    # with a trained LM head and 8,000 examples: on 200 validation prompts the rewrites got better (exact 51% ->
    # 83%, colours kept 88% -> 96%, shapes 83% -> 87%) but captions of images worse (38% -> 20% exact), and the
    # DiT on that VLM, through the same stages, reconstructed 0% of scenes from one tile (12%) and edited 4%
    # exactly (8%), while Verifi prompts went 91/68/98/98/100% -> 100/77/100/100/100% (colour, shape, size,
    # position, count; exact 58% -> 69%).
    # With task_weights (0.35, 0.45, 0.2) as well: rewrites 79%, captions 56%, edit rewrites 21% exact, but the
    # DiT on it (3,600 steps) drew plain prompts' shapes worse (72% against 87%, Verifi 67% against 76%).
    # Compositions too (`CompositionSample.rewrite`, since 2026-12-05): row-major, the VLM had to find which clause
    # names the first cell before reading that clause's image, and put each look in the other's place about as
    # often as in its own (on 100 validation compositions 19 exact and 15 with the two looks swapped; with the
    # references labelled "Image-1: ", "Image-2: " as well, 25 and 14).
    named_order: bool = True
    # The LM head's rows (one output embedding per word) fixed at seeded random unit vectors instead of trained.
    # Trained, the rows of the four shape words collapse together (cosine 0.99 between them in a failed
    # named-order VLM; colours 0.39), as captions, whose shapes the image path reads least surely, teach the
    # head to hedge among them; copying a shape word then waits for a sudden late step that some runs never
    # make. Named order with 32,000 examples, mix (0.18, 0.40, 0.26, 0.16), on one machine: trained head, seeds
    # 0 / 1 kept 24 / 12.5% of the shapes at step 600 and rewrote 21 / 14% of 200 validation prompts exactly;
    # fixed head, 83 / 87% at step 600, 100 / 100% exact at the end (captions 52.5 / 51%, edit rewrites 27 /
    # 29%, compositions 19 / 21%; the row-major VLM shipped before: 48, 35, 20, 17%).
    fixed_lm_head: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < len(self.task_weights) <= len(TASKS) or min(self.task_weights) < 0 or sum(self.task_weights) <= 0:
            raise ValueError(f"task_weights must be up to {len(TASKS)} non-negative weights for {TASKS} "
                             f"(missing ones are 0), got {self.task_weights}")
        if self.image_readout_weight < 0:
            raise ValueError(f"VLMTrainConfig.image_readout_weight must be >= 0, got {self.image_readout_weight}")
        for name in ("steps", "batch_size", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLMTrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LMExample:
    """One training sequence: prompt ids then answer ids; the loss starts at ``answer_start``."""

    input_ids: Tensor  # (T,) long
    answer_start: int
    pixel_values: Optional[Tensor]  # (n_tiles, 3, h, w) or None
    task: str
    system: bool  # carries the system prompt (examples are grouped by it to share the prefix)
    cells: Optional[Tensor] = None  # (images, GRID * GRID) long: `cell_classes` of each image, if any


def _example(vlm: LoadedVLM, text: Optional[str], images: Sequence[Scene], answer: str, system: Optional[str],
             task: str) -> LMExample:
    content = images_then_text([render(s) for s in images], text)
    prompt = build_prompt(vlm, content, system_prompt=system, add_generation_prompt=True, max_tiles=1)
    answer_ids = vlm.tokenizer(answer, add_special_tokens=False)["input_ids"] + [vlm.tokenizer.eos_token_id]
    ids = torch.cat([prompt.input_ids[0], torch.tensor(answer_ids, dtype=torch.long)])
    pixels = prompt.image_inputs.get("pixel_values")
    cells = torch.tensor([cell_classes(s) for s in images]) if images else None
    return LMExample(ids, int(prompt.input_ids.shape[1]), pixels, task, system is not None, cells)


def build_examples(vlm: LoadedVLM, count: int, seed: int, task_weights: Sequence[float] = (0.3, 0.45, 0.25, 0.0),
                   no_system_prob: float = 0.2, split: str = "all", named_order: bool = False) -> list[LMExample]:
    """``count`` examples drawn from seeded grammar streams; the task of each from ``task_weights``
    (one per `TASKS` entry, missing ones 0).
    Captions and edits answer with the row-major description; rewrites and compositions with
    the shapes in the order their prompt names them (``rewrite``) when ``named_order``, else the
    same row-major one."""
    rng = random.Random(seed)
    weights = tuple(task_weights) + (0.0,) * (len(TASKS) - len(task_weights))
    tasks = rng.choices(TASKS, weights=weights, k=count)
    n = {t: tasks.count(t) for t in TASKS}
    t2i = iter(sample_t2i(n["caption"] + n["rewrite"], seed, split))
    edits = iter(sample_edits(n["edit"], seed + 1, split))
    three = sample_compositions(n["compose"] // 2, seed + 3, refs=3, split=split)
    two = sample_compositions(n["compose"] - len(three), seed + 2, refs=2, split=split)
    compositions = iter([c for pair in itertools.zip_longest(two, three) for c in pair if c is not None])
    out = []
    for task in tasks:
        system = None if rng.random() < no_system_prob else DEFAULT_SYSTEM_PROMPT
        if task == "edit":
            e = next(edits)
            out.append(_example(vlm, e.instruction, [e.source], e.detailed, system, task))
            continue
        if task == "compose":
            c = next(compositions)
            answer = c.rewrite if named_order else c.detailed
            out.append(_example(vlm, c.instruction, c.sources, answer, system, task))
            continue
        s = next(t2i)
        if task == "caption":
            out.append(_example(vlm, None, [s.scene], s.detailed, system, task))
        else:
            out.append(_example(vlm, s.caption, [], s.rewrite if named_order else s.detailed, system, task))
    return out


def shared_prefix(examples: Sequence[LMExample], stop_ids: Sequence[int] = ()) -> int:
    """Length of the token prefix all ``examples`` share, ending before any answer token
    (and before any of ``stop_ids``, e.g. image tokens, which need their pixels)."""
    limit = min(e.answer_start for e in examples) - 1
    first = examples[0].input_ids
    length = 0
    while length < limit and int(first[length]) not in stop_ids and all(
            int(e.input_ids[length]) == int(first[length]) for e in examples[1:]):
        length += 1
    return length


def collate_lm(examples: Sequence[LMExample], pad_id: int, skip: int = 0) -> dict[str, Tensor]:
    """Right-padded ids (from position ``skip`` on), attention mask, next-token labels
    (answer only, ``IGNORE`` elsewhere) and the stacked pixels of the batch's images."""
    length = max(len(e.input_ids) for e in examples) - skip
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids) - skip
        ids[row, :n] = e.input_ids[skip:]
        mask[row, :n] = 1
        labels[row, e.answer_start - skip: n] = e.input_ids[e.answer_start:]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def answer_loss_sum(model: torch.nn.Module, examples: Sequence[LMExample], pad_id: int,
                    stop_ids: Sequence[int] = ()) -> tuple[Tensor, int]:
    """(summed cross-entropy of every answer token given everything before it, token count).

    The prefix all rows share (e.g. the system prompt) runs once with batch 1 and its key/value
    cache is repeated over the rows: the same numbers as a full forward per row, at a fraction
    of the cost, with gradients flowing back through the shared cache."""
    skip = shared_prefix(examples, stop_ids)
    batch = collate_lm(examples, pad_id, skip)
    labels = batch.pop("labels")
    if skip:
        prefix = examples[0].input_ids[None, :skip]  # (1, P)
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(examples))
        batch["attention_mask"] = torch.cat([torch.ones(len(examples), skip, dtype=torch.long),
                                             batch["attention_mask"]], dim=1)  # (B, P + T)
        logits = model(**batch, past_key_values=cache, use_cache=True).logits  # (B, T, V)
    else:
        logits = model(**batch, use_cache=False).logits  # (B, T, V)
    target = labels[:, 1:].flatten()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target, ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def lm_loss(model: torch.nn.Module, examples: Sequence[LMExample], pad_id: int, stop_ids: Sequence[int] = (),
            ) -> Tensor:
    """Mean answer-token cross-entropy; examples with and without the system prompt run as
    two groups, each sharing its prefix."""
    total, count = None, 0
    for flag in (True, False):
        group = [e for e in examples if e.system == flag]
        if group:
            loss, n = answer_loss_sum(model, group, pad_id, stop_ids)
            total, count = (loss if total is None else total + loss), count + n
    return total / max(count, 1)


def scene_readout_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear head of the scene read-out loss: one tile's flattened image tokens (InternVL's
    ``image_seq_length`` of them, text width) -> every grid cell's class (empty or one of `LOOKS`)."""
    config = model.config
    return torch.nn.Linear(config.image_seq_length * config.text_config.hidden_size,
                           GRID * GRID * CELL_CLASSES)


def scene_readout_loss(model: torch.nn.Module, head: torch.nn.Linear, examples: Sequence[LMExample]
                       ) -> Optional[Tensor]:
    """Mean cross-entropy of ``head`` naming each cell of the examples' images from their projected
    image tokens; None when no example has an image."""
    pictured = [e for e in examples if e.cells is not None]
    if not pictured:
        return None
    tokens = projected_image_tokens(model, torch.cat([e.pixel_values for e in pictured]))  # (N, tokens, width)
    logits = head(tokens.flatten(1).float()).view(-1, CELL_CLASSES)
    return F.cross_entropy(logits, torch.cat([e.cells for e in pictured]).flatten())


def image_token_ids(vlm: LoadedVLM) -> tuple[int, ...]:
    """Ids of the image placeholder and its start/end markers (a shared prefix stops before them)."""
    tok = vlm.tokenizer
    names = [getattr(tok, a, None) for a in ("start_image_token", "context_image_token", "end_image_token")]
    ids = {tok.convert_tokens_to_ids(n) for n in names if n}
    ids.add(int(vlm.model.config.image_token_id))
    return tuple(sorted(ids))


def frozen_modules(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    """The modules of ``model`` whose own name (the last part of the dotted path) is in ``names``,
    e.g. InternVL's "vision_tower" and "multi_modal_projector"; every name must be found."""
    found = [(path.rsplit(".", 1)[-1], m) for path, m in model.named_modules() if path.rsplit(".", 1)[-1] in names]
    missing = [n for n in names if n not in {name for name, _ in found}]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module named {missing} to freeze")
    return [m for _, m in found]


def fix_output_embeddings(model: torch.nn.Module, seed: int) -> None:
    """Set the LM head's rows to seeded random unit vectors and freeze them."""
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the global one stays as it was
    rows = torch.randn(head.weight.shape, generator=gen)
    with torch.no_grad():
        head.weight.copy_(rows / rows.norm(dim=1, keepdim=True))
    head.requires_grad_(False)


def _lr(cfg: VLMTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_lm(vlm: LoadedVLM, examples: Sequence[LMExample], cfg: VLMTrainConfig,
             callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """AdamW over seeded per-epoch permutations of ``examples``; returns the loss per step."""
    model = vlm.model
    model.train().requires_grad_(True)
    for module in frozen_modules(model, cfg.frozen):
        module.requires_grad_(False)
    if cfg.fixed_lm_head:
        fix_output_embeddings(model, cfg.seed)
    head = scene_readout_head(model) if cfg.image_readout_weight > 0 else None
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head is not None:
        trained += [(f"readout.{n}", p) for n, p in head.named_parameters()]
    clipped = [p for _, p in trained]
    decay = [p for n, p in trained if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in trained if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    pad_id = vlm.tokenizer.pad_token_id
    stop_ids = image_token_ids(vlm)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses = []
    start = time.monotonic()
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[: cfg.batch_size], order[cfg.batch_size:]
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        batch = [examples[i] for i in picked]
        loss = lm_loss(model, batch, pad_id, stop_ids)
        readout = scene_readout_loss(model, head, batch) if head is not None else None
        total = loss if readout is None else loss + cfg.image_readout_weight * readout
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
        if step % 50 == 0 or step == cfg.steps - 1:
            extra = f" read-out {float(readout.detach()):.4f}" if readout is not None else ""
            logger.info("vlm step %d/%d loss %.4f%s (%.0fs)", step + 1, cfg.steps, losses[-1], extra,
                        time.monotonic() - start)
    model.eval().requires_grad_(False)
    return losses


def train_demo_vlm(folder: str | Path, cfg: VLMTrainConfig = VLMTrainConfig(),
                   callback: Optional[Callable[[int, float], None]] = None, eval_every: int = 0,
                   eval_count: int = 64) -> LoadedVLM:
    """Build the tiny InternVL into ``folder``, train it and save it there (loadable by `load_vlm`).
    ``eval_every`` > 0 logs `evaluate_rewrites` on ``eval_count`` samples that often (greedy
    decoding draws no random numbers, so training is unchanged)."""
    folder = Path(folder)
    build_tiny_vlm(folder, "internvl", seed=cfg.seed, vocab=demo_vocab(), num_layers=cfg.num_layers,
                   hidden_size=cfg.hidden_size, image_size=cfg.tile_size, vision_hidden_size=cfg.vision_hidden_size,
                   vision_layers=cfg.vision_layers, patches_per_side=cfg.patches_per_side)
    vlm = load_vlm(folder)
    start = time.monotonic()
    examples = build_examples(vlm, cfg.pool_size, SPLIT_SEEDS["train"] + cfg.seed, cfg.task_weights,
                              cfg.no_system_prob, cfg.split, cfg.named_order)
    logger.info("built %d VLM training examples in %.1fs", len(examples), time.monotonic() - start)
    def on_step(step: int, loss: float) -> None:
        if callback is not None:
            callback(step, loss)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            vlm.model.eval()
            logger.info("vlm step %d eval: %s", step + 1, evaluate_rewrites(vlm, eval_count))
            vlm.model.train()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        train_lm(vlm, examples, cfg, on_step)
    vlm.model.save_pretrained(folder, safe_serialization=True)
    return vlm


def evaluate_rewrites(vlm: LoadedVLM, count: int = 200, seed: int = SPLIT_SEEDS["val"], max_new_tokens: int = 64,
                      batch_size: int = 50) -> dict[str, float]:
    """Greedy Verifi rewrites of held-out samples (`verifi_rewrite_batch`: the same results
    as `verifi_rewrite` up to float tolerance, many prompts per ``generate``).

    ``rewrite_exact``: fully specified captions whose rewrite parses to the right scene
    (``rewrite_heldout_exact``: the same for colour/kind pairs never seen in training);
    ``rewrite_consistent``: all captions whose rewrite agrees with every attribute the caption
    states; ``rewrite_colour`` / ``rewrite_kind``: the share of the captions' shapes whose colour / kind
    the rewrite keeps, each matched to its partner by every attribute the caption states (an
    unparsed rewrite keeps none); ``caption_exact``: images described exactly; ``edit_exact``: source image +
    instruction rewritten to exactly the edited scene; ``compose_exact``: two one-shape images +
    a composition instruction rewritten to exactly the combined scene; ``*_parsed``: rewrites that parse."""
    def rewrite(texts: list[str], images: list[list[Any]]) -> list[Optional[Scene]]:
        out = []
        for start in range(0, len(texts), batch_size):
            out += verifi_rewrite_batch(vlm, texts[start: start + batch_size], images[start: start + batch_size],
                                        max_new_tokens=max_new_tokens, max_tiles=1)
        return [parse_rewrite(r.text) for r in out]

    def rate(values: Sequence[float]) -> float:
        return sum(values) / max(len(values), 1)

    out: dict[str, float] = {}
    t2i = sample_t2i(count, seed)
    scenes = rewrite([s.caption for s in t2i], [[] for _ in t2i])
    full = [(s, got) for s, got in zip(t2i, scenes) if {"size", "position"} <= set(s.mentions)]
    out["rewrite_exact"] = rate([got == s.scene for s, got in full])
    scores = [score_scene(s.scene, got, s.mentions) if got is not None else None for s, got in zip(t2i, scenes)]
    out["rewrite_consistent"] = rate([sc is not None and sc["exact"] == 1.0 for sc in scores])
    out["rewrite_parsed"] = rate([got is not None for got in scenes])
    for attr in ("colour", "kind"):
        out[f"rewrite_{attr}"] = rate([sc.get(attr, 1.0) if sc is not None else 0.0 for sc in scores])
    held = [s for s in sample_t2i(count, seed + 3, split="heldout") if {"size", "position"} <= set(s.mentions)]
    out["rewrite_heldout_exact"] = rate([got == s.scene for s, got in zip(held, rewrite(
        [s.caption for s in held], [[] for _ in held]))])
    pictures = sample_t2i(count, seed + 1)
    scenes = rewrite(["" for _ in pictures], [[render(s.scene)] for s in pictures])
    out["caption_exact"] = rate([got == s.scene for s, got in zip(pictures, scenes)])
    out["caption_parsed"] = rate([got is not None for got in scenes])
    edits = sample_edits(count, seed + 2)
    scenes = rewrite([e.instruction for e in edits], [[render(e.source)] for e in edits])
    out["edit_exact"] = rate([got == e.target for e, got in zip(edits, scenes)])
    out["edit_parsed"] = rate([got is not None for got in scenes])
    compositions = sample_compositions(count, seed + 4, refs=2)
    scenes = rewrite([c.instruction for c in compositions], [[render(s) for s in c.sources] for c in compositions])
    out["compose_exact"] = rate([got == c.target for c, got in zip(compositions, scenes)])
    return out
