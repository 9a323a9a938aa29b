"""Checkpoints in the authors' format: round trips, prefixes, errors, atomicity, retention."""

import pickle

import pytest
import torch
from helpers import golden_state_dict

from pips2.hub import load_into
from pips2.nets.pips2 import Pips
from pips2.nets.plan import ExecPlan
from pips2.utils import checkpoint as ck


@pytest.fixture(scope="module")
def model():
    m = Pips(ExecPlan.auto(training=True))  # the round trip trains a step
    m.load_state_dict(golden_state_dict())
    return m


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def _load(init, model, optimizer=None, scheduler=None, **kw) -> int:
    """The one loader's load_into for PIPs++ (pips2.hub): the step of the file it loaded."""
    return ck.step_of(load_into(model, init, "pips2", optimizer, scheduler, **kw)[0])


def test_round_trip_with_optimizer_and_scheduler(tmp_path, model):
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-4, total_steps=100)
    model(torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 3, 128, 128), iters=1,
          trajs_g=torch.ones(1, 2, 1, 2))[3].backward()
    opt.step()
    sched.step()
    path = ck.save(tmp_path, 7, model, opt, sched)
    assert path.name == "model-000000007.pth"
    fresh = Pips()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=5e-4)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, 5e-4, total_steps=100)
    assert _load(tmp_path, fresh, opt2, sched2) == 7
    assert _same(model, fresh)
    assert sched2.state_dict()["last_epoch"] == 1
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_highest_step_given_step_and_file_path(tmp_path, model):
    other = Pips()
    ck.save(tmp_path, 5, other)
    ck.save(tmp_path, 200000, model)
    ck.save(tmp_path, 30, other)
    m = Pips()
    assert _load(tmp_path, m) == 200000 and _same(m, model)
    assert _load(tmp_path, m, step=5) == 5 and _same(m, other)
    assert _load(tmp_path / "model-000200000.pth", m) == 200000 and _same(m, model)
    with pytest.raises(ck.CheckpointError, match="no checkpoint for step 6"):
        _load(tmp_path, m, step=6)


def test_module_prefix_is_stripped(tmp_path, model):
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000001.pth")
    m = Pips()
    _load(tmp_path, m)
    assert _same(m, model)


def test_key_mismatch_lists_keys_unless_ignored(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(1)
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000001.pth")
    with pytest.raises(ck.CheckpointError) as e:
        _load(tmp_path, Pips())
    assert "norm.weight" in str(e.value) and "extra.thing" in str(e.value)
    m = Pips()
    _load(tmp_path, m, ignore_prefixes=("norm.", "extra."))
    assert torch.equal(m.state_dict()["fnet.conv1.weight"], model.state_dict()["fnet.conv1.weight"])


def test_shape_mismatch_is_an_error(tmp_path, model):
    sd = dict(model.state_dict())
    sd["delta_block.dense.bias"] = torch.zeros(3)
    torch.save({"model_state_dict": sd}, tmp_path / "x.pth")
    with pytest.raises(ck.CheckpointError, match="shape mismatches"):
        _load(tmp_path / "x.pth", Pips())


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "pickle"])
def test_corrupt_or_foreign_file_gives_one_line(tmp_path, content):
    p = tmp_path / "model-000000003.pth"
    if content == "pickle":
        torch.save({"weights": torch.zeros(2)}, p)
    else:
        p.write_bytes(content)
    with pytest.raises(ck.CheckpointError) as e:
        _load(tmp_path, Pips())
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


def test_missing_folder_or_empty_folder(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such"):
        ck.find_checkpoint(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no model"):
        ck.find_checkpoint(tmp_path)


def test_save_is_atomic_and_keeps_latest(tmp_path, model, monkeypatch):
    for s in (1, 2, 3, 4):
        ck.save(tmp_path, s, model, keep_latest=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ck.save(tmp_path, 5, model)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-000000003.pth", "model-000000004.pth"]


def test_parameter_table_total(model):
    table = ck.parameter_table(model)
    assert table.strip().endswith("total params: 17.57 M")
    assert "fnet.conv1.weight" in table and "9408" in table


def test_a_model_of_other_sizes_is_one_readable_line(tmp_path):
    """A checkpoint of another configuration mismatches every layer: the error names a few keys, not all."""
    from pips2.hub import load_model
    from pips2.nets.lbm import LBM

    small, other = LBM(input_size=(64, 64), embed_dim=32, num_layers=2), LBM(input_size=(64, 64), embed_dim=48,
                                                                             num_layers=2)
    path = tmp_path / "small.pt"
    torch.save({"model": small.state_dict()}, path)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_model_state(other, torch.load(path, weights_only=True)["model"], source=str(path))
    msg = str(e.value)
    n_wrong = sum(v.shape != other.state_dict()[k].shape for k, v in small.state_dict().items())
    assert n_wrong > 2 * ck.MAX_LISTED and f"and {n_wrong - ck.MAX_LISTED} more" in msg
    assert msg.startswith(f"{path}: does not match the model: shape mismatches [") and len(msg) < 1000
    assert "\n" not in msg
    assert load_model(path).state_dict().keys() == small.state_dict().keys()  # its own sizes load it


# --- checkpoints whose contents a walk would never finish ------------------------------------------------

def _nested_tuple_key_pickle(levels: int) -> bytes:
    import pickle
    t: object = (1,)
    for _ in range(levels):
        t = (t, t)
    return pickle.dumps(t, 2)[2:-1]  # the tuple's opcodes, memo references included, without header and STOP


def _ckpt_with(tmp_path, name: str, extra) -> str:
    path = tmp_path / name
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "extra": extra}, path)
    return str(path)


def _laughs(levels: int, width: int):
    inner: object = [1]
    for _ in range(levels):
        inner = [inner] * width
    return inner


def test_a_checkpoint_that_contains_itself_is_refused_in_one_line(tmp_path):
    cycle: list = []
    cycle.append(cycle)
    loop: dict = {}
    loop["state"] = {"inner": loop}
    for name, extra, where in (("cycle.pth", cycle, "extra[0]"), ("dict.pth", loop, "extra.state.inner")):
        path = _ckpt_with(tmp_path, name, extra)
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_weights_only(path)
        assert str(e.value) == f"{path}: refused: {where} contains itself"


def test_a_checkpoint_of_shared_references_or_deep_nesting_is_refused_not_walked_forever(tmp_path):
    path = _ckpt_with(tmp_path, "laughs.pth", _laughs(12, 40))  # 40^12 paths in a few kilobytes
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value) == f"{path}: refused: its pickle builds more than 10000000 objects (shared references counted)"
    legacy = tmp_path / "legacy.pth"  # torch's format before 1.6: the pickles are read from the file itself
    torch.save({"model_state_dict": {}, "extra": _laughs(12, 40)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ck.CheckpointError, match=f"^{legacy}: refused: its pickle builds more than"):
        ck.load_weights_only(legacy)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    path = _ckpt_with(tmp_path, "deep.pth", deep)  # refused from its opcodes, before torch builds it
    with pytest.raises(ck.CheckpointError, match=r"refused: its pickle nests objects more than 64 deep$"):
        ck.load_weights_only(path)
    walked = {"model_state_dict": {"w": torch.zeros(2)}, "extra": deep}  # the walk's own bound, had it passed
    with pytest.raises(ck.CheckpointError, match=r"refused: extra(\[0\])+ is nested more than 64 deep$"):
        ck._check_tensors(walked, path)
    # sharing within the bound is fine, and a shared optimizer entry is copied once
    path = _ckpt_with(tmp_path, "shared.pth", _laughs(3, 40))
    assert len(ck.load_weights_only(path)["extra"]) == 40
    shared = torch.ones(3)
    owned = ck._owned({"a": shared, "b": [shared]})
    assert owned["a"] is owned["b"][0] and owned["a"] is not shared


def test_a_checkpoint_whose_keys_collide_or_nest_deep_is_refused_before_torch_reads_it(tmp_path):
    """A tuple key nested 200 deep (1,000,000 deep crashed torch's unpickler: SIGSEGV), and 10,200 int keys that
    all hash to 0 (loading them is quadratic: hours for a large file)."""
    deep: object = ()
    for _ in range(200):
        deep = (deep,)
    for name, extra, why in (("deep.pth", {deep: None}, "nests objects more than 64 deep"),
                             ("collide.pth", dict.fromkeys(i * (2**61 - 1) for i in range(10_200)),
                              "hashes more than 10000 dict keys or set items that are not text")):
        path = _ckpt_with(tmp_path, name, extra)
        with pytest.raises(ck.CheckpointError, match=f"^{path}: refused: its pickle {why}"):
            ck.load_weights_only(path)


def test_a_checkpoint_whose_dict_key_would_hash_forever_is_refused_before_torch_reads_it(tmp_path):
    import zipfile
    path = _ckpt_with(tmp_path, "key.pth", {"k": 1})
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[pkl] = b"\x80\x02}" + _nested_tuple_key_pickle(40) + b"K\x01s."  # {t: 1}, t 2^40 tuples when hashed
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(ck.CheckpointError, match="refused: its pickle builds more than 10000000 objects"):
        ck.load_weights_only(path)


def test_a_state_dict_key_that_is_not_text_or_a_compiled_model_s_prefix(tmp_path):
    """{5: tensor} beside the real keys was an AttributeError traceback in every loader; a state dict saved from a
    torch.compile'd model (keys under '_orig_mod.') was refused as missing every key, while DDP's 'module.' was
    stripped."""
    from helpers import golden_model

    import pips2

    model = golden_model()
    odd = {**model.state_dict(), 5: model.state_dict()["fnet.conv1.weight"]}
    (tmp_path / "odd").mkdir()
    torch.save({"model_state_dict": odd}, tmp_path / "odd" / "model-000000001.pth")
    with pytest.raises(ck.CheckpointError, match=r"model-000000001.pth: its state dict has a key that is not text "
                                                 r"\(5\); refusing it$"):
        pips2.load_model(str(tmp_path / "odd"))
    compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    (tmp_path / "compiled").mkdir()
    torch.save({"model_state_dict": compiled}, tmp_path / "compiled" / "model-000000001.pth")
    loaded = pips2.load_model(str(tmp_path / "compiled"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                  strict=True))


def _replace_data_pkl(path: str, data: bytes) -> None:
    """Rewrite a torch.save file with its data.pkl (what torch unpickles) replaced by `data`."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[pkl] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n, body in members.items():
            zf.writestr(n, body)


def test_a_checkpoint_of_complex_keys_or_a_set_filled_late_is_refused_before_torch_reads_it(tmp_path):
    """An ordinary torch.save of 20,000 complex keys of one hash (torch's weights-only unpickler calls
    builtins.complex) loaded in 3.3 s, quadratic in their number (a 64 MB data.pkl: about 15 hours), and so did a
    set(*args) whose list was filled after args was built. The pre-scan now counts every key that is not text or
    a small int, and a set's items when the set is built. The keys here need not collide to be counted."""
    why = "refused: its pickle hashes more than 10000 dict keys or set items that are not text or small integers"
    path = _ckpt_with(tmp_path, "complex.pth", dict.fromkeys(complex(i, 0.5) for i in range(10_200)))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value).startswith(f"{path}: {why} (") and "\n" not in str(e.value)
    # {"w": L, "args": (L,), "s": set(*args)}: L is empty when args is built, then filled with 10,200 large ints
    path = _ckpt_with(tmp_path, "stale.pth", {})
    items = b"".join(pickle.dumps(2**40 + i, 2)[2:-1] for i in range(10_200))
    _replace_data_pkl(path, b"\x80\x02}(X\x04\x00\x00\x00argsq\x00]q\x01\x85q\x02X\x01\x00\x00\x00wh\x01(" + items
                      + b"eX\x01\x00\x00\x00scbuiltins\nset\nh\x02Ru.")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value).startswith(f"{path}: {why} (")
    # a checkpoint that stores numbers and complex values, and keys its dicts by text and parameter numbers, loads
    fine = {"losses": [i + 0.5 for i in range(20_000)], "complex": [complex(i, 1) for i in range(10_200)],
            "by_param": {i: {"lr": 0.1, "betas": (0.9, 0.99)} for i in range(2_000)}, "set": set(range(20_000))}
    assert ck.load_weights_only(_ckpt_with(tmp_path, "fine.pth", fine))["extra"] == fine


def test_a_meta_tensor_is_refused_in_one_line(tmp_path, model):
    """A weight saved as a meta tensor (a model built on torch.device("meta") and saved before its
    weights were materialised: a shape, no data) passed the checks and ended every loader in a traceback
    (RuntimeError: Tensor.item() cannot be called on meta tensors)."""
    import pips2

    sd = dict(model.state_dict())
    sd["fnet.conv1.weight"] = torch.empty(sd["fnet.conv1.weight"].shape, device="meta")
    (tmp_path / "meta").mkdir()
    path = tmp_path / "meta" / "model-000000005.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(ck.CheckpointError) as e:
        pips2.load_model(str(tmp_path / "meta"))
    assert str(e.value) == (f"{path}: refused: model_state_dict.fnet.conv1.weight is a meta tensor (no data: the "
                            f"model was saved before its weights were materialised)")
    with pytest.raises(ck.CheckpointError) as e:  # a state dict handed over directly meets the same check
        ck.load_model_state(Pips(), sd, source="given")
    assert str(e.value) == ("given: fnet.conv1.weight is a meta tensor (no data: the model was saved before its "
                            "weights were materialised); refusing it")
    with pytest.raises(ck.CheckpointError, match=r"^x.pth: refused: w is on cpu, not cuda where the checkpoint"):
        ck._check_tensors({"w": torch.zeros(1)}, "x.pth", torch.device("cuda"))  # not where map_location put it


def test_float64_weights_that_overflow_the_model_s_dtype_are_refused_at_load_time(tmp_path, model):
    """Float64 weights of 1e300 are finite as stored and infinite once cast into the float32 model: the
    model loaded, and demo.py only said its estimates were not finite after tracking."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd["fnet.conv1.weight"][0, 0, 0, :2] = 1e300
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000001.pth")
    fresh = Pips()
    before = fresh.state_dict()["fnet.conv1.weight"].clone()
    with pytest.raises(ck.CheckpointError) as e:
        _load(tmp_path, fresh)
    assert str(e.value) == (f"{tmp_path / 'model-000000001.pth'}: fnet.conv1.weight holds 2 values too large for "
                            f"the model's torch.float32 (infinite once cast from torch.float64); refusing it")
    assert torch.equal(fresh.state_dict()["fnet.conv1.weight"], before)  # nothing copied
    sd["fnet.conv1.weight"][0, 0, 0, :2] = 1e30  # float64 weights the model's dtype can hold load (cast)
    torch.save({"model_state_dict": sd}, tmp_path / "model-000000002.pth")
    assert _load(tmp_path, fresh) == 2 and fresh.state_dict()["fnet.conv1.weight"][0, 0, 0, 0] == 1e30


# --- the pre-scan reads what torch will unpickle ---------------------------------------------------------------

def _shared_tuple(levels: int) -> tuple:
    """A tuple of pairs of one shared tuple, `levels` deep: 2^(levels+1) - 1 objects once hashed or walked."""
    t: tuple = ()
    for _ in range(levels):
        t = (t, t)
    return t


def _records(obj) -> list[tuple[str, bytes]]:
    """The (name, data) records of torch.save(obj), in its order."""
    import io
    import zipfile
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(buf) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def _zip_parts(records: list[tuple[str, bytes]], base: int = 0, shift: int = 0) -> tuple[bytes, bytes]:
    """Records stored as torch.save writes them: (their local headers and data, to be placed at file offset
    `base`; their directory, whose offsets are `shift` less than where they are)."""
    import struct
    import zlib
    body, directory = b"", b""
    for name, data in records:
        n, crc = name.encode(), zlib.crc32(data)
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, len(data), len(data),
                                 len(n), 0, 0, 0, 0, 0, base + len(body) - shift) + n
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(n), 0) + n + data
    return body, directory


def _end(entries: int, size: int, offset: int, comment: bytes = b"") -> bytes:
    import struct
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, size, offset, len(comment)) + comment


def _zip(records: list[tuple[str, bytes]]) -> bytes:
    body, directory = _zip_parts(records)
    return body + directory + _end(len(records), len(directory), len(body))


def _two_directories(torch_sees: list[tuple[str, bytes]], python_sees: list[tuple[str, bytes]]) -> bytes:
    """One file, two archives of records of the same names: torch's reader (miniz) reads the directory the end
    record's offset names, Python's zipfile the one that ends where the end record begins, and shifts every
    offset by the difference (an archive "concatenated" to other data)."""
    body, directory = _zip_parts(torch_sees)
    base = len(body) + len(directory)
    shift = base + len(_zip_parts(python_sees, base)[0]) - len(body)  # its directory's place minus the declared
    other_body, other_directory = _zip_parts(python_sees, base, shift)
    assert len(other_directory) == len(directory)  # one size in the end record serves both
    return body + directory + other_body + other_directory + _end(len(python_sees), len(directory), len(body))


def _with_decoy(path, obj) -> str:
    """torch.save(obj) rewritten as a probe of a hostile checkpoint did: the same records, a harmless pickle named
    archive/x/data.pkl listed second and the real data.pkl moved last. The pre-scan read the first */data.pkl the
    zip listed; torch reads <the first record's folder>/data.pkl."""
    recs = _records(obj)
    real = [r for r in recs if r[0] == "archive/data.pkl"]
    rest = [r for r in recs if r[0] != "archive/data.pkl"]
    decoy = ("archive/x/data.pkl", pickle.dumps({"model_state_dict": {}}, 2))
    path.write_bytes(_zip([rest[0], decoy, *rest[1:], *real]))
    return str(path)


def _colliding_complex_keys(n: int) -> dict:
    """n complex keys of one hash (complex(a, b) hashes as a + 1000003 * b)."""
    top = 1000003 * n
    return {complex(float(top - 1000003 * i), float(i)): 0 for i in range(n)}


def test_a_decoy_data_pkl_cannot_hide_the_one_torch_reads(tmp_path):
    """A second data.pkl listed first hid the real one from the pre-scan, and a dict key of pairs of one
    shared tuple nested 25 deep (1.3 KB; 40 deep: hours) or 20,000 complex keys of one hash loaded again. Just
    over the bounds here: 2^24 tuples, 10,200 keys. Only the records torch.save writes are allowed, under the
    first record's folder."""
    for name, extra in (("laughs.pth", {_shared_tuple(23): 0}), ("complex.pth", _colliding_complex_keys(10_200))):
        path = _with_decoy(tmp_path / name, {"model_state_dict": {"w": torch.zeros(1)}, "extra": extra})
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_weights_only(path)
        assert str(e.value) == f"{path}: refused: it holds the record archive/x/data.pkl, which torch.save never writes"
    # what torch.save writes loads, also as torch before 2.x wrote it (.data/version, no byte order or alignment)
    recs = _records({"model_state_dict": {"w": torch.ones(2)}})
    (tmp_path / "now.pth").write_bytes(_zip(recs))
    (tmp_path / "then.pth").write_bytes(_zip([r for r in recs if r[0] in ("archive/data.pkl", "archive/data/0")]
                                             + [("archive/.data/version", b"3\n")]))
    for name in ("now.pth", "then.pth"):
        assert torch.equal(ck.load_weights_only(tmp_path / name)["model_state_dict"]["w"], torch.ones(2))
    for recs_, why in (([*recs, ("archive/notes.txt", b"hi")], "it holds the record archive/notes.txt, which "
                                                                "torch.save never writes"),
                       ([("archive/version", b"3" * 2000) if n == "archive/version" else (n, d) for n, d in recs],
                        "its record version is 2000 bytes (torch.save writes a few)")):
        (tmp_path / "odd.pth").write_bytes(_zip(recs_))
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_weights_only(tmp_path / "odd.pth")
        assert str(e.value) == f"{tmp_path / 'odd.pth'}: refused: {why}"


@pytest.mark.parametrize("case", ["two directories", "bytes after the end record", "legacy with a zip after it"])
def test_a_file_that_zip_readers_read_differently_is_refused(tmp_path, case):
    """Python's zipfile and torch's reader (miniz) disagree on an archive with two directories (each reads
    another): the pre-scan checked one, torch unpickled the other (a key of 2^24 shared tuples here). Data after
    the end record is refused too, as torch.save writes none. torch reads a file that does not start with a zip
    header as the legacy format whatever zip follows: it is judged as torch judges it (before, the pre-scan took
    it for a zip, and only torch's refusal to map a legacy file stopped it)."""
    evil = {"model_state_dict": {}, "extra": {_shared_tuple(23): 0}}
    path = tmp_path / "x.pth"
    if case == "two directories":
        fine = [(n, pickle.dumps({"model_state_dict": {}}, 2) if n.endswith("data.pkl") else d)
                for n, d in _records({"model_state_dict": {}})]
        bad = [(n, pickle.dumps(evil, 2) if n.endswith("data.pkl") else d) for n, d in fine]
        path.write_bytes(_two_directories(bad, fine))
        why = ("refused: its zip directory is not where its end record says (torch.save writes it just before; zip "
               "readers may disagree on what such an archive holds)")
    elif case == "bytes after the end record":
        path.write_bytes(_zip(_records({"model_state_dict": {}})) + b"x" * 100)
        why = ("refused: 100 bytes follow its zip end record (torch.save writes none; zip readers may disagree on "
               "what such an archive holds)")
    else:
        torch.save(evil, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes() + _zip(_records({"model_state_dict": {}})))
        why = "refused: its pickle builds more than 10000000 objects (shared references counted)"
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value) == f"{path}: {why}"


def test_every_pickle_of_the_legacy_format_is_prescanned_and_the_file_bounded(tmp_path, monkeypatch):
    """Torch reads five pickles from a legacy-format file and the pre-scan read four: the fifth, the
    storage keys, held a key of shared tuples (308 bytes, 30 deep: 11.7 s; 45 deep: days)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    path = tmp_path / "legacy.pth"
    path.write_bytes(b"".join(pickle.dumps(o, 2) for o in (MAGIC_NUMBER, PROTOCOL_VERSION, info,
                                                           {"model_state_dict": {}}, [{_shared_tuple(23): 0}])))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value) == f"{path}: refused: its pickle builds more than 10000000 objects (shared references counted)"
    torch.save({"model_state_dict": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(ck.load_weights_only(path)["model_state_dict"]["w"], torch.ones(3))
    size = path.stat().st_size
    monkeypatch.setattr(ck, "MAX_LEGACY_BYTES", size - 1)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value) == (f"{path}: refused: a checkpoint in torch's legacy format of {size} bytes (at most "
                            f"{size - 1})")
    monkeypatch.setattr(ck, "MAX_LEGACY_BYTES", size)
    monkeypatch.setattr(ck, "MAX_PICKLE_BYTES", 200)  # the pickles here take ~400 bytes, the tensor's data after
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights_only(path)
    assert str(e.value) == f"{path}: refused: its pickles take more than 200 bytes"


def test_a_long_key_is_never_copied_into_location_text(tmp_path):
    """The post-load walk built the location text of every entry, each a copy of every key above it: a
    1.15 MB checkpoint (a 1 MB key over a dict of 6,000 entries) made 6 GB of text. Text is made only for the one
    refusal reported, each key in it cut to 40 characters, a key that is not text or an int named by its place."""
    import tracemalloc

    path = tmp_path / "long.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "A" * 2**20: {f"k{i}": 0 for i in range(6000)}}, path)
    tracemalloc.start()
    try:
        loaded = ck.load_weights_only(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(loaded["A" * 2**20]) == 6000 and peak < 50 << 20, peak
    flat = torch.zeros(1).expand(4, 4)  # stride 0: refused where it lies
    for extra, where in (({"A" * 2**20: {"k": flat}}, "extra." + "A" * 40 + "....k"),
                         ({"a": 1, (1.5, 2): [flat]}, "extra.<key 1>[0]"), ({"b\nc" * 30: flat}, "extra.b\\ncb\\nc")):
        with pytest.raises(ck.CheckpointError) as e:
            ck._check_tensors({"extra": extra}, path)
        text = str(e.value)
        assert text.startswith(f"{path}: refused: {where}") and len(text) < 300 and "\n" not in text, text


def test_a_mismatch_lists_keys_cut_short(tmp_path):
    """Five unexpected keys of 2 MB each made demo.py's refusal one "line" of 4,000,108 bytes; each key
    it lists is now cut to 60 characters."""
    model = torch.nn.Linear(2, 2)
    state = {**model.state_dict(), **{f"{i}" + "B" * (2 << 20): torch.zeros(1) for i in range(5)}}
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_model_state(model, state, source="x.pth")
    text = str(e.value)
    assert text.startswith("x.pth: does not match the model: unexpected keys ['0" + "B" * 59 + "...', '1B")
    assert len(text) < 500, len(text)
    state = {"weight" + "W" * (2 << 20): torch.zeros(2, 2), "bias": torch.zeros(3)}
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_model_state(model, state, source="x.pth")
    assert str(e.value) == ("x.pth: does not match the model: missing keys ['weight']; unexpected keys ['weight"
                            + "W" * 54 + "...']; shape mismatches ['bias (3,) vs (2,)']")


def _trained_adamw():
    """A small model, its AdamW (as the trainer makes it) and OneCycleLR after one step, and their checkpoint."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6, eps=1e-8)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=110, pct_start=0.1,
                                                cycle_momentum=False)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched.step()
    import copy
    return model, opt, sched, copy.deepcopy({"model_state_dict": model.state_dict(),  # as saved: no shared tensors
                                             "optimizer_state_dict": opt.state_dict(),
                                             "scheduler_state_dict": sched.state_dict()})


def _group(key, value):
    return lambda o: o["param_groups"][0].__setitem__(key, value)


def _moment(key, change):
    return lambda o: o["state"][0].__setitem__(key, change(o["state"][0][key]))


_BAD_OPTIMIZERS = {  # hostile variants, and what else AdamW cannot step with
    "lr text": (_group("lr", "abc"), "param_groups[0] lr is 'abc'; AdamW needs a finite number >= 0"),
    "lr NaN": (_group("lr", float("nan")), "param_groups[0] lr is nan; AdamW needs a finite number >= 0"),
    "max_lr inf": (_group("max_lr", float("inf")), "param_groups[0] max_lr is inf; AdamW needs a finite number >= 0"),
    "weight decay < 0": (_group("weight_decay", -1.0),
                         "param_groups[0] weight_decay is -1.0; AdamW needs a finite number >= 0"),
    "eps < 0": (_group("eps", -1.0), "param_groups[0] eps is -1.0; AdamW needs a finite number > 0"),
    "eps 0": (_group("eps", 0), "param_groups[0] eps is 0; AdamW needs a finite number > 0"),
    "betas of one": (_group("betas", (5.0,)), "param_groups[0] betas is a tuple; AdamW needs a pair of numbers in "
                                               "[0, 1)"),
    "beta 1": (_group("betas", (0.9, 1.0)), "param_groups[0] betas is a tuple; AdamW needs a pair of numbers in "
                                             "[0, 1)"),
    "amsgrad text": (_group("amsgrad", "yes"), "param_groups[0] amsgrad is 'yes', not True, False or None"),
    "moments NaN": (_moment("exp_avg_sq", lambda t: t.fill_(float("nan"))),
                    "state of parameter 0: its 'exp_avg_sq' holds 6 NaN or infinite values"),
    "moments < 0": (_moment("exp_avg_sq", lambda t: t.fill_(-1.0)),
                    "state of parameter 0: its 'exp_avg_sq' holds negative values (a second moment is a mean of "
                    "squares)"),
    "moments float64": (_moment("exp_avg", lambda t: t.double()),
                        "state of parameter 0: its 'exp_avg' is torch.float64, its parameter's is torch.float32"),
    "moments text": (_moment("exp_avg", lambda t: "x"), "state of parameter 0: its 'exp_avg' is 'x', not a tensor"),
    "step text": (_moment("step", lambda t: "x"),
                  "state of parameter 0: its 'step' is 'x', not a number of steps (a finite number >= 0)"),
    "step < 0": (_moment("step", lambda t: t.fill_(-1.0)), "state of parameter 0: its 'step' is a torch.float32 "
                                                            "tensor of shape (), not a number of steps (a finite "
                                                            "number >= 0)"),
    "no exp_avg": (lambda o: o["state"][0].pop("exp_avg"),
                   "state of parameter 0: it has no 'exp_avg' (AdamW keeps step, exp_avg, exp_avg_sq once it has "
                   "stepped)"),
}


@pytest.mark.parametrize("case", list(_BAD_OPTIMIZERS))
def test_an_optimizer_state_adamw_cannot_step_with_is_refused(case):
    """A NaN lr or NaN moments loaded silently, made every weight NaN in the first resumed step, and the
    run ended "done" with exit 0; eps -1 and float64 moments trained on; a text lr or betas of one value ended in a
    traceback inside the first step; a text 'step' was refused quoting a '<generator object ...>'. Each is now
    one line naming the file, the part and the value, before anything is loaded into the optimizer."""
    change, why = _BAD_OPTIMIZERS[case]
    model, opt, sched, ckpt = _trained_adamw()
    change(ckpt["optimizer_state_dict"])
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    with pytest.raises(ck.CheckpointError) as e:
        ck.apply_checkpoint(ckpt, "x.pth", model, opt, sched)
    assert str(e.value) == f"x.pth: 'optimizer_state_dict' {why}"
    assert all(torch.equal(before[k], v) for k, v in opt.state[model.weight].items())


def test_an_optimizer_state_as_the_trainer_saves_it_resumes():
    model, opt, sched, ckpt = _trained_adamw()
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, weight_decay=1e-6, eps=1e-8)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=1e-3, total_steps=110, pct_start=0.1,
                                                 cycle_momentum=False)
    ck.apply_checkpoint(ckpt, "x.pth", model2, opt2, sched2)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert torch.equal(opt2.state[model2.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def test_torch_advice_to_load_unsafely_is_never_passed_on():
    """A file that is both a tar archive and five tiny pickles reaches torch's legacy-tar refusal, whose text
    advises re-running with weights_only=False ("will likely succeed, but it can result in arbitrary code
    execution"): the advice was quoted in the refusal line. Every torch message is now cut before it."""
    from pips2.utils.checkpoint import _load_problem

    msg = ("Cannot use ``weights_only=True`` with files saved in the legacy .tar format. In PyTorch 2.6, we changed "
           "the default value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running "
           "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary code "
           "execution.")
    line = _load_problem(RuntimeError(msg))
    assert line == ("not a readable checkpoint (Cannot use ``weights_only=True`` with files saved in the legacy .tar "
                    "format)")
    assert _load_problem(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central "
                                      "directory")) == ("not a readable checkpoint (PytorchStreamReader failed reading "
                                                         "zip archive: failed finding central directory)")


def test_files_written_by_a_rename_get_the_umask_mode(tmp_path):
    """A temp file made by mkstemp is 0600, and the checkpoints, results JSON, settings.json, curve images and
    downloads renamed from one kept that mode: in a group's shared folder (umask 002) colleagues could no longer
    read them. They now get the mode a file opened in place gets."""
    import os

    from pips2.hub import save_authors_format
    from pips2.utils.download import download
    from pips2.utils.paths import temp_beside, write_json

    (tmp_path / "src.bin").write_bytes(b"x" * 10)
    old = os.umask(0o002)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        ckpt = ck.save(tmp_path / "ck", 1, torch.nn.Linear(1, 1))
        exported = save_authors_format(torch.nn.Linear(1, 1), tmp_path / "m.pth")
        beside = temp_beside(tmp_path / "settings.json")
        fetched = download((tmp_path / "src.bin").as_uri(), tmp_path / "dl" / "x.bin")
    finally:
        os.umask(old)
    for path in (tmp_path / "r.json", exported, beside, fetched):
        assert os.stat(path).st_mode & 0o777 == 0o664, path
    # a training checkpoint is readable as the umask allows but never writable by others: a resume refuses one
    # others may rewrite in place
    assert os.stat(ckpt).st_mode & 0o777 == 0o644, ckpt
