"""Mutants of the path layer: every file of a run, local or gs:// (tests/test_paths.py, against a GCS emulator)."""
from benchmarks.mutants import Mutant

PATHS, CKPT, LOOP = "collapse_jax/paths.py", "collapse_jax/checkpoint.py", "collapse_jax/loop.py"
_T = "tests/test_paths.py::"

MUTANTS = [
    Mutant(name="paths_scheme_not_checked", file=PATHS, old="  if s not in SCHEMES:", new="  if False:",
           tests=(f"{_T}test_unsupported_scheme_is_one_line_error",
                  f"{_T}test_cli_unsupported_scheme_exits_2_with_one_line"),
           why="s3:// and other schemes run on and fail late, or write a local 's3:' directory"),
    Mutant(name="paths_checkpoint_dir_made_local", file=CKPT,
           old='self.directory = paths.abspath(os.path.join(workdir, "checkpoints"))',
           new='self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))',
           tests=(f"{_T}test_gs_checkpoints_skip_an_unfinished_save_and_set_aside_an_unreadable_one",),
           why="a gs:// workdir's checkpoints go to a local directory named 'gs:'"),
    Mutant(name="paths_gs_append_overwrites", file=PATHS,
           old='write_atomic(path, (read_bytes(path) if exists(path) else b"") + data)', new="write_atomic(path, data)",
           tests=(f"{_T}test_write_append_read_list_rename_remove",),
           why="metrics.jsonl on gs:// keeps only the last chunk's lines"),
    Mutant(name="paths_gs_rename_keeps_the_source", file=PATHS, old="  for f in files:\n    f.unlink()",
           new="  for f in files:\n    pass", tests=(f"{_T}test_write_append_read_list_rename_remove",),
           why="an unreadable checkpoint set aside on gs:// is still found as a step"),
    Mutant(name="paths_plots_dir_bypasses_the_layer", file="collapse_jax/outputs.py",
           old='paths.makedirs(os.path.join(workdir, "plots"))',
           new='os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)',
           tests=(f"{_T}test_run_files_go_through_the_path_layer",),
           why="a gs:// run's plots directory is made locally"),
]
