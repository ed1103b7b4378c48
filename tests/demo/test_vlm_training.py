"""Demo VLM training: inputs built like inference, answer-only loss, prefix sharing that equals
a full forward, and a model that learns one rewrite answers it through `verifi_rewrite`."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from unifusion.demo.grammar import VOCAB, detailed, sample_compositions, sample_edits, sample_t2i
from unifusion.demo.vlm_training import (
    IGNORE,
    VLMTrainConfig,
    answer_loss_sum,
    build_examples,
    collate_lm,
    demo_vocab,
    evaluate_rewrites,
    fix_output_embeddings,
    frozen_modules,
    image_token_ids,
    lm_loss,
    normalise_rewrite,
    parse_rewrite,
    scene_readout_head,
    scene_readout_loss,
    train_lm,
)
from unifusion.demo import vlm_training
from unifusion.demo.world import SPLIT_SEEDS, random_scene
from unifusion.vlm.loader import load_vlm
from unifusion.vlm.prompt import build_prompt
from unifusion.vlm.tiny import build_tiny_vlm
from unifusion.vlm.verifi import DEFAULT_SYSTEM_PROMPT, verifi_rewrite


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("demo_vlm"), "internvl", seed=0, vocab=demo_vocab(),
                          num_layers=2, hidden_size=32, image_size=64)


@pytest.fixture()
def vlm(folder):
    return load_vlm(folder)  # fresh per test: training changes the weights


def test_vocab_covers_grammar_and_system_prompt(vlm):
    unk = vlm.tokenizer.unk_token_id
    for text in (DEFAULT_SYSTEM_PROMPT, " ".join(VOCAB)):
        assert unk not in vlm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_decoded_rewrites_parse_back(vlm):
    rng = random.Random(3)
    for _ in range(20):
        scene = random_scene(rng)
        ids = vlm.tokenizer(detailed(scene), add_special_tokens=False)["input_ids"]
        decoded = vlm.tokenizer.decode(ids)
        assert decoded != detailed(scene)  # the word-level decoder spaces out punctuation ...
        assert normalise_rewrite(decoded) == detailed(scene) and parse_rewrite(decoded) == scene  # ... we undo it
    assert parse_rewrite("two shapes : a red") is None
    twice = "two shapes : a small red circle in the center , a large blue square in the center ."
    assert parse_rewrite(twice) is None


def test_examples_are_inference_prompt_plus_answer(vlm):
    examples = build_examples(vlm, 12, seed=0, task_weights=(1, 1, 1), no_system_prob=0.5)
    assert {e.task for e in examples} == {"caption", "rewrite", "edit"} and {e.system for e in examples} == {True, False}
    t2i, edits = iter(sample_t2i(12, 0)), iter(sample_edits(12, 1))
    eos = vlm.tokenizer.eos_token_id
    for e in examples:
        sample = next(edits) if e.task == "edit" else next(t2i)
        text = sample.instruction if e.task == "edit" else sample.caption
        answer = sample.detailed
        content = {"caption": [], "rewrite": [text], "edit": [text]}[e.task]
        images = 0 if e.task == "rewrite" else 1
        prompt_ids = e.input_ids[: e.answer_start]
        # The prompt is exactly what inference builds: ends with the generation prompt.
        if e.task == "rewrite":
            ref = build_prompt(vlm, content, system_prompt=DEFAULT_SYSTEM_PROMPT if e.system else None, max_tiles=1)
            assert torch.equal(prompt_ids, ref.input_ids[0])
        assert (prompt_ids == vlm.model.config.image_token_id).sum() == 16 * images
        assert e.input_ids[e.answer_start:].tolist() == vlm.tokenizer(answer, add_special_tokens=False)[
            "input_ids"] + [eos]
        assert (e.pixel_values is not None) == bool(images)


def test_labels_cover_only_answers(vlm):
    examples = build_examples(vlm, 4, seed=1)
    batch = collate_lm(examples, vlm.tokenizer.pad_token_id)
    for row, e in enumerate(examples):
        labelled = (batch["labels"][row] != IGNORE).nonzero().flatten()
        assert labelled.tolist() == list(range(e.answer_start, len(e.input_ids)))
        assert batch["attention_mask"][row].sum() == len(e.input_ids)
    assert batch["pixel_values"].shape[0] == sum(e.pixel_values is not None for e in examples)


def _reference_loss(model, examples, pad_id):
    """One plain forward per example over its whole sequence."""
    total, count = 0.0, 0
    for e in examples:
        batch = collate_lm([e], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        total = total + F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
        count += int((labels != IGNORE).sum())
    return total / count


def test_shared_prefix_loss_and_gradients_equal_full_forwards(vlm):
    model = vlm.model.train().requires_grad_(True)
    examples = build_examples(vlm, 8, seed=2, no_system_prob=0.4)
    pad, stop = vlm.tokenizer.pad_token_id, image_token_ids(vlm)
    ours = lm_loss(model, examples, pad, stop)
    grads = torch.autograd.grad(ours, [p for p in model.parameters()], allow_unused=True)
    ref = _reference_loss(model, examples, pad)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters()], allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    _, skipped_tokens = answer_loss_sum(model, [e for e in examples if e.system], pad, stop)
    assert skipped_tokens > 0


def test_learned_rewrite_comes_back_through_verifi(vlm):
    """Train on one rewrite until memorised: greedy Verifi must then produce exactly that
    answer, which only happens when training and inference sequences agree token by token."""
    example = build_examples(vlm, 1, seed=5, task_weights=(0, 1, 0), no_system_prob=0.0)[0]
    cfg = VLMTrainConfig(num_layers=2, hidden_size=32, steps=200, batch_size=2, lr=1e-2, warmup_steps=5, seed=0)
    losses = train_lm(vlm, [example], cfg)
    assert losses[-1] < 0.05 < losses[0]
    text = sample_t2i(1, 5)[0].caption
    result = verifi_rewrite(vlm, text, max_new_tokens=40, max_tiles=1)
    assert result.finished
    assert normalise_rewrite(result.text) == sample_t2i(1, 5)[0].detailed


def test_training_is_seeded(folder):
    runs = []
    for _ in range(2):
        vlm = load_vlm(folder)
        examples = build_examples(vlm, 6, seed=0)
        torch.manual_seed(0)
        runs.append(train_lm(vlm, examples, VLMTrainConfig(steps=3, batch_size=4, warmup_steps=1, seed=1)))
    assert runs[0] == runs[1]


def test_frozen_modules_keep_their_init_and_the_rest_learns(folder):
    """The image path can stay at its seeded init while the language model learns; a name the
    model does not have is an error, not a silent no-op."""
    vlm = load_vlm(folder)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    examples = build_examples(vlm, 4, seed=0, task_weights=(1, 0, 0))  # captions: images in every batch
    train_lm(vlm, examples, VLMTrainConfig(steps=2, batch_size=4, warmup_steps=1, lr=1e-2,
                                           frozen=("vision_tower", "multi_modal_projector")))
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    vision = {n for n in before if "vision_tower" in n or "multi_modal_projector" in n}
    assert vision and not changed & vision
    assert any("language_model" in n for n in changed)
    assert len(frozen_modules(vlm.model, ("mlp",))) == sum(n.endswith(".mlp") for n, _ in vlm.model.named_modules()) > 1
    with pytest.raises(ValueError, match="visual"):
        frozen_modules(vlm.model, ("vision_tower", "visual"))


def test_fixed_lm_head_keeps_seeded_unit_rows_while_the_rest_learns(folder):
    """With ``fixed_lm_head`` the output embeddings are seeded unit vectors that training leaves alone
    (so the four shape words cannot collapse together); without it they train."""
    examples = build_examples(load_vlm(folder), 4, seed=0)
    heads = {}
    for fixed in (True, False):
        vlm = load_vlm(folder)
        before = vlm.model.get_output_embeddings().weight.detach().clone()
        train_lm(vlm, examples, VLMTrainConfig(steps=2, batch_size=4, warmup_steps=1, lr=1e-2, fixed_lm_head=fixed))
        heads[fixed] = (before, vlm.model.get_output_embeddings().weight.detach().clone())
    start, end = heads[True]
    assert torch.allclose(end.norm(dim=1), torch.ones(end.shape[0]))
    assert not torch.equal(start, end)  # set at the start of training ...
    other = load_vlm(folder)
    fix_output_embeddings(other.model, seed=0)
    assert torch.equal(other.model.get_output_embeddings().weight, end)  # ... from the seed, then never trained
    fix_output_embeddings(other.model, seed=1)
    assert not torch.equal(other.model.get_output_embeddings().weight, end)
    assert not other.model.get_output_embeddings().weight.requires_grad
    start, end = heads[False]
    assert not torch.equal(start, end) and end.norm(dim=1).std() > 0


def test_rewrite_colour_and_kind_rates_count_what_the_rewrite_keeps(monkeypatch, vlm):
    """Rewrites that keep every colour but swap circles and squares: ``rewrite_colour`` is 1, ``rewrite_kind``
    the share of the prompts' shapes that are neither (rewrites of anything else do not parse)."""
    count = 12
    samples = sample_t2i(count, SPLIT_SEEDS["val"])
    assert len({s.caption for s in samples}) == count
    swapped = {s.caption: s.detailed.replace("circle", "@").replace("square", "circle").replace("@", "square")
               for s in samples}

    def fake_batch(_vlm, texts, images, **_kw):
        return [SimpleNamespace(text=swapped.get(t, "") if not imgs else "") for t, imgs in zip(texts, images)]

    monkeypatch.setattr(vlm_training, "verifi_rewrite_batch", fake_batch)
    metrics = evaluate_rewrites(vlm, count)
    kept = [sh.kind not in ("circle", "square") for s in samples for sh in s.scene.shapes]
    per_prompt = [sum(sh.kind not in ("circle", "square") for sh in s.scene.shapes) / len(s.scene.shapes)
                  for s in samples]
    assert 0 < sum(kept) < len(kept)
    assert metrics["rewrite_colour"] == 1.0
    assert metrics["rewrite_kind"] == pytest.approx(sum(per_prompt) / count)
    assert metrics["caption_parsed"] == 0.0


def test_rewrites_answer_in_named_or_row_major_order(vlm):
    """named_order picks the rewrite's order (row-major by default); captions of images stay row-major either way."""
    named = build_examples(vlm, 40, seed=2, task_weights=(1, 1, 0), named_order=True)
    row_major = build_examples(vlm, 40, seed=2, task_weights=(1, 1, 0))
    samples = iter(sample_t2i(40, 2))
    differ = 0
    for a, b in zip(named, row_major):
        sample = next(samples)
        answer = {"caption": sample.detailed, "rewrite": sample.rewrite}[a.task]
        assert normalise_rewrite(vlm.tokenizer.decode(a.input_ids[a.answer_start:-1])) == answer
        assert normalise_rewrite(vlm.tokenizer.decode(b.input_ids[b.answer_start:-1])) == sample.detailed
        differ += a.task == "rewrite" and sample.rewrite != sample.detailed
    assert differ > 0


def test_scene_readout_trains_the_image_path_and_skips_text_only_batches(folder):
    """The read-out loss reaches the vision tower through the projected image tokens; a batch
    without images adds nothing; a zero weight builds no head and trains as before."""
    vlm = load_vlm(folder)
    captions = build_examples(vlm, 4, seed=0, task_weights=(1, 0, 0))
    assert all(e.cells is not None and e.cells.shape == (1, 9) for e in captions)
    assert scene_readout_loss(vlm.model, scene_readout_head(vlm.model), build_examples(
        vlm, 4, seed=0, task_weights=(0, 1, 0))) is None
    head = scene_readout_head(vlm.model)
    vlm.model.requires_grad_(True)  # load_vlm hands a frozen model
    loss = scene_readout_loss(vlm.model, head, captions)
    loss.backward()
    vision = [p.grad for n, p in vlm.model.named_parameters() if "vision_tower" in n]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in vision)

    def trained(weight):
        model = load_vlm(folder)
        train_lm(model, build_examples(model, 4, seed=0, task_weights=(1, 0, 0)),
                 VLMTrainConfig(steps=2, batch_size=4, warmup_steps=1, lr=1e-2, image_readout_weight=weight))
        return {n: p.detach().clone() for n, p in model.model.named_parameters()}

    plain, again, readout = trained(0.0), trained(0.0), trained(1.0)
    assert all(torch.equal(plain[n], again[n]) for n in plain)
    projector = [n for n in plain if "multi_modal_projector" in n]
    assert projector and any(not torch.equal(plain[n], readout[n]) for n in projector)
    with pytest.raises(ValueError, match="image_readout_weight"):
        VLMTrainConfig(image_readout_weight=-1.0)


def test_compositions_show_every_reference_and_answer_the_combined_scene(monkeypatch, vlm):
    """Composition examples carry 2 or 3 one-shape images (one tile and one row of read-out cells
    each) and answer with the combined scene; ``compose_exact`` scores two-reference rewrites."""
    examples = build_examples(vlm, 6, seed=4, task_weights=(0, 0, 0, 1))
    assert [e.task for e in examples] == ["compose"] * 6
    assert sorted({len(e.pixel_values) for e in examples}) == [2, 3]
    image_id = int(vlm.model.config.image_token_id)
    for e in examples:
        assert e.cells.shape == (len(e.pixel_values), 9) and (e.cells > 0).sum(1).tolist() == [1] * len(e.cells)
        assert int((e.input_ids == image_id).sum()) == 16 * len(e.pixel_values)
        answer = normalise_rewrite(vlm.tokenizer.decode(e.input_ids[e.answer_start:-1]))
        assert parse_rewrite(answer) is not None and len(parse_rewrite(answer).shapes) == len(e.pixel_values)
    # named_order answers in the instruction's order (`CompositionSample.rewrite`), else row-major
    samples = sample_compositions(3, 4 + 2, refs=2) + sample_compositions(3, 4 + 3, refs=3)
    rewrites = {c.rewrite for c in samples}
    named = [normalise_rewrite(vlm.tokenizer.decode(e.input_ids[e.answer_start:-1]))
             for e in build_examples(vlm, 6, seed=4, task_weights=(0, 0, 0, 1), named_order=True)]
    answers = [normalise_rewrite(vlm.tokenizer.decode(e.input_ids[e.answer_start:-1])) for e in examples]
    assert set(named) == rewrites and set(answers) == {c.detailed for c in samples} != rewrites
    targets = {c.instruction: c.detailed for c in sample_compositions(8, SPLIT_SEEDS["val"] + 4, refs=2)}

    def fake_batch(_vlm, texts, images, **_kw):
        return [SimpleNamespace(text=targets.get(t, "") if len(imgs) == 2 else "") for t, imgs in zip(texts, images)]

    monkeypatch.setattr(vlm_training, "verifi_rewrite_batch", fake_batch)
    metrics = evaluate_rewrites(vlm, 8)
    assert metrics["compose_exact"] == 1.0 and metrics["edit_exact"] == 0.0
