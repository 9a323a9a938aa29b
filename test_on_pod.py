#!/usr/bin/env python
"""Evaluate a PIPs++ checkpoint on PointOdyssey with the authors' protocol (docs/EVALUATION.md).

The code is pips2.cli.eval_pod, installed as the `pips2-eval-pod` command with the same flags.
"""

from pips2.cli.eval_pod import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
