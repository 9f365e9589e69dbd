"""Mutants of the LM family (collapse_jax/families/lm/: family.py, its config and data, and the trainer's `fit` it
runs) and of the loop hooks it uses (collapse_jax/loop.py): prompts, what is handed on, best-on-validation, the
start model, masking, every metric's model and data, the sharding hooks and the non-finite stop."""
from benchmarks.mutants import Mutant

_LM, _LOOP = "collapse_jax/families/lm/family.py", "collapse_jax/loop.py"
_CFG, _TRAIN = "collapse_jax/families/lm/config.py", "collapse_jax/families/lm/train.py"
_TEXT = "collapse_jax/families/lm/text_metrics.py"
_T = "tests/test_lm.py::"
_CONT = _T + "test_each_generation_continues_its_own_training_blocks"
_NUM = _T + "test_metrics_recomputed_in_numpy"
_FIT = _T + "test_fit_starts_from_the_initial_model_keeps_the_best_epoch_and_ignores_rows_of_weight_0"
_NGRAM = _T + "test_ngram_rates_match_python_sets"
_NAN = _T + "test_nan_metric_stops_before_checkpointing_and_a_rerun_resumes"
_EIGHT = _T + "test_eight_devices_agree_with_one_and_hold_models_fsdp_sharded"
_WRITE = _T + "test_loop_writes_every_metric_figure_and_text_and_compiles_once"
_BAD = "tests/test_lm_config.py::test_bad_input_refused_before_compiling"
_PP = "tests/test_lm_pads_prompts.py::"
_ACC = (_PP + "test_accumulating_regimes_prompt_only_valid_rows",)
_EOS, _PADS = _PP + "test_eos_ends_a_continuation_and_pads_fill_the_block", _PP + \
    "test_pads_stay_out_of_perplexity_unit_and_end_to_end"
_LEFT = _PP + "test_a_block_with_pads_is_continued_from_its_last_real_token"
_DP = "tests/test_lm_data_paths.py::"
_CLI = _DP + "test_cli_errors_name_the_field_to_set"
_LAYOUT = _DP + "test_every_text_config_reads_either_layout_from_lm_text_path"
_DATA, _EXPORT = "collapse_jax/families/lm/data.py", "collapse_jax/families/lm/export.py"
_PAPER = "tests/test_lm_paper.py::"

MUTANTS = [
    Mutant(name="lm_prompts_always_real", file=_LM,
           old="in order\n      return x", new="in order\n      return shared[\"train\"]",
           tests=(_CONT,), why="every generation continues the real blocks, not its own training set"),
    Mutant(name="lm_hands_on_prompts", file=_LM,
           old="return new_NxL, metrics", new="return prompts_NxL, metrics",
           tests=(_CONT,), why="the prompts, not the new tokens, become the next generation's blocks"),
    Mutant(name="lm_rep_penalty_ignored", file=_CFG,
           old="repetition_penalty=d.repetition_penalty,", new="repetition_penalty=1.0,",
           tests=(_CONT,), why="config.lm.decode.repetition_penalty does not reach the decoder"),
    Mutant(name="lm_keeps_last_epoch", file=_TRAIN,
           old='better = ppl < best["valid_ppl"]', new="better = ppl == ppl",
           tests=(_FIT,), why="the last epoch is kept, not the one best on validation"),
    Mutant(name="lm_start_from_previous", file=_LM,
           old='start = init if self.c.start == "initial" else', new='start = init if self.c.start != "initial" else',
           tests=(_FIT,), why="lm.start='initial' fine-tunes the previous generation's model"),
    Mutant(name="lm_weights_ignored", file=_LM,
           old="valid_N=gen.w > 0)", new="valid_N=gen.w > -1)",
           tests=(_FIT,), why="rows of weight 0 (not yet valid) are trained on"),
    Mutant(name="lm_data_ppl0_current_model", file=_LM,
           old='self._block_nll(model0["params"]', new='self._block_nll(model["params"]',
           tests=(_NUM,), why="training blocks are scored by the current model, not generation 0's"),
    Mutant(name="lm_test_ppl_on_valid", file=_LM,
           old='"test_ppl": self._ppl(model["params"], test)', new='"test_ppl": self._ppl(model["params"], '
           'self._blocks(shared["valid"]))',
           tests=(_NUM,), why="test perplexity is measured on the validation blocks"),
    Mutant(name="lm_quantile_index", file=_TEXT,
           old="pos = jnp.asarray(qs, jnp.float32) * (n - 1)", new="pos = jnp.asarray(qs, jnp.float32) * n",
           tests=(_NUM,), why="quantiles index one past numpy's linear interpolation"),
    Mutant(name="lm_hist_not_density", file=_LM,
           old="(counts / (n * hi / HIST_BINS))", new="(counts / n)",
           tests=(_NUM,), why="the log-perplexity histogram is not a density per unit log-perplexity"),
    Mutant(name="lm_kl_generation0", file=_LM,
           old='opt_model.apply(self.model_cfg, model["params"], ids, mask), axis=-1)',
           new='opt_model.apply(self.model_cfg, model0["params"], ids, mask), axis=-1)',
           tests=(_NUM,), why="KL(source || model) is measured on generation 0's model"),
    Mutant(name="lm_loglik_skips_first_new_token", file=_LM,
           old="jnp.arange(2 * L) >= L", new="jnp.arange(2 * L) > L",
           tests=(_NUM,), why="the first new token (given the prompt's last) is not scored"),
    Mutant(name="lm_rep_across_blocks", file=_TEXT,
           old="(total - distinct([block_X] + cols)) / total", new="(total - distinct(cols)) / total",
           tests=(_NGRAM,), why="rep-n counts repeats across blocks, not within a block"),
    Mutant(name="lm_samples_n_unchecked", file=_CFG,
           old="  if run.samples.n != n_train:", new="  if False:",
           tests=(_BAD,), why="samples.n different from the block count is not refused"),
    Mutant(name="loop_sample_metrics_dropped", file=_LOOP,
           old="metrics = {**metrics, **sample_metrics}", new="metrics = metrics",
           tests=(_WRITE,), why="metrics returned by sample (the generated corpus's) are lost"),
    Mutant(name="loop_model_shardings_ignored", file=_LOOP,
           old='    placed["prev"] = self.family.model_shardings(shapes["prev"])\n'
               '    placed["model0"] = self.family.model_shardings(shapes["model0"])\n', new="",
           tests=(_EIGHT,), why="the family's FSDP placement of the carried models is ignored"),
    Mutant(name="loop_non_finite_not_checked", file=_LOOP,
           old="    if bad is not None:  # before", new="    if False:  # before",
           tests=(_NAN,), why="a NaN metric is checkpointed and the run goes on"),
    Mutant(name="lm_fit_buffer_not_ragged", file=_TRAIN,
           old="state_shardings=state_sh, valid_N=valid_N, epochs=E)", new="state_shardings=state_sh, epochs=E)",
           tests=(_FIT,), why="rows of weight 0 take batch slots and Adam steps on their all-masked batches"),
    Mutant(name="lm_fit_cosine_over_capacity", file=_TRAIN,
           old="None if n_valid is None else E * steps_per_epoch(n_valid, B))",
           new="None if n_valid is None else E * steps_per_epoch(n_blocks, B))",
           tests=(_FIT,), why="a ragged buffer's cosine runs over its capacity's steps, not its valid rows'"),
    Mutant(name="lm_prompts_from_invalid_rows", file=_LM,
           old="x[jnp.sort(ops.valid_first(key, w > 0, n))]", new="x[jnp.sort(ops.valid_first(key, w > -1, n))]",
           tests=_ACC, why="accumulating regimes draw prompts from the buffer's unfilled (zero) rows too"),
    Mutant(name="lm_pads_in_mask", file=_LM,
           old='"mask": (ids_NxL != self.model_cfg.pad_token_id).astype(jnp.int32)}',
           new='"mask": jnp.ones_like(ids_NxL)}',
           tests=(_PADS,), why="pads after an early EOS are trained on and counted in perplexities"),
    Mutant(name="lm_prompt_pads_read_as_tokens", file=_LM,
           old="    return (jnp.take_along_axis(rows_NxL, order_NxL, axis=1),\n"
               "            jnp.take_along_axis(real_NxL, order_NxL, axis=1).astype(jnp.int32))",
           new="    return rows_NxL, jnp.ones_like(rows_NxL)",
           tests=(_LEFT,), why="a block ending in pads is continued with the pads as prompt tokens"),
    Mutant(name="lm_prompt_right_padded", file=_LM,
           old="    return (jnp.take_along_axis(rows_NxL, order_NxL, axis=1),\n"
               "            jnp.take_along_axis(real_NxL, order_NxL, axis=1).astype(jnp.int32))",
           new="    return rows_NxL, real_NxL.astype(jnp.int32)",
           tests=(_LEFT,), why="pads masked but left at the end: the first new token is predicted from a pad"),
    Mutant(name="lm_bytes_tokenizer_opt_ids", file=_CFG,
           old="      over = {**_BYTE_IDS, **over}", new="      over = over",
           tests=(_EOS,), why="a model trained on bytes stops and pads with OPT's ids, which are bytes 2 and 1"),
    Mutant(name="lm_tokenizer_ids_unchecked", file=_DATA,
           old="  if (tok.eos_id, tok.pad_id) != (model_cfg.eos_token_id, model_cfg.pad_token_id):",
           new="  if False:", tests=(_BAD,), why="a tokenizer whose EOS / pad ids are not the model's is accepted"),
    Mutant(name="lm_text_error_field_dropped", file=_DATA,
           old='raise ConfigError(msg if msg.startswith("config.") else f"config.{name}: {msg}") from None',
           new="raise", tests=(_CLI,), why="a reader's error does not name the config field that fixes it"),
    Mutant(name="lm_hf_path_error_unnamed", file=_CFG,
           old="  if not c.hf_path or not os.path.isdir(c.hf_path):", new="  if not c.hf_path:",
           tests=(_CLI,), why="a missing lm.hf_path folder is reported by path, not by the field and what to set"),
    Mutant(name="lm_block_len_error_unnamed", file=_CFG,
           old="  if 2 * c.block_len > positions:", new="  if False:",
           tests=(_CLI,), why="a block_len too long for the model's positions does not say what to set"),
    Mutant(name="lm_scratch_trains_on_train_split", file="configs/lm.py",
           old='train_split="valid", tokenizer="bpe"', new='train_split="train", tokenizer="bpe"',
           tests=(_LAYOUT,), why="scratch_wikitext2 no longer trains on the valid split it documents"),
    Mutant(name="lm_export_generation_off_by_one", file=_EXPORT,
           old='have = {e - 1: (e, "prev") for e in steps}', new='have = {e: (e, "prev") for e in steps}',
           tests=(_PAPER + "test_export_writes_the_generations_model",),
           why="export writes the model of the generation after the one asked for"),
    Mutant(name="lm_export_model0_for_prev", file=_EXPORT,
           old='have = {e - 1: (e, "prev") for e in steps}', new='have = {e - 1: (e, "model0") for e in steps}',
           tests=(_PAPER + "test_export_writes_the_generations_model",),
           why="export writes generation 0's model whatever generation is asked for"),
    Mutant(name="lm_export_no_tokenizer", file=_EXPORT,
           old='  if c.data == "text" and c.text.tokenizer == "hf":', new="  if False:",
           tests=(_PAPER + "test_export_writes_the_generations_model",),
           why="the exported folder lacks the run's tokenizer"),
    Mutant(name="lm_tensorboard_texts_of_generation_0", file="collapse_jax/families/lm/family.py",
           old="enumerate(zip(self.blocks[\"prompts\"], conts[g]))}", new="enumerate(zip(self.blocks[\"prompts\"], conts[0]))}",
           tests=(_T + "test_loop_sends_every_generations_sample_texts_and_metrics_to_tensorboard",),
           why="TensorBoard shows generation 0's continuations at every generation"),
]
