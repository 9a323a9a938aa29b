"""Shared test helpers: the SPEC-7 deterministic weights and paths to shipped data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import torch

from pips2.utils.golden import golden_state_dict as _recipe

DATA = Path(__file__).parent / "data"


def state_dict_spec() -> list[dict]:
    """Entries of state_dict.json (name, shape, dtype) in file order."""
    return json.loads((DATA / "state_dict.json").read_text())


def golden_state_dict() -> dict[str, torch.Tensor]:
    """SPEC-7 weights for the keys and shapes of state_dict.json, in its file order."""
    return _recipe([(e["name"], tuple(e["shape"])) for e in state_dict_spec()])


def golden_model(**kwargs):
    """A Pips with the golden weights, in eval mode."""
    from pips2.nets.pips2 import Pips

    model = Pips(**kwargs)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()


def run_main(main, capsys, **kwargs) -> SimpleNamespace:
    """A script's main(**kwargs) run in this process, reported as a subprocess run would be: returncode,
    stdout, stderr. Its flags map one to one to main's arguments; starting Python again proves nothing more."""
    capsys.readouterr()
    try:
        main(**kwargs)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def torch_bytes(obj) -> bytes:
    """What torch.save writes for obj."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tar_bytes(members: dict, gz: bool = True) -> bytes:
    """A tar (gzip unless gz=False) of name -> bytes (a regular file) or (type, linkname) (a link or special
    member)."""
    buf = io.BytesIO()
    # compresslevel 1: checkpoints barely compress and level 9 only costs time
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", **({"compresslevel": 1} if gz else {})) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
