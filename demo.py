#!/usr/bin/env python
"""Track points through any video: tracks.npz, tracks.csv and an mp4 with trails.

The code is pips2.cli.demo, installed as the `pips2-demo` command with the same flags.
"""

from pips2.cli.demo import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
