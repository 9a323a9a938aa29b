"""The command-line programs: one module per command (`pips2-train` = pips2.cli.train, ...), each a `main`
with fire flags and a `cli()` entry point; the top-level scripts of a checkout call the same functions, and
hubconf.py (torch.hub) calls pips2.cli.torch_hub."""

import os as _os
import sys as _sys

try:
    _os.getcwd()
except FileNotFoundError:
    # removed under a shell still in it: relative defaults, and torch's import, fail unclearly. Said only by a
    # program starting (torch not loaded yet); one already running that imports this (torch.hub.load) goes on
    if "torch" not in _sys.modules:
        print("error: the folder this program runs from was removed; cd to an existing folder and run it again",
              file=_sys.stderr, flush=True)
        _sys.exit(2)
