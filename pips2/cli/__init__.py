"""The command-line programs: one module per command (`pips2-train` = pips2.cli.train, ...), each a `main`
with fire flags and a `cli()` entry point; the top-level scripts of a checkout call the same functions, and
hubconf.py (torch.hub) calls pips2.cli.torch_hub."""
