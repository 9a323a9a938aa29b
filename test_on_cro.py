#!/usr/bin/env python
"""Evaluate a PIPs++ checkpoint on CroHD head tracking (1000-frame clips).

The code is pips2.cli.eval_cro, installed as the `pips2-eval-cro` command with the same flags.
"""

from pips2.cli.eval_cro import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
