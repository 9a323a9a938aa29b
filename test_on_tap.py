#!/usr/bin/env python
"""Evaluate a PIPs++ or LBM checkpoint on TAP-Vid (DAVIS, Kinetics, RGB-Stacking).

The code is pips2.cli.eval_tap, installed as the `pips2-eval-tap` command with the same flags.
"""

from pips2.cli.eval_tap import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
