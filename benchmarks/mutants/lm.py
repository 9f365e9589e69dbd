"""Mutants of the LM trainer (collapse_jax/families/lm/train.py, its loss in loss.py) and the LM sharding
(collapse_jax/sharding.py): the loss's shift and mask, the optimizer and its schedule, the epoch's shuffle and
remainder, ragged buffers, key streams, perplexity's padding, best-on-validation, validation of input, and the FSDP
placement; and the progress lines from inside compiled programs (collapse_jax/progress.py, with the trainer that
reports to it)."""
from benchmarks.mutants import Mutant

_TRAIN, _SHARD = "collapse_jax/families/lm/train.py", "collapse_jax/sharding.py"
_LOSS, _OPS = "collapse_jax/families/lm/loss.py", "collapse_jax/ops.py"
_T, _S = "tests/test_lm_train.py::", "tests/test_sharding.py::"
_NLL = _T + "test_token_nll_shift_and_mask"
_PPL = _T + "test_perplexity_batched_equals_one_pass"
_HAND = _T + "test_two_steps_match_hand_adamw"
_HAND_WD = _HAND + "[0.1-0.0]"
_HAND_CLIP = _HAND + "[0.0-0.05]"
_EPOCH = _T + "test_epoch_sees_every_block_once_in_a_fresh_order"
_BEST = _T + "test_keeps_the_epoch_best_on_validation"
_BAD = _T + "test_bad_input_refused_before_compiling"
_RAGGED = _T + "test_ragged_buffer_trains_as_its_valid_rows_alone"
_RAGGED_EPOCH = _T + "test_ragged_epoch_batches_valid_rows_in_permutation_order_and_skips_the_rest"
_TRACED = _T + "test_schedule_over_a_traced_step_count"
_PROG, _P = "collapse_jax/progress.py", "tests/test_progress.py::"
_P_ONCE = _P + "test_every_step_and_batch_printed_once"
_P_LONG = _P + "test_long_interval_prints_first_and_last_only"
_P_DEV = _P + "test_per_device_calls_print_each_step_once"
_P_KEY = _P + "test_new_key_is_a_new_run_and_only_process_0_prints"
_P_OFF = _P + "test_outputs_bit_identical_with_progress_off"

MUTANTS = [
    Mutant(name="lm_loss_no_shift", file=_LOSS,
           old="next_BxL = jnp.pad(ids_BxL[:, 1:], ((0, 0), (0, 1)))", new="next_BxL = ids_BxL",
           tests=(_NLL,), why="each position scores its own token, not the next one"),
    Mutant(name="lm_loss_grad_no_shift", file=_LOSS,
           old="next_BxL = jnp.pad(ids_BxL[:, 1:], pad, constant_values=-1)", new="next_BxL = ids_BxL",
           tests=("tests/test_lm_train.py::test_token_nll_gradient_is_autodiffs",),
           why="the hand-written loss gradient's one-hot marks each position's own token, not the next one"),
    Mutant(name="lm_dense_bias_grad_dropped", file="collapse_jax/families/lm/dense.py",
           old="db_O = _contract(jnp.ones(g_TxO.shape[:1], g_TxO.dtype), g_TxO, (0,), (0,), g_TxO.dtype)",
           new="db_O = jnp.zeros(g_TxO.shape[1:], g_TxO.dtype)",
           tests=("tests/test_opt.py::test_dense_and_lm_head_gradients_are_autodiffs",),
           why="the hand-written projection backward leaves the biases untrained"),
    Mutant(name="lm_head_grad_untransposed_input", file="collapse_jax/families/lm/dense.py",
           old="dx_TxP = _contract(g_TxV, table_VxP, (1,), (0,), jnp.float32)",
           new="dx_TxP = _contract(g_TxV, jnp.flip(table_VxP, 0), (1,), (0,), jnp.float32)",
           tests=("tests/test_opt.py::test_dense_and_lm_head_gradients_are_autodiffs",),
           why="the LM head's input gradient reads the embedding rows in the wrong order"),
    Mutant(name="lm_loss_mask_label_only", file=_LOSS,
           old="(mask_BxL[:, 1:] * mask_BxL[:, :-1])", new="(mask_BxL[:, 1:])",
           tests=(_NLL,), why="a token predicted from a padded position counts"),
    Mutant(name="lm_ppl_pad_rows_count", file=_TRAIN,
           old="mask_CxExL = ops.to_chunks(mask_NxL, E)", new="mask_CxExL = ops.to_chunks(mask_NxL, E, fill=1)",
           tests=(_PPL,), why="perplexity's padding rows count as tokens"),
    Mutant(name="lm_schedule_per_epoch", file=_TRAIN,
           old="return make_optimizer(tcfg, E * steps_per_epoch(n_blocks, B),",
           new="return make_optimizer(tcfg, steps_per_epoch(n_blocks, B),",
           tests=(_HAND_WD,), why="the cosine decays over one epoch, not the run"),
    Mutant(name="lm_decay_on_all_params", file=_TRAIN,
           old="weight_decay=tcfg.weight_decay, mask=decay_mask)", new="weight_decay=tcfg.weight_decay)",
           tests=(_HAND_WD,), why="biases and LayerNorm scales decay too"),
    Mutant(name="lm_clip_ignored", file=_TRAIN,
           old="if tcfg.grad_clip > 0 else adamw", new="if False else adamw",
           tests=(_HAND_CLIP,), why="grad_clip has no effect"),
    Mutant(name="lm_remainder_unmasked", file=_TRAIN,
           old='mask_NxL[idx_B] * keep_B[:, None]', new='mask_NxL[idx_B]',
           tests=(_EPOCH,), why="the last batch's padding rows (copies of block order[0]) are trained on"),
    Mutant(name="lm_shuffle_same_every_epoch", file=_TRAIN,
           old="jax.random.fold_in(jax.random.fold_in(state.key, SHUFFLE), epoch), valid_N)",
           new="jax.random.fold_in(state.key, SHUFFLE), valid_N)",
           tests=(_EPOCH,), why="every epoch visits the blocks in the same order"),
    Mutant(name="lm_dropout_same_every_step", file=_TRAIN,
           old="jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT), state.step)",
           new="jax.random.fold_in(state.key, DROPOUT)",
           tests=(_T + "test_dropout_key_follows_step",), why="every step drops the same units"),
    # The trainer's selection seen from the host-side run (the family's: lm_family.py's lm_keeps_last_epoch).
    Mutant(name="lm_best_is_last", file=_TRAIN,
           old='better = ppl < best["valid_ppl"]', new="better = ppl == ppl",
           tests=(_BEST,), why="the last epoch is kept, not the best on validation"),
    Mutant(name="lm_train_params_donated", file=_TRAIN,
           old="out_shardings=(rep, best_sh, rep))", new="out_shardings=(rep, best_sh, rep), donate_argnums=0)",
           tests=(_BEST,), why="the caller's parameters are consumed by the compiled fine-tune"),
    Mutant(name="lm_vocab_unchecked", file=_TRAIN,
           old="if lo < 0 or hi >= model_cfg.vocab_size:", new="if lo < 0:",
           tests=(_BAD,), why="token ids past the vocabulary are gathered silently (clamped)"),
    Mutant(name="lm_batch_shards_unchecked", file=_TRAIN,
           old="    if value % shards:", new="    if False:",
           tests=(_BAD, "tests/test_lm_config.py::test_bad_input_refused_before_compiling"),
           why="a batch the mesh cannot split fails inside compilation"),
    # --- ragged buffers (accumulate regimes): valid rows only, skipped steps, the schedule over the valid steps
    Mutant(name="lm_ragged_steps_not_skipped", file=_TRAIN,
           old="ops.ragged_scan(train, state, S, steps if ragged else None)", new="ops.ragged_scan(train, state, S)",
           tests=(_RAGGED_EPOCH, _RAGGED), why="Adam steps on batches past the valid rows (all masked)"),
    Mutant(name="lm_ragged_order_ignores_validity", file=_TRAIN,
           old="jax.random.fold_in(state.key, SHUFFLE), epoch), valid_N)",
           new="jax.random.fold_in(state.key, SHUFFLE), epoch), jnp.ones_like(valid_N))",
           tests=(_RAGGED_EPOCH, _RAGGED), why="invalid rows are shuffled in among the valid ones"),
    Mutant(name="lm_ragged_mask_capacity", file=_TRAIN,
           old="keep = (jnp.arange(S * B) < n_valid)", new="keep = (jnp.arange(S * B) < n)",
           tests=(_RAGGED,), why="the last valid batch is filled up with invalid rows, which train"),
    Mutant(name="lm_shuffle_not_permutation", file=_OPS,
           old="  for _ in range(rounds):", new="  for _ in range(rounds + 1):",
           tests=(_EPOCH,), why="a full buffer's order is no longer jax.random.permutation's (replace runs change)"),
    Mutant(name="lm_schedule_ignores_valid_steps", file=_TRAIN,
           old="return lambda count: jnp.where(valid_steps == total_steps, static(count), traced(count))",
           new="return static", tests=(_RAGGED,), why="a ragged buffer's cosine runs over the capacity's steps"),
    Mutant(name="lm_schedule_always_traced", file=_TRAIN,
           old="return lambda count: jnp.where(valid_steps == total_steps, static(count), traced(count))",
           new="return traced", tests=(_TRACED,),
           why="full buffers get the traced cosine, which rounds differently (replace results change)"),
    # --- progress lines
    Mutant(name="progress_callback_dropped", file=_PROG,
           old="  if not ENABLED:\n    return\n", new="  if True:\n    return\n",
           tests=(_P_ONCE,), why="nothing is reported"),
    Mutant(name="progress_no_dedupe", file=_PROG,
           old="    if run.calls[key] > 1:", new="    if False:",
           tests=(_P_DEV,), why="per-device callbacks print a step once per device"),
    Mutant(name="progress_copies_ignored", file=_PROG,
           old="copies = 1 if mesh.empty else", new="copies = 1 if True else",
           tests=(_P_DEV,), why="a device's copy of the first step starts a new run"),
    Mutant(name="progress_rerun_silent", file=_PROG,
           old="and run.calls.get(key, 0) >= st.copies", new="and False",
           tests=(_P_DEV,), why="a rerun with the same key prints nothing"),
    Mutant(name="progress_counter_from_0", file=_PROG,
           old='where = f"{st.unit} {step + 1}/{steps}"', new='where = f"{st.unit} {step}/{steps}"',
           tests=(_P_ONCE,), why="steps counted from 0"),
    Mutant(name="progress_no_rate_limit", file=_PROG,
           old="now - run.t_line >= EVERY_S", new="now - run.t_line >= 0",
           tests=(_P_LONG,), why="every report prints whatever the interval"),
    Mutant(name="progress_last_not_forced", file=_PROG,
           old="or done == total)", new=")",
           tests=(_P_LONG,), why="a phase's last step is dropped by the rate limit"),
    Mutant(name="progress_every_process", file=_PROG,
           old="  if jax.process_index() != 0:\n    return", new="  if False:\n    return",
           tests=(_P_KEY,), why="every process prints"),
    Mutant(name="progress_negative_interval_accepted", file=_PROG,
           old="  if not value >= 0:  # NaN too", new="  if False:",
           tests=(_P + "test_bad_interval_env_is_refused",), why="a bad COLLAPSE_JAX_PROGRESS_EVERY is taken as is"),
    Mutant(name="progress_epoch_not_passed", file=_TRAIN,
           old='progress.report("lm train", s, steps, epoch=epoch,', new='progress.report("lm train", s, steps, epoch=0,',
           tests=(_P_ONCE,), why="the trainer reports every epoch as the first"),
    Mutant(name="progress_changes_numerics", file=_TRAIN,
           old="state, m = train_step(state, batch, model_cfg=model_cfg, tx=tx)",
           new="state, m = train_step(state, jax.tree.map(lambda a: a[::-1], batch) if progress.ENABLED else batch, "
           "model_cfg=model_cfg, tx=tx)",
           tests=(_P_OFF,), why="the progress path changes what is computed (here: the batch's row order)"),
    Mutant(name="shard_no_divisibility", file=_SHARD,
           old=" and shape[d] % size == 0:", new=":",
           tests=(_S + "test_logical_spec_rules",),
           why="an odd dimension is split (a compile error) instead of replicated"),
    Mutant(name="shard_opt_state_replicated", file=_SHARD,
           old="    if mirrors(x):", new="    if False:",
           tests=(_S + "test_opt_state_mirrors_param_shardings",), why="Adam's moments are not split with the params"),
    Mutant(name="shard_batch_data_only", file=_SHARD,
           old='  return NamedSharding(mesh, P(batch_axes(mesh)))', new='  return NamedSharding(mesh, P(AXIS))',
           tests=(_S + "test_lm_mesh_and_batch_sharding",),
           why="the batch is not split over 'fsdp' (fsdp ranks duplicate work)"),
    Mutant(name="opt_ln_eps_x10", file="collapse_jax/families/lm/model.py",
           old="LN_EPS = 1e-5", new="LN_EPS = 1e-4",
           tests=("tests/test_opt.py::test_logits_match_hf_fp32",),
           why="OPT's LayerNorm epsilon 10x too large (logits move by ~2e-5 of their scale)"),
]
