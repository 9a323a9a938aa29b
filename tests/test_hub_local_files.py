"""pips2.load_model (the one loader: demo.py, the web demo and the other scripts call it too) on local paths that
are not checkpoints: one line naming the file and what it is, where torch.load said "list index out of range" or
"EOFError"."""

import zipfile

import pytest
import torch

import pips2
from pips2 import hub
from pips2.utils.checkpoint import CheckpointError


def _one_line(e, path, *parts):
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    for p in parts:
        assert p in text, (p, text)


@pytest.mark.parametrize("case,parts", [
    ("text", ["not a checkpoint (a text file; torch.save writes a zip archive)"]),
    ("empty", ["an empty file (0 bytes), not a checkpoint"]),
    ("named_like_one", ["not a checkpoint (a text file"]),
    ("binary", ["not a checkpoint (its first bytes are b'\\x00\\x01"]),
    ("other_zip", ["not a checkpoint (a zip archive that torch.save did not write: it holds no data.pkl)"]),
    ("cut_zip", ["not a checkpoint (a zip archive cut short or damaged"]),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, case, parts):
    path = tmp_path / ("model-000000001.pth" if case == "named_like_one" else f"{case}.pth")
    if case in ("text", "named_like_one"):
        path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "binary":
        path.write_bytes(bytes(range(256)))
    elif case == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    else:
        torch.save({"model_state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    for load in (pips2.load_model, lambda p: hub.load_model(str(p), "cpu", kind="pips2"),
                 lambda p: hub.load_model(str(p), "cpu", kind="lbm")):
        with pytest.raises(CheckpointError) as e:
            load(path)
        _one_line(e, path, *parts)
    if case == "named_like_one":  # its folder: the newest model-*.pth of it is the one named
        with pytest.raises(CheckpointError) as e:
            pips2.load_model(tmp_path)
        _one_line(e, path, *parts)


def test_etc_passwd(tmp_path):
    with pytest.raises(CheckpointError) as e:
        pips2.load_model("/etc/passwd")
    _one_line(e, "/etc/passwd", "not a checkpoint (a text file")


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(hub.HubError) as e:
        pips2.load_model(tmp_path)
    _one_line(e, tmp_path, "no checkpoint in this folder (expected model-*.pth files or one *.pt/*.pth file)",
              "./get_reference_model.sh", "--init_dir=pips2", "--init_dir=lbm")
