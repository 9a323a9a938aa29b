#!/usr/bin/env python
"""Export PointOdyssey into fixed-size augmented mp4 clips, in parallel (docs/FORMATS.md).

The code is pips2.cli.export, installed as the `pips2-export` command with the same flags.
"""

from pips2.cli.export import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
