#!/usr/bin/env python
"""Export PIPs++ to ONNX and check it against onnxruntime.

The code is pips2.cli.export_onnx, installed as the `pips2-export-onnx` command with the same flags.
"""

from pips2.cli.export_onnx import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
