"""torch.hub entry points of this repository: `pips2` (PIPs++) and `lbm` (LBM), each in eval mode with the
authors' released weights fetched once into a cache, or those of a checkpoint you name:

    import torch
    model = torch.hub.load("/path/to/this/checkout", "pips2", source="local")
    model = torch.hub.load("/path/to/this/checkout", "lbm", source="local", checkpoint="lbm.pt")

docs/MODELS.md has the rules, the caches and the environment variables (offline copies, mirrors).
"""

# what torch.hub checks is importable before it imports this file
dependencies = ["torch", "numpy", "prettytable", "huggingface_hub"]

from pips2.cli.torch_hub import lbm, pips2  # noqa: E402,F401 (the entry points)
