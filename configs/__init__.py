"""The experiments' config files, installed as the package collapse_jax.configs (pyproject.toml maps it onto this
folder) so that `collapse-jax --config=NAME[:ARG]` finds them from any directory. Each file's get_config(arg)
builds the config; its docstring's first line is the summary `collapse-jax --help` shows, and VARIANTS lists the
arguments it takes."""
