"""PIPs++ and LBM point trackers: pips2.nets (models), pips2.datasets (data), pips2.utils (leaf helpers), and
the application in this folder (tracking, training, evaluation, the model loader, the web demo, pips2.cli).

In a checkout, pips2/nets, pips2/datasets and pips2/utils are symlinks to the top-level folders nets/, datasets/
and utils/, so Python and static tools (editors, pyright) resolve `pips2.nets.pips2` to nets/pips2.py; an installed
copy (pip install .) holds them inside this package. The project never shadows other top-level packages (e.g.
Hugging Face's `datasets`). docs/ARCHITECTURE.md has the layout and the import rule.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
# a checkout whose symlinks git wrote as plain files (core.symlinks=false, e.g. on Windows): reach the
# folders through the package's search path instead
if not (_here / "nets").is_dir() and (_here.parent / "nets" / "pips2.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)


def load_model(name_or_path, device="cpu", **kwargs):
    """A Pips or LBM in eval mode: a hub name, "pips2" or "lbm" (the authors' weights, fetched once into a cache),
    or a checkpoint file or folder; the one loader's rules (docs/MODELS.md).

    The same as pips2.hub.load_model, imported on first call: `import pips2` stays light and
    pips2.hub, which imports the models (and so this package), cannot form an import cycle.
    """
    from pips2.hub import load_model as _load_model

    return _load_model(name_or_path, device, **kwargs)
