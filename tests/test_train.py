"""`unmask.train`: the run behind `unmask train`: its resumable checkpoints and its step log.

Runs go through `unmask.cli.main` in process on `tiny_model_dir` and `reviews_csv` (conftest).
"""

from __future__ import annotations

import re

from conftest import assert_clear, cli, train_argv

from unmask.cli import EXIT_USAGE

# ---------------------------------------------------------------- --resume


def test_cli_resume_without_checkpoint(tiny_model_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir, reviews_csv, out, "--budget", "5%", "--resume")
    code, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert_clear(err, rf"no checkpoint at {re.escape(str(out))}", r"run without --resume")
