"""Mutants of the workdir lock (lock.py and the conditional writes of paths.py: tests/test_lock.py) and of the
run's tracking (TensorBoard event files and W&B: tracking.py, events.py, tests/test_tracking.py)."""
from benchmarks.mutants import Mutant

LOCK, PATHS, TRACK, EVENTS, CFG = ("collapse_jax/lock.py", "collapse_jax/paths.py", "collapse_jax/tracking.py",
                                   "collapse_jax/events.py", "collapse_jax/config.py")
_L, _T = "tests/test_lock.py::", "tests/test_tracking.py::"
_KILLED = f"{_L}test_a_second_process_is_refused_naming_the_first_and_a_killed_holder_frees_it_at_once"
_PIDS = f"{_L}test_same_host_holders_are_judged_by_their_pid_gone_reused_or_live"
_LEASE = f"{_L}test_another_hosts_lock_is_judged_by_its_lease"
_BEAT = f"{_L}test_a_live_holder_keeps_its_lease_and_one_paused_past_it_is_taken_over_and_knows"
_COND = f"{_L}test_conditional_writes"
_RACE = f"{_L}test_racing_threads_exactly_one_wins"
_GS = f"{_L}test_gs_lock_is_taken_refused_taken_over_and_released"
_RESUME = f"{_T}test_a_resumed_run_shows_one_point_per_generation"
_EVERY = f"{_T}test_every_scalar_and_text_at_every_generation"
_WANDB = f"{_T}test_wandb_gets_every_metric_once_under_one_resumed_run_id"

MUTANTS = [
    # --- lock.py: who holds it ---
    Mutant(name="lock_dead_pid_counts_as_alive", file=LOCK, old="  except ProcessLookupError:\n    return False",
           new="  except ProcessLookupError:\n    return True", tests=(_PIDS,),
           why="a lock left by a killed (and reaped) run blocks the workdir for good"),
    Mutant(name="lock_zombie_counts_as_alive", file=LOCK, old='return state not in ("Z", "X") and',
           new="return True and", tests=(_KILLED,),
           why="a killed holder not yet reaped by its parent still blocks the workdir"),
    Mutant(name="lock_pid_reuse_ignored", file=LOCK, old="(pid_start is None or start == pid_start)", new="True",
           tests=(_PIDS,), why="a dead holder whose pid another process reuses blocks the workdir"),
    Mutant(name="lock_lease_never_expires", file=LOCK, old='return time.time() - rec["heartbeat"] > rec["lease_s"]',
           new="return False", tests=(_LEASE,), why="a run killed on another host blocks the workdir for good"),
    Mutant(name="lock_lease_ignored", file=LOCK, old='return time.time() - rec["heartbeat"] > rec["lease_s"]',
           new="return True", tests=(_LEASE, _BEAT), why="a live run on another host is taken over"),
    Mutant(name="lock_heartbeat_too_slow", file=LOCK, old='self._stop.wait(self._rec["lease_s"] / 4)',
           new='self._stop.wait(self._rec["lease_s"] * 4)', tests=(_BEAT,),
           why="a live holder's lease runs out between heartbeats and another host takes its workdir"),
    Mutant(name="lock_own_attempt_not_marked_live", file=LOCK,
           old="  _HELD.add(token)  # before the record is written", new="  pass  #", tests=(_RACE, _GS),
           why="a lock held by this process counts as left over: a second run in it takes it over"),
    Mutant(name="lock_release_ignores_token", file=LOCK,
           old="      mine = _mine(self.path, self.token, self.workdir)\n      if mine is not None:\n"
               "        paths.remove_if(self.path, mine[1])",
           new="      paths.remove(self.path)",
           tests=(f"{_L}test_release_leaves_another_holders_lock_alone_and_a_context_manager_releases_on_error",),
           why="a run taken over after a pause deletes the new holder's lock when it exits"),
    Mutant(name="lock_lost_not_reported", file=LOCK, old="    if self.lost:\n      raise WorkdirBusy(self.lost)",
           new="    if False:\n      raise WorkdirBusy(self.lost)", tests=(_BEAT,),
           why="a holder taken over goes on writing, and the two runs interleave"),
    Mutant(name="lock_taken_by_every_process", file=LOCK, old="  if jax.process_index() == 0:\n    try:",
           new="  if True:\n    try:",
           tests=(f"{_L}test_only_process_0_takes_the_lock_and_every_process_learns_the_outcome",),
           why="every process of a multi-process run takes the lock: process 1 refuses its own run"),
    # --- paths.py: the conditional writes under it ---
    Mutant(name="lock_local_create_overwrites", file=PATHS,
           old="    os.link(tmp, path)  # fails if path exists, and shows the file whole",
           new='    os.replace(tmp, path)\n    open(tmp, "wb").close()', tests=(_COND, _RACE),
           why="two runs starting at once on a local workdir both get the lock"),
    Mutant(name="lock_local_replace_unconditional", file=PATHS,
           old="    if cur is None or cur[1] != version:\n      return False\n    write_atomic(path, raw)",
           new="    if cur is None:\n      return False\n    write_atomic(path, raw)", tests=(_COND, _RACE),
           why="two runs taking over one stale local lock both win"),
    Mutant(name="lock_gs_create_overwrites", file=PATHS, old='return _gcs_upload(path, raw, "0")',
           new="return _gcs_upload(path, raw, None)", tests=(_COND, _RACE),
           why="two runs starting at once on a gs:// workdir both get the lock"),
    Mutant(name="lock_gs_replace_unconditional", file=PATHS, old="return _gcs_upload(path, raw, version)",
           new="return _gcs_upload(path, raw, None)", tests=(_COND, _RACE),
           why="two runs taking over one stale gs:// lock both win; a paused holder's heartbeat overwrites its taker"),
    Mutant(name="lock_gs_remove_unconditional", file=PATHS, old="bucket, key, ifGenerationMatch=version)",
           new="bucket, key, ifGenerationMatch=None)", tests=(_COND,),
           why="a release on gs:// deletes whatever lock is there"),
    Mutant(name="paths_local_append_overwrites", file=PATHS, old='with open(path, "ab") as fh:',
           new='with open(path, "wb") as fh:',
           tests=(_EVERY, "tests/test_paths.py::test_write_append_read_list_rename_remove"),
           why="each flush of an event file (and metrics.jsonl) replaces what was there"),
    # --- tracking: TensorBoard ---
    Mutant(name="tb_no_session_start", file=TRACK,
           old="                      events.record(events.event(now, g, session_start=True))]",
           new="                      ]", tests=(_RESUME,),
           why="a resumed run shows two points for the generations the killed process had logged"),
    Mutant(name="tb_session_start_at_0", file=TRACK, old="events.event(now, g, session_start=True)",
           new="events.event(now, 0, session_start=True)", tests=(_RESUME,),
           why="a resumed run's START purges every generation before the resume point too"),
    Mutant(name="tb_files_sort_against_starts", file=TRACK, old="{n:04d}.collapse_jax",
           new="{9999 - n:04d}.collapse_jax",
           tests=(f"{_T}test_event_file_names_sort_by_start_within_one_second",),
           why="starts within one second are read in the wrong order: the killed process's points win"),
    Mutant(name="tb_session_log_wrong_field", file=EVENTS, old="out += _bytes(7, _int(1, _START))",
           new="out += _bytes(6, _int(1, _START))", tests=(_EVERY, _RESUME),
           why="the START is written as a log message: TensorBoard never purges"),
    Mutant(name="tb_crc_mask_wrong", file=EVENTS, old="+ 0xA282EAD8)", new="+ 0xA282EAD9)", tests=(_EVERY,),
           why="TensorBoard rejects every record (data loss) as corrupt"),
    Mutant(name="tb_texts_dropped", file=TRACK,
           old="      values += [events.text_value(k, _markdown_verbatim(t)) for k, t in texts.items()]",
           new="      pass", tests=(_EVERY,), why="the LM's sample texts never reach TensorBoard"),
    Mutant(name="tb_every_process_writes", file=TRACK, old="self.active = jax.process_index() == 0",
           new="self.active = True", tests=(f"{_T}test_tensorboard_off_and_processes_other_than_0_write_nothing",),
           why="every process of a multi-process run writes the same event files and W&B run"),
    # --- tracking: W&B ---
    Mutant(name="wandb_new_run_each_start", file=TRACK,
           old='run_id = state.get("run_id") or uuid.uuid4().hex[:16]', new="run_id = uuid.uuid4().hex[:16]",
           tests=(_WANDB,), why="a resumed run starts a second W&B run"),
    Mutant(name="wandb_offline_resume_duplicates", file=TRACK,
           old='else int(state.get("next_step", 0))', new="else 0", tests=(_WANDB,),
           why="an offline run resumed re-logs the generations it already holds"),
    Mutant(name="wandb_missing_not_checked", file=TRACK, old='importlib.util.find_spec("wandb") is None',
           new="False", tests=(f"{_T}test_wandb_asked_for_but_not_installed_is_one_line_error",),
           why="a run asking for W&B without wandb fails after compiling, with an ImportError"),
    Mutant(name="wandb_mode_not_checked", file=CFG, old="mode: str = fields.choice(WANDB_MODES)",
           new="mode: str = fields.text()", tests=(f"{_T}test_tracking_fields_are_checked_by_name",),
           why="a typo in config.wandb.mode reaches wandb.init"),
]
