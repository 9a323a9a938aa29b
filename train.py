#!/usr/bin/env python
"""Train PIPs++ (stage 1, then stage 2; docs/MODEL.md) or LBM (--model=lbm; docs/LBM.md).

The code is pips2.cli.train, installed as the `pips2-train` command with the same flags.
"""

from pips2.cli.train import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
