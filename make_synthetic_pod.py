#!/usr/bin/env python
"""Write synthetic scenes in the PointOdyssey layout (the demo's and the tests' data).

The code is pips2.cli.synthetic, installed as the `pips2-synthetic` command with the same flags.
"""

from pips2.cli.synthetic import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
