"""The demo's training records (Verifi answers are the true scenes when the recipe says so) and the
trainer options of its DiT stages, and the warning after a VLM stage whose rewrites lost the shapes."""

from __future__ import annotations

from dataclasses import replace

from unifusion.demo.grammar import parse_detailed, sample_edits, sample_t2i
from unifusion.demo.recipe import quick_recipe
from unifusion.demo.scorer import read_scene
from unifusion.demo.stages import _recipe_config, demo_records, vlm_shape_warning


def test_records_carry_the_scene_as_their_rewrite() -> None:
    recipe = replace(quick_recipe(), t2i_samples=5, edit_samples=3, verifi_true_rewrites=True)
    recipe = replace(recipe, vlm=replace(recipe.vlm, named_order=True))
    records = demo_records(recipe)
    t2i, edits = records[:5], records[5:]
    assert [r.kind for r in records] == ["t2i"] * 5 + ["edit"] * 3
    for record, sample in zip(t2i, sample_t2i(5, recipe.seed, split="train")):
        assert record.caption == sample.caption and record.rewrite == sample.rewrite  # worded as the VLM rewrites
        assert parse_detailed(record.rewrite) == read_scene(record.image) == sample.scene  # it describes the image
    for record, sample in zip(edits, sample_edits(3, recipe.seed + 1, split="train")):
        assert record.instruction == sample.instruction and parse_detailed(record.rewrite) == sample.target
    row_major = demo_records(replace(recipe, vlm=replace(recipe.vlm, named_order=False)))
    assert [r.rewrite for r in row_major[:5]] == [s.detailed for s in sample_t2i(5, recipe.seed, split="train")]
    written = demo_records(replace(recipe, verifi_true_rewrites=False))
    assert all(r.rewrite is None for r in written) and [r.text for r in written] == [r.text for r in records]


def test_every_dit_stage_trains_in_the_recipes_precision() -> None:
    recipe = quick_recipe()
    assert recipe.dit_mixed_precision == "bf16"
    for stage in ("t2i", "edit"):
        assert _recipe_config(recipe, stage).mixed_precision == "bf16"
        assert _recipe_config(replace(recipe, dit_mixed_precision="no"), stage).mixed_precision == "no"


def test_a_vlm_that_does_not_keep_shapes_is_flagged() -> None:
    failed = vlm_shape_warning({"rewrite_kind": 0.30, "rewrite_colour": 0.98})
    assert failed is not None and "30%" in failed and "fixed_lm_head" in failed
    assert vlm_shape_warning({"rewrite_kind": 0.81}) is None
    assert vlm_shape_warning({}) is None  # no evaluation, nothing to judge
