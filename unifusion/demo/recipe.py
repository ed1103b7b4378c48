"""The demo recipe: sizes and step counts of every `train-demo` stage.

The defaults train the shipped model (88 minutes to the model files on 2 CPU cores with `--jobs 2`, 98.5 with
`--ablations` and the benchmark);
`quick_recipe` runs every stage in minutes without learning anything, for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..config import DiTConfig
from .vlm_training import VLMTrainConfig


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and step counts of every stage (defaults: the shipped demo model)."""

    seed: int = 0
    vlm: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    vlm_eval_count: int = 200
    vlm_eval_every: int = 600  # progress evaluations while the VLM trains (they do not change it)
    vae_images: int = 2048
    vae_steps: int = 3600  # about as long as the VLM beside it: the two share the first stage
    vae_batch_size: int = 16
    vae_crop: Optional[int] = 32
    vae_lr: float = 1e-3
    vae_latent_channels: int = 16  # ComfyUI's TAESD loader takes any count; 4 blur the 9 px shapes
    vae_foreground_weight: float = 4.0  # see unifusion.vae.train_vae
    vae_edge_weight: float = 1.0  # see unifusion.vae.train_vae: keeps the corners that tell shapes apart
    vae_light: bool = True  # train with LIGHT_IDENTITY_BLOCKS (3x cheaper steps, same file layout)
    # Off. unifusion.vae.train_vae's latent noise was meant to push apart latents of scenes that differ in
    # shape alone. At 0.25 latent standard deviations a shape swap moved the latent by 10.4 instead of 9.5
    # (a colour swap by 26.3 instead of 26.7), and the vae stage's decoder read back 61% of the shapes of
    # 200 held-out scenes instead of 64%.
    vae_latent_noise: float = 0.0
    # Then the decoder alone with every Block, beside the DiT stages, in cycles: each restarts the cosine
    # schedule from the weights the one before left (`stages.decoder_cycle`). One cycle of 3,000 steps turned
    # small diamonds into circles (1 of 47 read back) and read back 83% of the shapes of 200 held-out scenes,
    # 70% of the scenes exactly; one of 4,500, 16 of 47 small diamonds, 92% of the shapes and 84% of the scenes.
    # Cycles 2 and 3 (2026-12-04, from the shipped 4,500-step decoder): small diamonds of 400 held-out scenes read
    # back 33 -> 61 -> 83 of 103; 192 scenes: shapes 91.7 -> 95.2 -> 97.4%, exact 84 -> 90 -> 94%, 37.7 -> 39.9 ->
    # 41.5 dB. The shipped DiT through it, 48 held-out prompts: plain shape 89 -> 97% (exact 62 -> 69%), Verifi
    # 91 -> 95% (81 -> 88%). A 3,000-step cycle takes the worker about 14 minutes in float32, 6.4 in bf16.
    decoder_steps: tuple[int, ...] = (4500, 3000, 3000)
    decoder_lr: float = 5e-4
    # The decoder finetune's forward passes under bfloat16 autocast, its last convolution in float32
    # (`unifusion.vae.finetune_decoder`'s ``bf16``). On a CPU with AVX512-BF16 and AMX a step on one thread takes
    # 0.132 s against 0.314 s in float32 (`benchmarks/decoder_precision.py`), so the worker is done with the decoder
    # about when t2i has taken its first steps, and t2i then gets every thread (t2i_steps_beside_worker). The
    # vae stage stays in float32: from scratch under bf16 it stalled (docs/demo_experiments.md).
    decoder_bf16: bool = True
    t2i_samples: int = 6000
    # 8,000 (2026-12-05, second edit cycle at lr 8e-4 from the shipped first-cycle checkpoint): 43% (edit_repeat 1) and
    # 47% (3) of 96 held-out edits exactly against 41%, and 49% (7, 9 in 10 samples an edit) against 46%, within
    # the noise of 96 edits; it would cost a cache 1.75x as large and a new first cycle.
    edit_samples: int = 2000
    verifi_max_new_tokens: int = 48
    # Each training sample's Verifi features are its true detailed scene forced as the VLM's answer
    # (records carry `rewrite`), not a rewrite the VLM writes from the caption: on this world's captions,
    # 45% of which leave the cells or sizes open, only 38% of the written rewrites of the 6,000 t2i samples
    # describe the image (61% of the fully specified ones, 11% of the rest), so Verifi trained the DiT
    # on descriptions of other scenes.
    verifi_true_rewrites: bool = True
    cache_batch_size: int = 64  # prompts per VLM encode and per batched Verifi generate
    # VLM layers the cache captures and LAP pools (None: the VLM's default, every 3rd from 4). This
    # 12-layer VLM carries the shape word weakly in every decoder layer: swapping it moves a layer's
    # states by a quarter of what swapping the colour word does (in units of each channel's spread),
    # but its input embeddings (layer 0) by 0.62 of it. With layer 0 added, 2,400 + 400 steps on the
    # same VLM and autoencoder, 48 held-out prompts, colour/shape/size/position/count: plain
    # 92/33/88/93/62% -> 98/65/98/100/75% (exact 6 -> 31%), Verifi 86/36/94/90/96% -> 90/56/96/100/100%.
    # At 800 steps the gain was small (plain shape 25 -> 31%, Verifi 29 -> 36%).
    vlm_layers: Optional[tuple[int, ...]] = (0, 4, 7, 10)
    dit_width: int = 192
    dit_depth: int = 4
    dit_heads: int = 6
    time_embed_dim: int = 128
    lap_heads: int = 4
    refiner_blocks: int = 1
    # Image tokens learn where they are only by RoPE against the condition tokens; at theta 10,000
    # an 8x8 grid turns 2 of 6 frequency pairs per axis by more than 0.3 rad. At 1,200 steps, theta
    # 100 drew a red shape at the named cell 56% of the time against 36% (9 cells x 4 seeds).
    dit_rope_theta: float = 100.0
    # A fixed sin/cos of (row, column) on the latent tokens as well (DiTConfig.absolute_position): the
    # shapes sit at fixed places of the 8x8 grid, so a token can know outright which part of which
    # cell it draws. At 800 steps (with condition_lr_scale 0.1) the loss gained from the prompt's
    # place words at t=0.8 went 0.13 -> 0.25; 24 held-out prompts: colour 73 -> 82%, position 82 -> 76%.
    dit_absolute_position: bool = True
    # DiTConfig.predict_x0: the head guesses the clean latent, the forward returns the velocity. Off:
    # side by side at 800 steps, 48 held-out prompts, colour/shape/size/position/count 67/35/64/55/35%
    # -> 64/32/69/37/31%, and the one-step guess at t = 0.95 got colour 22% -> 19%.
    dit_predict_x0: bool = False
    # DiTConfig.image_positions: the 16 tokens of a reference image take the RoPE row/column of the latent
    # tokens they lie over (a 4x4 grid over the 8x8 latent), so reconstruction and edits can copy by place.
    # Same VLM, autoencoder and cache, 3,600 + 400 steps, against the model shipped without it: reconstruction
    # from one tile 12% -> 17% exact, 23.1 -> 27.6 dB; edits 8% -> 10% exact, identity 30% -> 41%; plain prompts
    # 97/88/98/99/75% -> 97/86/98/100/77% (exact 60% both), Verifi 91/68/98/98/100% -> 88/65/95/98/96%.
    dit_image_positions: bool = True
    batch_size: int = 32
    # TrainConfig.mixed_precision of the DiT stages (t2i, edit, ablations): bf16 autocast, float32 weights and
    # attention (unifusion.attention). On a CPU with AVX512-BF16 a t2i step on one thread takes 0.43 s
    # against 0.68 s in float32, with the same losses over the first 60 steps; the time goes to t2i_steps.
    dit_mixed_precision: str = "bf16"
    # 3,600 (was 2,400): shape kept rising with length. Same VLM, cache and decoder, 48 held-out prompts,
    # colour/shape/size/position/count after the edit finetune: plain 97/76/97/99/71% (exact 44%) ->
    # 97/88/98/99/75% (60%), Verifi 90/64/96/100/100% (52%) -> 91/68/98/98/100% (58%).
    # 7,200 (was 3,600) in bf16, 47.5 min on one thread (3,600 in float32: 51). Same VLM, cache and decoder, after
    # the edit finetune: plain 98/86/96/100/75% (exact 60%) -> 99/84/98/100/79% (67%), Verifi 90/68/97/100/100%
    # (56%) -> 90/66/97/100/100% (56%), held-out colour/shape pairs exact 46% -> 54%, one-tile reconstruction
    # 25% -> 42% exact (31.7 -> 32.8 dB); edits 15% both (identity 48% -> 45%).
    # 10,800 compiled (2026-12-05, the minutes torch.compile frees): level within the noise on 192 test prompts
    # (exact 77% against 76%; before the edit finetune 78% against 74%) and 96 test edits (57% against 55%), so
    # not shipped ("The compiled minutes spent on t2i" in the log).
    t2i_steps: int = 7200
    # With --jobs 2, t2i's first steps run on this process's share of the threads while the decoder's worker
    # finishes beside it; then t2i waits for the worker and takes every thread. A fixed step, not the moment the
    # worker ends, since kernels write other tensors on other thread counts. 1,000 steps on one thread take about
    # 7.5 minutes: the cache ends about minute 27.5, the decoder (vae 12 + decoder 22 minutes) about minute 35.
    t2i_steps_beside_worker: int = 1000
    t2i_lr: float = 2e-3
    # LR of LAP + refiner relative to t2i_lr, text-to-image stage only. At full LR the LAP blocks
    # learn to squeeze out what the DiT does not use yet (a swapped shape word changed the
    # condition by 0.05 against 0.17 in the VLM layers). At 0.1, 800 steps reached position 82%,
    # count 58% on 24 held-out prompts, against 23% and 17% for the 400-step ablation at full LR
    # and 68% and 71% for the 2,400-step model.
    # The edit stage keeps 1.0: 0.1 and 3.0 in its second cycle (2026-12-05) edited 35% and 34% of 96 held-out edits
    # against 41%.
    condition_lr_scale: float = 0.1
    # Logit-normal timestep mean: > 0 trains more at high noise, where the layout the prompt
    # names (colours, positions, count) is decided. At 400 steps and lr 2e-3, a mean of 0.8 doubled
    # the loss gained from the condition at t=0.9 (0.050 -> 0.103); 1.3 gained more but fit low t worse.
    # In the second edit cycle alone (2026-12-04, lr 8e-4, from the shipped first-cycle checkpoint), 0 and 2 edited 31%
    # and 35% of 48 held-out edits exactly against 42% (identity 85% and 75% against 78%).
    timestep_logit_mean: float = 1.0
    # TrainConfig.loss_whitening for both DiT stages. Off: on this cache, full whitening (1.0) did not
    # teach the shape word. Side by side at 800 steps, plain prompts: colour 67 -> 53%, shape 35 -> 35%;
    # Verifi rewrites: position 60 -> 89%, count 48 -> 63%, shape 43 -> 42%. The full 2,400 + 400 steps,
    # against the shipped model on the same VLM and autoencoder: plain 85/22/84/90/60% (colour, shape,
    # size, position, count) -> 79/29/88/91/63%, Verifi 82/41/90/91/73% -> 74/34/84/96/73%, exact 21 -> 12%.
    loss_whitening: float = 0.0
    # 1,000 (was 400) with 20% reconstruction batches (was 3%), on the DiT with image positions: from the same
    # text-to-image checkpoint, 48 held-out edits went 10% -> 15% exact (identity 41% -> 48%), reconstruction
    # from one tile 17% -> 25% exact (27.6 -> 31.7 dB), plain prompts 97/86/98/100/77% -> 98/86/96/100/75%.
    # 1,000 steps at 3% gave edits 6% (identity 46%), reconstruction 25% (29.5 dB). The edit stage runs on
    # every thread after the decoder worker is done (4.9 min on 2 cores in bf16).
    # In cycles like the decoder's: each restarts warmup and cosine schedule at edit_lr from the weights the one
    # before exported, with its own edit_repeat. Cycle 2 (3,000 steps, 1 edit in 2 samples; 2026-12-04, from the
    # shipped 1,000-step checkpoint): 48 held-out edits 12% -> 31% exact (identity 60% -> 77%), removals 0 -> 33%,
    # resizes 7 -> 36%; plain prompts 99/97/99/100/77% (exact 69%) -> 99/93/99/100/75% (67%), Verifi 88% -> 90%
    # exact. After cycle 1 the model edited 48 of its training edits no better than held-out ones (15% exact
    # against 12%): it was short of edit steps, not of edits (after cycle 2: 46% against 31%). 8,000 edits in the
    # cache instead of 2,000 (same cycle 2): 33% exact (identity 79%), within the noise of 48 edits. A third cycle
    # like the second: 44% (identity 82%; 96 edits 29% -> 42%), text-to-image within the noise, but the run would
    # exceed its 90 minutes (the edit cycles run last, on both threads, about 13 minutes each). A fourth: 44% of 48
    # (96 edits 43%) while its training edits rise 60% -> 75%; on 8,000 edits, 47% of 96 (within the noise).
    edit_steps: tuple[int, ...] = (1000, 3000)
    # Peak learning rate of each edit cycle. First cycle: 4e-4 (1,000 steps, 20%) edited 12.5% exact (identity
    # 45%), reconstruction 33% (32.2 dB), but plain prompts 95/83/95/99/73% (exact 54%). Second cycle (2026-12-04,
    # from the shipped first-cycle checkpoint, same time), 2e-4 -> 4e-4 -> 8e-4: 48 held-out edits 31% -> 40% -> 42%
    # exact (identity 77/78/78%), 96 edits 29% -> 36% -> 41%; plain prompts exact 67% -> 67% -> 71% (99/95/99/100/79%
    # at 8e-4), Verifi 90% -> 88% -> 88%, held-out pairs 67% -> 67% -> 62%, reconstruction from 1 / 4 / 9 tiles
    # 62/21/8% -> 67/25/8% -> 67/29/12%. In the same time, 3 in 4 samples an edit (edit_repeat 9, lr 2e-4) edited
    # 33% (96 edits: 34%), half the batch for twice the steps 33-35% (34%). Higher peaks (same day and way) trade
    # text-to-image for reconstruction and leave the edits where they were: 1.6e-3 and 3.2e-3 edited 40% and 40% (96
    # edits: 39% and 40%; identity 78 and 72%), plain prompts exact 60% and 65%, reconstruction from 1 / 4 / 9 tiles
    # 67/42/25% and 79/50/29%.
    edit_lr: tuple[float, ...] = (2e-4, 8e-4)
    # The edit finetune also draws the text-to-image samples (trainer stage "mixed": 3 in 4 samples
    # there), all with one reference at most. From one t2i checkpoint (87% colour, 82% size, 89%
    # position on 48 held-out prompts), 400 steps on edits alone left 71%, 66%, 85%; mixed, 85%, 84%,
    # 90%, and the edit scores did not move (4% exact, identity 29% against 27%).
    # 800 mixed steps did not help the edits either (4% exact, identity 25%).
    edit_mix_t2i: bool = True
    # Reconstruction batches in the edit finetune (recon_prob is the t2i stage's). Without image positions, from
    # an earlier t2i checkpoint, 30% and 50% made reconstruction from one tile better on colour, size, position
    # and count (74/50/72/66/42% -> 83/39/86/75/50% and 85/28/87/83/54%) but worse on shape, exact scenes 12% -> 8%
    # and 12%; edits (72 held-out) went from 10% to 12% and 11% exact, identity 32% -> 34% and 37%. With them,
    # 20% over 1,000 steps helped (see edit_steps).
    # In the second cycle (2026-12-04, lr 8e-4), 0 instead of 0.2 edited 33% of 48 held-out edits exactly against
    # 42% (96: 34% and 41%), with reconstruction from one tile still 67%.
    edit_recon_prob: float = 0.2
    # DiTConfig.image_injection, added (zero) to the text-to-image checkpoint when the edit finetune starts
    # (`unifusion.train.export.with_image_injection`), so text-to-image trains and draws as before. Off: both
    # edit cycles from the shipped t2i checkpoint with it (2026-12-05) edited 53% of 96 test edits exactly
    # (identity 79%) against the shipped 55% (79%), reconstructed 76 of 96 validation scenes from one tile (77),
    # plain prompts exact 69% of 192 (76%); see "A direct path from each reference token" in the log.
    edit_image_injection: bool = False
    # DiT blocks added after the last one when the edit finetune starts (`unifusion.train.export.with_extra_blocks`):
    # each starts as the identity (adaLN-Zero), so text-to-image trains and draws as before, and each costs the edit
    # steps about a quarter again. Off: 2 (both edit cycles from the shipped t2i checkpoint, 2026-12-06) edited 57% of
    # 96 test edits exactly (identity 77%) against the shipped 55% (79%), reconstructed 73 of 96 validation scenes
    # from one tile (77), plain prompts exact 73% of 192 (76%); see "More DiT for the edits" in the log.
    edit_extra_blocks: int = 0
    # TrainConfig.edit_repeat: 1 keeps 1 edit in 4 samples (2,000 edits beside 6,000 t2i). 3 (1 in 2), from the
    # shipped text-to-image checkpoint: edits 15% -> 12.5% exact (identity 48% -> 52%), reconstruction from one
    # tile 25% -> 29% (31.7 -> 31.8 dB), plain prompts 98/86/96/100/75% -> 97/87/97/100/77%: within the noise.
    # One value per edit cycle (edit_steps); the second cycle's larger one gives the edits more of its longer run.
    # Second cycle at lr 8e-4 (2026-12-05, from the shipped first-cycle checkpoint): 3, 9 and 27 (1 in 2, 3 in 4
    # and 9 in 10 samples an edit) edited 41%, 45% and 46% of 96 held-out edits exactly; on a second training seed
    # 42%, 46% and 49%; on a third, 1 in 2 43% and 9 in 10 52% (paired over the three seeds: 38 gained, 17 lost).
    # It costs no time (the same steps draw other samples), so the second cycle ships 27. 81 (27 in 28) edited 54%
    # and 48% on two seeds but drew plain prompts exactly 60% of the time on both (27: 71% and 69%).
    edit_repeat: tuple[int, ...] = (1, 27)
    # Samples per step of each edit cycle (the text-to-image stage's is batch_size). Half the batch for twice the
    # steps did not buy what a third cycle did (2026-12-04, from the shipped first-cycle checkpoint, one thread on
    # the AMD EPYC; single timings, not a benchmark: 2,700 batch-16 steps took 771 s, 3,000 batch-32 ones 1,671 s,
    # each beside another run): cycles 2 and 3 of 2,700 steps at 16 edited
    # 33% of the 48 held-out edits (identity 78%) and 34% of 96, one cycle of 5,400 at 16 35% (79%) and 34%,
    # against 31% (77%) and 29% for 3,000 at 32 and 44% and 42% for 3,000 + 3,000 at 32 (all at lr 2e-4); text-to-image
    # within the noise. The edits gain with the samples seen, not with the optimizer's steps.
    edit_batch_size: tuple[int, ...] = (32, 32)
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # Both DiT stages. In the second edit cycle alone (2026-12-05), 0.05 and 0.2 edited 49% and 47% of 96 held-out
    # edits against 46%, plain prompts exact 62% and 67% against 71%: within the noise of one seed.
    cond_dropout: float = 0.1
    # Reconstruction batches of the t2i stage (the paper's 3%). 10%: same VLM, cache, decoder and 7,200 steps, 48 held-out
    # prompts after the edit finetune: plain 99/84/98/100/79% (exact 67%) -> 100/91/100/100/79% (67%), held-out
    # colour/shape pairs exact 54% -> 67%, edits 15% both (identity 45% -> 59%), one-tile reconstruction 42% both
    # (32.8 -> 34.1 dB). 20%: plain 97/81/96/96/75% (50%), edits 8% (identity 64%), reconstruction 50% (35.6 dB).
    recon_prob: float = 0.1
    # Share of samples on Verifi features. 0.25 (more plain prompts, 2026-12-04; same VLM, cache and decoder, 48 held-out
    # prompts after the edit finetune): plain 99/89/98/100/77% (exact 62%) -> 99/82/99/100/75% (54%), Verifi
    # 100/91/98/100/100% (81%) -> 99/86/98/100/98% (79%), edits 12% -> 12% (identity 55% -> 66%).
    verifi_prob: float = 0.5
    eval_count: int = 48
    ablation_steps: int = 400  # text-to-image steps of each ablation variant (`train-demo --ablations`)

    def __post_init__(self) -> None:
        def per_cycle_values(name: str, kinds: tuple[type, ...], what: str) -> None:
            values = getattr(self, name)
            if (not isinstance(values, (tuple, list)) or not values
                    or any(isinstance(v, bool) or not isinstance(v, kinds) or not v > 0 for v in values)):
                raise ValueError(f"{name} must be a tuple of one or more positive {what} (one per cycle), "
                                 f"got {values!r}")

        for name in ("decoder_steps", "edit_steps", "edit_repeat", "edit_batch_size"):
            per_cycle_values(name, (int,), "integers")
        per_cycle_values("edit_lr", (int, float), "learning rates")
        for name in ("t2i_steps_beside_worker", "edit_extra_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        per_cycle = {name: getattr(self, name) for name in ("edit_steps", "edit_repeat", "edit_batch_size", "edit_lr")}
        if len({len(values) for values in per_cycle.values()}) > 1:
            raise ValueError(", ".join(f"{name} {values!r}" for name, values in per_cycle.items())
                             + " need one value per edit cycle each")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quick_recipe(seed: int = 0) -> DemoRecipe:
    """Minutes on a CPU: every stage runs, nothing is learned (for tests and smoke runs)."""
    vlm = VLMTrainConfig(num_layers=4, hidden_size=32, steps=6, batch_size=8, pool_size=24, warmup_steps=2, seed=seed)
    return DemoRecipe(seed=seed, vlm=vlm, vlm_eval_count=4, vae_images=16, vae_steps=3, vae_batch_size=4,
                      vae_crop=16, decoder_steps=(2, 1), t2i_samples=12, edit_samples=6, verifi_max_new_tokens=8, cache_batch_size=8,
                      dit_width=32, dit_depth=1, dit_heads=2, time_embed_dim=32, lap_heads=2, refiner_blocks=1,
                      batch_size=4, t2i_steps=4, edit_steps=(2, 1), edit_batch_size=(4, 3), edit_lr=(2e-4, 3e-4),
                      warmup_steps=1, eval_count=1, ablation_steps=2, t2i_steps_beside_worker=2,
                      vlm_layers=(0, 2))


def dit_config(recipe: DemoRecipe) -> DiTConfig:
    """The DiT on the demo autoencoder's 8x8 latents, one token per latent pixel."""
    from ..train.cli import rope_axes_for

    head_dim = recipe.dit_width // recipe.dit_heads
    return DiTConfig(in_channels=recipe.vae_latent_channels, patch_size=1, hidden_size=recipe.dit_width, depth=recipe.dit_depth,
                     num_heads=recipe.dit_heads, time_embed_dim=recipe.time_embed_dim,
                     rope_axes=rope_axes_for(head_dim), rope_theta=recipe.dit_rope_theta,
                     absolute_position=recipe.dit_absolute_position, predict_x0=recipe.dit_predict_x0,
                     image_positions=recipe.dit_image_positions)
