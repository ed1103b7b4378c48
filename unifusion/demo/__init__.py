"""The synthetic demo world: coloured shapes on a 3x3 grid, the grammar that describes and
edits them, and a scorer that reads them back from images (a small benchmark)."""

from .grammar import (
    EDIT_OPS,
    VOCAB,
    CompositionSample,
    EditSample,
    GrammarError,
    T2ISample,
    caption,
    detailed,
    parse_detailed,
    sample_compositions,
    sample_edits,
    sample_t2i,
    words,
)
from .scorer import (
    composition_success,
    edit_success,
    identity_preserved,
    mean_scores,
    read_scene,
    read_shapes,
    score_scene,
)
from .world import COLOURS, IMAGE_SIZE, KINDS, SIZES, SPLIT_SEEDS, Scene, SceneError, Shape, render

__all__ = [
    "COLOURS", "EDIT_OPS", "IMAGE_SIZE", "KINDS", "SIZES", "SPLIT_SEEDS", "VOCAB",
    "CompositionSample", "EditSample", "GrammarError", "Scene", "SceneError", "Shape", "T2ISample",
    "caption", "composition_success", "detailed", "edit_success", "identity_preserved", "mean_scores",
    "parse_detailed", "read_scene", "read_shapes", "render", "sample_compositions", "sample_edits",
    "sample_t2i", "score_scene", "words",
]
