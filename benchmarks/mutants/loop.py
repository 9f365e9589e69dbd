"""Mutants of the generation loop, the regimes, the loop-level config (config.py and the shared field checks of
fields.py) and the loop's metrics (issue 7; ported to the layout of issue 16)."""
from benchmarks.mutants import Mutant

_HAND = "tests/test_loop.py::test_key_schedule_recomputed_by_hand"
_STATS = "tests/test_loop.py::test_stats_are_numpy_over_the_real_chains_only"
_SNAP = "tests/test_loop.py::test_snapshots_are_chain_0s_samples_of_exactly_those_generations"
_CHUNKS = "tests/test_loop.py::test_results_do_not_depend_on_checkpoint_every_or_where_a_run_stops"
_SPY = "tests/test_regimes.py::test_every_regime_through_the_loop_trains_on_exactly_the_right_rows"
_UNIFORM = "tests/test_regimes.py::test_accumulate_subsample_inclusion_is_uniform_over_valid_entries"
_RF_ROUND = "tests/test_regimes.py::test_real_fraction_takes_round_f_m_distinct_real_rows_on_a_growing_schedule"
_CFG = "tests/test_config.py"

LOOP, REG = "collapse_jax/loop.py", "collapse_jax/regimes.py"
FAM = "collapse_jax/family.py"
MET = "collapse_jax/metrics.py"
CKPT = "collapse_jax/checkpoint.py"
_RESYNC = "tests/test_loop.py::test_metrics_jsonl_follows_the_checkpoint_after_a_kill_byte_for_byte"
_SKIP = ("tests/test_loop.py::"
         "test_a_chunk_is_not_saved_while_a_save_is_busy_or_recent_but_a_stop_and_the_last_one_are")
_ASYNC = "tests/test_checkpoint.py::test_saves_are_asynchronous_the_next_chunk_starts_before_the_save_is_done"
_HOST_PACK = "tests/test_checkpoint.py::test_host_pack_round_trips_bit_for_bit"
_CHAIN_PACK = "tests/test_checkpoint.py::test_chain_packer_round_trips_through_async_checkpoints_onto_another_mesh"

MUTANTS = [
    # --- loop.py: keys ---
    Mutant(name="loop_fit_sample_keys_swapped", file=LOOP,
           old="fam.sample(model, spec.m_max, jax.random.fold_in(key, 2), gen)",
           new="fam.sample(model, spec.m_max, jax.random.fold_in(key, 1), gen)",
           tests=(_HAND,), why="sampling uses the fitting key"),
    Mutant(name="loop_generation_key_reuses_gen0", file=LOOP,
           old='key = jax.random.fold_in(jax.random.fold_in(carry["key"], 0), g)',
           new='key = jax.random.fold_in(jax.random.fold_in(carry["key"], 0), 0)',
           tests=(_HAND,), why="every generation draws with generation 0's key"),
    Mutant(name="loop_real_data_key_is_generation_stream", file=LOOP,
           old="real, aux = fam.init_chain(jax.random.fold_in(chain_key, 1), shared)",
           new="real, aux = fam.init_chain(jax.random.fold_in(chain_key, 0), shared)",
           tests=(_HAND,), why="a chain's real data come from the key its generation keys derive from"),
    Mutant(name="loop_chain_index_off_by_one", file=LOOP,
           old="keys = jax.vmap(lambda c: jax.random.fold_in(root, c))(jnp.arange(self.padded_chains))",
           new="keys = jax.vmap(lambda c: jax.random.fold_in(root, c + 1))(jnp.arange(self.padded_chains))",
           tests=(_HAND,), why="chain c runs chain c+1's keys (chain 0 unreproducible alone)"),
    Mutant(name="loop_mix_key_is_sample_key", file=LOOP,
           old='regimes.training_set(spec, carry["data"], g, jax.random.fold_in(key, 0), counts[g])',
           new='regimes.training_set(spec, carry["data"], g, jax.random.fold_in(key, 2), counts[g])',
           tests=(f"{_SPY}[real_fraction]", f"{_SPY}[accumulate_subsample]"),
           why="the real subset / subsample is drawn with the sampling key"),
    Mutant(name="loop_chunk_generations_restart_at_0", file=LOOP,
           old="chunk(carry, np.arange(s, e, dtype=np.int32), shared)",
           new="chunk(carry, np.arange(e - s, dtype=np.int32), shared)",
           tests=(_CHUNKS,), why="each chunk numbers its generations from 0: keys repeat, results depend on chunking"),
    Mutant(name="loop_resume_restarts_at_0", file=LOOP,
           old="for s in range(start, G, L):", new="for s in range(0, G, L):",
           tests=(_CHUNKS,), why="a resumed run re-runs generation 0 onwards on the restored (accumulated) pool"),
    # --- loop.py: counts, stats, snapshots, metrics.jsonl ---
    Mutant(name="loop_update_count_off_by_one", file=LOOP,
           old='data = regimes.update(spec, carry["data"], samples, counts[g + 1])',
           new='data = regimes.update(spec, carry["data"], samples, counts[g])',
           tests=(f"{_SPY}[replace]",), why="generation g+1 trains on M_g samples on a growing schedule"),
    Mutant(name="loop_padding_chains_in_stats", file=LOOP,
           old="metrics_lib.aggregate(metrics, self.n_chains, self.run.quantiles)",
           new="metrics_lib.aggregate(metrics, self.padded_chains, self.run.quantiles)",
           tests=(_STATS,), why="mesh padding chains leak into mean/std/quantiles"),
    Mutant(name="loop_snapshot_chunk_start_missed", file=LOOP,
           old="if s <= g < e:", new="if s < g < e:",
           tests=(_SNAP,), why="a snapshot generation that starts a chunk is never kept"),
    Mutant(name="loop_snapshot_last_chain", file=LOOP,
           old="snap = snap[0]", new="snap = snap[-1]",
           tests=(_SNAP,), why="snapshots come from a mesh padding chain, not chain 0"),
    Mutant(name="loop_train_samples_reports_m_g", file=LOOP,
           old="sizes = regimes.train_sizes(exp.spec, exp.counts)",
           new="sizes = exp.counts",
           tests=(f"{_SPY}[accumulate]",), why="metrics.jsonl says M_g where an accumulating regime trains on more"),
    Mutant(name="loop_num_devices_bound", file=FAM,
           old="if run.num_devices > len(devices):", new="if run.num_devices >= len(devices):",
           tests=(f"{_CFG}::test_num_devices_beyond_the_visible_ones_is_a_config_error",),
           why="all visible devices refused"),
    # --- asynchronous checkpoints, metrics.jsonl appends (the loop-overhead issue) ---
    Mutant(name="loop_jsonl_not_resynced_on_start", file=LOOP,
           old="    jsonl.sync(history, start)\n", new="    pass\n",
           tests=(_RESYNC,), why="a resumed run appends to a file that is ahead of, behind or torn past its checkpoint"),
    Mutant(name="loop_jsonl_sync_keeps_a_longer_file", file=MET,
           old="if paths.read_text(path) == text:", new="if paths.read_text(path).startswith(text):",
           tests=(f"{_RESYNC}[append_landed_save_did_not]", f"{_RESYNC}[torn_last_line]"),
           why="lines past the checkpoint (or a torn line) survive the resume"),
    Mutant(name="loop_save_while_busy", file=LOOP,
           old="due = time.monotonic() - last_save >= min_seconds and not ckpts.busy()",
           new="due = time.monotonic() - last_save >= min_seconds",
           tests=(f"{_SKIP}[busy]",), why="a chunk is saved while the previous save is still being written"),
    Mutant(name="loop_save_ignores_min_seconds", file=LOOP,
           old="due = time.monotonic() - last_save >= min_seconds and not ckpts.busy()",
           new="due = not ckpts.busy()", tests=(f"{_SKIP}[recent]",),
           why="checkpoint_min_seconds has no effect"),
    Mutant(name="loop_stop_chunk_may_be_skipped", file=LOOP,
           old="if stop or _save_due(", new="if _save_due(", tests=(f"{_SKIP}[busy]",),
           why="the run's last chunk (or a stop) can end without a checkpoint"),
    Mutant(name="loop_nan_message_names_chunk_start", file=LOOP,
           old="so a rerun resumes at generation {saved} from", new="so a rerun resumes at generation {s} from",
           tests=("tests/test_loop.py::"
                  "test_nan_error_names_the_checkpoint_a_rerun_resumes_from_when_saves_were_skipped",),
           why="after skipped saves the error names a resume point that has no checkpoint"),
    Mutant(name="loop_jsonl_append_from_generation_0", file=LOOP,
           old="jsonl.append(history, s, e)", new="jsonl.append(history, 0, e)",
           tests=("tests/test_loop.py::test_metrics_jsonl_and_config_written",),
           why="each chunk appends the whole history again"),
    Mutant(name="ckpt_save_waits_for_itself", file=CKPT,
           old="    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)\n",
           new=("    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)\n"
                "    self._manager.wait_until_finished()\n"),
           tests=(_ASYNC,), why="saves are synchronous again: the next chunk waits for the files"),
    Mutant(name="ckpt_async_disabled", file=CKPT,
           old="enable_async_checkpointing=async_save", new="enable_async_checkpointing=False",
           tests=(_ASYNC,), why="Orbax saves synchronously"),
    Mutant(name="loop_exit_does_not_await_the_save", file=LOOP,
           old="  finally:\n    ckpts.close()\n", new="  finally:\n    pass\n",
           tests=(_ASYNC,), why="a run (stopped, failed or finished) returns with its last save still in flight"),
    Mutant(name="ckpt_unpack_host_views_orbax_buffer", file=CKPT,
           old="out[i] = p.reshape(leaves[i].shape).copy()", new="out[i] = p.reshape(leaves[i].shape)",
           tests=(_HOST_PACK,), why="the restored history is a view of one restored buffer"),
    Mutant(name="ckpt_chain_pack_order_reversed", file=CKPT,
           old="jnp.concatenate([ls[i].reshape(n, -1) for i in idx], axis=1)",
           new="jnp.concatenate([ls[i].reshape(n, -1) for i in idx[::-1]], axis=1)",
           tests=(_CHAIN_PACK, "tests/test_loop.py::test_interrupted_in_process_equals_uninterrupted"),
           why="a packed carry unpacks into the wrong leaves"),
    # --- metrics.py as the loop uses it ---
    Mutant(name="loop_quantile_order_swapped", file=MET,
           old="jnp.quantile(m, jnp.asarray(quantiles, m.dtype))",
           new="jnp.quantile(m, jnp.asarray(quantiles[::-1], m.dtype))",
           tests=(_STATS,), why="q05 holds the 95th percentile"),
    Mutant(name="loop_std_ddof1", file=MET,
           old="m.std()[None]", new="m.std(ddof=1)[None]",
           tests=(_STATS,), why="std over chains is not numpy's (population) std"),
    # --- regimes.py ---
    Mutant(name="regime_real_fraction_floor", file=REG,
           old="tuple(round(f * m) for m in counts)", new="tuple(int(f * m) for m in counts)",
           tests=(f"{_SPY}[real_fraction]",), why="round(f M_g) truncated: 3.7 real rows become 3"),
    Mutant(name="regime_real_fraction_float32_round", file=REG,
           old="k = jnp.asarray(spec.real_counts, jnp.int32)[g]",
           new="k = jnp.round(spec.real_fraction * n_g).astype(jnp.int32)",
           tests=(_RF_ROUND,), why="the bug fixed in issue 7: float32 rounds 0.3 * 95 up to 29"),
    Mutant(name="regime_real_with_replacement", file=REG,
           old="perm_R = jax.random.permutation(key, spec.n_real)",
           new="perm_R = jax.random.randint(key, (spec.n_real,), 0, spec.n_real)",
           tests=(f"{_SPY}[real_fraction]",), why="real rows drawn with replacement"),
    Mutant(name="regime_subsample_includes_invalid_row", file=REG,
           old='ops.valid_first(key, jnp.arange(spec.pool_size) < data["pool_n"], N)',
           new='ops.valid_first(key, jnp.arange(spec.pool_size) <= data["pool_n"], N)',
           tests=(_UNIFORM,), why="the first stale pool row can be drawn"),
    Mutant(name="regime_subsample_with_replacement", file=REG,
           old='idx = ops.valid_first(key, jnp.arange(spec.pool_size) < data["pool_n"], N)',
           new='idx = jax.random.randint(key, (N,), 0, data["pool_n"])',
           tests=(_UNIFORM,), why="subsample drawn with replacement"),
    Mutant(name="regime_subsample_favours_recent", file="collapse_jax/ops.py",
           old="u_N = jnp.where(valid_N, jax.random.uniform(key, (n,)), 2.0)",
           new="u_N = jnp.where(valid_N, jax.random.uniform(key, (n,)) - 0.1 * jnp.arange(n) / n, 2.0)",
           tests=(_UNIFORM,), why="a recency weight: inclusion 0.23 (oldest) to 0.27 (newest); chi2 power ~1"),
    Mutant(name="regime_pool_write_offset", file=REG,
           old='jax.lax.dynamic_update_slice_in_dim(data["pool"], samples_MxS, data["pool_n"], axis=0)',
           new='jax.lax.dynamic_update_slice_in_dim(data["pool"], samples_MxS, data["pool_n"] - 1, axis=0)',
           tests=(f"{_SPY}[accumulate]",), why="each generation's samples overwrite the last valid pool row"),
    Mutant(name="regime_subsample_pool_clamp_removed", file=REG,
           old='"accumulate_subsample": min(subsample, pool)}', new='"accumulate_subsample": subsample}',
           tests=("tests/test_regimes.py::test_subsample_larger_than_the_pool_takes_all_of_it",),
           why="a subsample larger than the pool crashes in top_k"),
    Mutant(name="regime_train_sizes_ignore_small_pool", file=REG,
           old="[min(spec.train_size, n) for n in pool_n]", new="[spec.train_size for n in pool_n]",
           tests=("tests/test_regimes.py::test_train_sizes_by_hand",),
           why="metrics.jsonl reports the subsample size while the pool is still smaller"),
    # --- config.py ---
    Mutant(name="regime_subsample_setting_ignored", file=REG,
           old="subsample = run.regime.subsample or run.samples.n", new="subsample = run.samples.n",
           tests=(f"{_SPY}[accumulate_subsample]",), why="config.regime.subsample has no effect"),
    # config.py / fields.py: benchmarks/mutants/config.py
]
