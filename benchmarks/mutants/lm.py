"""Mutants of the LM trainer (collapse_jax/lm_train.py) and the LM sharding (collapse_jax/sharding.py): the loss's
shift and mask, the optimizer and its schedule, the epoch's shuffle and remainder, key streams, perplexity's
padding, best-on-validation, validation of input, and the FSDP placement."""
from benchmarks.mutants import Mutant

_TRAIN, _SHARD = "collapse_jax/lm_train.py", "collapse_jax/sharding.py"
_T, _S = "tests/test_lm_train.py::", "tests/test_sharding.py::"
_NLL = _T + "test_token_nll_shift_and_mask"
_PPL = _T + "test_perplexity_batched_equals_one_pass"
_HAND = _T + "test_two_steps_match_hand_adamw"
_HAND_WD = _HAND + "[0.1-0.0]"
_HAND_CLIP = _HAND + "[0.0-0.05]"
_EPOCH = _T + "test_epoch_sees_every_block_once_in_a_fresh_order"
_BEST = _T + "test_keeps_the_epoch_best_on_validation"
_BAD = _T + "test_bad_input_refused_before_compiling"

MUTANTS = [
    Mutant(name="lm_loss_no_shift", file=_TRAIN,
           old="jnp.take_along_axis(logp_BxTxV, ids_BxL[:, 1:, None]",
           new="jnp.take_along_axis(logp_BxTxV, ids_BxL[:, :-1, None]",
           tests=(_NLL,), why="each position scores its own token, not the next one"),
    Mutant(name="lm_loss_mask_label_only", file=_TRAIN,
           old="(mask_BxL[:, 1:] * mask_BxL[:, :-1])", new="(mask_BxL[:, 1:])",
           tests=(_NLL,), why="a token predicted from a padded position counts"),
    Mutant(name="lm_ppl_pad_rows_count", file=_TRAIN,
           old="jnp.pad(mask_NxL, pad)", new="jnp.pad(mask_NxL, pad, constant_values=1)",
           tests=(_PPL,), why="perplexity's padding rows count as tokens"),
    Mutant(name="lm_schedule_per_epoch", file=_TRAIN,
           old="tx = make_optimizer(tcfg, tcfg.epochs * steps_per_epoch(n_train, tcfg.batch_size))",
           new="tx = make_optimizer(tcfg, steps_per_epoch(n_train, tcfg.batch_size))",
           tests=(_HAND_WD,), why="the cosine decays over one epoch, not the run"),
    Mutant(name="lm_decay_on_all_params", file=_TRAIN,
           old="weight_decay=tcfg.weight_decay,\n                      mask=decay_mask)",
           new="weight_decay=tcfg.weight_decay)",
           tests=(_HAND_WD,), why="biases and LayerNorm scales decay too"),
    Mutant(name="lm_clip_ignored", file=_TRAIN,
           old="if tcfg.grad_clip > 0 else adamw", new="if False else adamw",
           tests=(_HAND_CLIP,), why="grad_clip has no effect"),
    Mutant(name="lm_remainder_unmasked", file=_TRAIN,
           old='mask_NxL[idx_B] * keep_B[:, None]', new='mask_NxL[idx_B]',
           tests=(_EPOCH,), why="the last batch's padding rows (copies of block order[0]) are trained on"),
    Mutant(name="lm_shuffle_same_every_epoch", file=_TRAIN,
           old="jax.random.fold_in(jax.random.fold_in(state.key, SHUFFLE), epoch), n)",
           new="jax.random.fold_in(state.key, SHUFFLE), n)",
           tests=(_EPOCH,), why="every epoch visits the blocks in the same order"),
    Mutant(name="lm_dropout_same_every_step", file=_TRAIN,
           old="jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)",
           new="jax.random.fold_in(state.key, DROPOUT)",
           tests=(_T + "test_dropout_key_follows_step",), why="every step drops the same units"),
    Mutant(name="lm_best_is_last", file=_TRAIN,
           old="if ppl < history[\"best_valid_ppl\"]:", new="if True:",
           tests=(_BEST,), why="the last epoch is kept, not the best on validation"),
    Mutant(name="lm_best_not_copied", file=_TRAIN,
           old="best, history[\"best_epoch\"], history[\"best_valid_ppl\"] = copy_fn(state.params)",
           new="best, history[\"best_epoch\"], history[\"best_valid_ppl\"] = state.params",
           tests=(_BEST,), why="the kept model is the donated (then deleted) training buffer"),
    Mutant(name="lm_vocab_unchecked", file=_TRAIN,
           old="if lo < 0 or hi >= model_cfg.vocab_size:", new="if lo < 0:",
           tests=(_BAD,), why="token ids past the vocabulary are gathered silently (clamped)"),
    Mutant(name="lm_batch_shards_unchecked", file=_TRAIN,
           old="    if getattr(tcfg, f) % shards:", new="    if False:",
           tests=(_BAD,), why="a batch the mesh cannot split fails inside compilation"),
    Mutant(name="shard_no_divisibility", file=_SHARD,
           old="      if dim % _axis_size(mesh, axis) == 0:", new="      if True:",
           tests=(_S + "test_logical_spec_rules",),
           why="an odd dimension is split (a compile error) instead of replicated"),
    Mutant(name="shard_opt_state_replicated", file=_SHARD,
           old="    if mirrors(x):", new="    if False:",
           tests=(_S + "test_opt_state_mirrors_param_shardings",), why="Adam's moments are not split with the params"),
    Mutant(name="shard_batch_data_only", file=_SHARD,
           old='  return NamedSharding(mesh, P(batch_axes(mesh)))', new='  return NamedSharding(mesh, P(AXIS))',
           tests=(_S + "test_2d_mesh_and_batch_sharding",),
           why="the batch is not split over 'fsdp' (fsdp ranks duplicate work)"),
]
