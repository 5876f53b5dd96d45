"""The application on top of the library: the `unmask` command and what it needs.

`cli` (the command), `train` and `train_config` (the training recipe behind `unmask train`),
`models` (model aliases and loading), `tasks` (built-in tasks and local or hub data),
`resources` (pinned downloads from PyPI, sha256-checked and cached). The library (choose,
optimize, store, integrations) never imports from here.
"""
