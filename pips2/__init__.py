"""PIPs++ and LBM point trackers: pips2.nets (models), pips2.datasets (data), pips2.utils (the rest).

In a source checkout the subpackages are the folders nets/, datasets/ and utils/ beside this one; an installed
copy (pip install .) holds them inside this package. Either way they import as pips2.nets, pips2.datasets and
pips2.utils, so the project never shadows other top-level packages (e.g. Hugging Face's `datasets`).
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "nets").is_dir() and (_here.parent / "nets" / "pips2.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)


def load_model(name_or_path, device="cpu", **kwargs):
    """A Pips or LBM in eval mode: "pips2", "lbm" (fetched once into ~/.cache/pips2) or a checkpoint path.

    The same as pips2.utils.hub.load_model, imported on first call: `import pips2` stays light and
    pips2.utils.hub, which imports the models (and so this package), cannot form an import cycle.
    """
    from pips2.utils.hub import load_model as _load_model

    return _load_model(name_or_path, device, **kwargs)
