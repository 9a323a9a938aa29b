#!/usr/bin/env python
"""A web page for tracking points in a video (python app.py, then open the address it prints).

The code is pips2.cli.app (the server: pips2.webapp), installable as the `pips2-app` command.
"""

from pips2.cli.app import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
