"""Read pickles, .npy and .npz files from untrusted sources without ever running code from them.

Datasets ship some fields as pickles (PointOdyssey's `trajs_3d` may be an object array holding None, TAP-Vid is
a pickle of dicts of arrays, a Kubric .npy is a pickled dict). A plain `pickle.load` or `np.load(...,
allow_pickle=True)` of such a file runs whatever callable the file names. The unpickler here resolves only the
few globals that plain data and numpy arrays need and refuses every other one before anything is called.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import os
import pickle
import pickletools
import re
import stat
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
from numpy.lib import format as npformat

ALLOWED_HINT = "only plain data and numpy arrays are allowed"

# Bounds on what a zip (an .npz, a torch checkpoint) may declare before it is parsed (docs/FORMATS.md, "Safe
# loading"). A central directory entry is 46 bytes plus its name: the ~1,000 records of an LBM training
# checkpoint (weights and two optimizer moments each) take ~100 KB, an .npz of the project's few members ~1 KB.
MAX_ZIP_DIRECTORY_BYTES = 4 << 20
MAX_NPZ_MEMBERS = 64  # anno.npz has 6 members, track.npz 1
# A deflated member may inflate at most MAX_DEFLATE_RATIO times its compressed size once it is larger than
# DEFLATE_RATIO_FLOOR: deflate reaches ~1000:1 on zeros, so a 2 MB file could otherwise declare GBs that are all
# read. Real data stays far below: float positions compress 2-3x, and the floor is above the largest bool flag
# member an anno.npz may hold (2^27 bytes), so a flag of long runs is never refused whatever its ratio.
MAX_DEFLATE_RATIO = 100
DEFLATE_RATIO_FLOOR = 256 << 20

# expect(key, shape, dtype) -> why a member's header is not what the caller can use, or None
Expect = Callable[[str, tuple[int, ...], np.dtype], "str | None"]


class UnsafeFileError(ValueError):
    """A file the safe loaders refuse or cannot read; str(e) is one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        if problem is None:  # rebuilt from its message alone, as torch's DataLoader re-raises a worker's error
            path, _, problem = str(path).partition(": ")
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the underlying error looked like
        super().__init__(f"{path}: {self.problem}")

    def __reduce__(self):
        # the default would call UnsafeFileError(message) and lose the path/problem split across processes
        return type(self), (str(self.path), self.problem)


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(what)


class _BadState(pickle.UnpicklingError):
    """A pickle set a state that does not describe a whole numpy array or dtype."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Pickle protocols 0-2 store bytes as _codecs.encode(text, 'latin1'); no other codec is ever needed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _bytes(*args: Any) -> bytes:
    """Protocols 0-2 pickle b'' as bytes(); refusing arguments keeps bytes(10**12) from eating the memory."""
    if args:
        raise _Refused("builtins.bytes with arguments")
    return b""


def _bytearray(data: bytes = b"") -> bytearray:
    """Protocols 0-4 pickle a bytearray as bytearray(bytes); an int argument would allocate at will."""
    if not isinstance(data, bytes):
        raise _Refused("builtins.bytearray of a non-bytes argument")
    return bytearray(data)


class _NdarrayName:
    """numpy.ndarray as numpy's pickles name it: the type argument of _reconstruct, never called. Called (REDUCE),
    the real class would allocate any shape uninitialised, or lay an object dtype over bytes of the file (item
    pointers the file chose: a crash, or worse, on first access)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray called (numpy's pickles only pass it to _reconstruct)")


_NDARRAY = _NdarrayName()
_DTYPE_SPEC = re.compile(r"[a-zA-Z]\d{0,7}")


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """numpy.dtype as numpy's pickles call it, dtype('f8', False, True), its state set by BUILD; nothing else."""
    if not (isinstance(spec, str) and _DTYPE_SPEC.fullmatch(spec) and align is False and copy is True):
        raise _Refused(f"numpy.dtype{(spec, align, copy)!r} (numpy's pickles call it as dtype('f8', False, True))")
    return np.dtype(spec, align, copy)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals numpy's own pickles reference, under both the numpy 1.x (numpy.core) and 2.x module names."""
    from numpy._core import multiarray, numeric

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        # numpy pickles an array as an empty one, _reconstruct(ndarray, (0,), b'b'), then sets its state (whose
        # data must match its shape); any other shape would allocate whatever size the file names
        if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
            name = "ndarray" if subtype is _NDARRAY else getattr(subtype, "__name__", subtype)
            raise _Refused(f"numpy _reconstruct of {name} {shape!r} (numpy writes an empty ndarray there)")
        arr = multiarray._reconstruct(np.ndarray, shape, dtype)
        assert isinstance(arr, np.ndarray)  # subtype is np.ndarray (checked above); numpy's stub says object
        return arr

    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        # protocol 5; numpy's stub leaves out this private function
        out[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # pyright: ignore[reportAttributeAccessIssue]
    return out


# Looked up by name in this table only: find_class never imports a module the file names.
_ALLOWED: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    ("_codecs", "encode"): _latin1_encode,
    **{(mod, name): obj for mod in ("builtins", "__builtin__") for name, obj in
       (("bytes", _bytes), ("bytearray", _bytearray), ("complex", complex), ("set", set), ("frozenset", frozenset))},
}


# A pickle may build at most this many objects counting every shared reference as a copy: a few kilobytes of
# memo references can stand for 40^12 (a list of 40 references to a list of 40 ...), which hashing a dict key
# or walking the result would then visit one by one. The project's own files build a few thousand.
MAX_PICKLE_OBJECTS = 10_000_000
# Nesting: hashing a tuple nested a million deep (a 1 MB pickle) recurses in C without a guard and crashes the
# process. A checkpoint nests about 8 deep (dict > dict > tensor > its rebuild arguments), a TAP-Vid pickle 6.
MAX_PICKLE_DEPTH = 64
# Dict keys and set items whose hashes a file can make collide: 40,000 keys of one hash took 8.5 s to insert
# (quadratic: 15 MB of them, about two hours). Only text (str and bytes hash salted per process), ints below 2^32
# (each its own hash), None, booleans and tuples of text are safe; every other key counts, whatever made it: a
# float, a large int, a tuple holding a number, and anything a call returns (complex(a, b) hashes as
# a + 1000003 * b, a numpy scalar as its value). The project's files key by text and parameter numbers.
MAX_COLLIDABLE_KEYS = 10_000
SMALL_INT = 1 << 32
COLLIDING_KEYS = (f"refused: its pickle hashes more than {MAX_COLLIDABLE_KEYS} dict keys or set items that are not "
                  f"text or small integers (their hashes can be made to collide, which makes loading take hours)")
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}  # grow the object below them
_TEXT_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE",
             "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_TUPLE_OPS = {"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}
# ops that make an object holding no items a set or dict built from it could hash
_SCALAR_OPS = {"FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
               "BYTEARRAY8"} | _INT_OPS
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"}
# callables that hash what their first argument holds (the restricted unpicklers allow some of these)
_HASHING = {"builtins set", "builtins frozenset", "__builtin__ set", "__builtin__ frozenset",
            "collections OrderedDict", "collections Counter", "builtins dict", "__builtin__ dict"}
_MARK = object()
_NOT_TUPLE = object()


class _Node:
    """An object of the simulated stack: its expanded size, its nesting depth, whether it is a dict key whose hash a
    file can choose (`collidable`), whether its hash is salted (text), how many of its own items are collidable
    (`keys`: what a set or dict built from it hashes; kept up to date as the ops that fill it run, since a memo
    reference is this same node; None for an object a call returned, whose items are unknown), a tuple's first item
    (the argument a call hashes), and for text, its value (for STACK_GLOBAL)."""

    __slots__ = ("count", "depth", "collidable", "salted", "keys", "first", "text")

    def __init__(self, count: int, depth: int):
        self.count, self.depth = count, depth
        self.collidable, self.salted = True, False
        self.keys: int | None = None
        self.first: Any = _NOT_TUPLE
        self.text: str | None = None


def _collidable(nodes: list) -> int:
    return sum(1 for n in nodes if n.collidable)


def _call_parts(name: str, arg: Any, popped: list) -> tuple[str | None, Any]:
    """The callable's name and its first argument's node (None: no argument; _NOT_TUPLE: the arguments are not a
    tuple the file built, so unknown) for a call op whose stack items were popped (last pushed first)."""
    if name == "INST":  # the arguments follow the mark, the class is the op's argument
        return arg, popped[-1] if popped else None
    if name == "OBJ":  # mark, class, arguments
        return popped[-1].text, popped[-2] if len(popped) > 1 else None
    callee, args = (popped[-1], popped[0]) if name != "NEWOBJ_EX" else (popped[2], popped[1])
    return callee.text, args.first


def pickle_objects_problem(data: bytes | IO[bytes], limit: int = MAX_PICKLE_OBJECTS, strict: bool = False
                           ) -> str | None:
    """Why a pickle would build more than `limit` objects when each shared reference counts as a copy, nest more
    than MAX_PICKLE_DEPTH deep, or hash more than MAX_COLLIDABLE_KEYS keys of a kind whose hashes can be made to
    collide; or None.

    Reads the opcodes only (pickletools.genops) and runs nothing: each object on the simulated stack is its
    expanded size and depth, memo references share it, and the ops that fill a container add to it. Keys are
    counted where they are hashed: the ops that fill a dict or set, a memo index, and a call of set, frozenset,
    dict, OrderedDict or Counter, which hashes the items its argument holds when it runs (a list filled after the
    call's arguments were built counts in full). A pickle that does not parse is left to the unpickler, which
    reports it; with `strict`, it is refused here, as the unpickler may read what pickletools does not (the text
    INT opcode takes "0x0" in pickle, not in pickletools) and would then run unchecked."""
    stack: list = []
    memo: dict = {}
    keys = 0
    too_many = f"refused: its pickle builds more than {limit} objects (shared references counted)"
    too_deep = f"refused: its pickle nests objects more than {MAX_PICKLE_DEPTH} deep"
    uncounted = ("refused: its pickle builds a set or dict from an object whose items cannot be counted before it "
                 "runs (Python's and numpy's own pickles never do)")
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _MEMO_OPS:
                # the memo is a dict keyed by these indices: a text PUT or GET may name any integer
                keys += isinstance(arg, int) and abs(arg) >= SMALL_INT
                if keys > MAX_COLLIDABLE_KEYS:
                    return COLLIDING_KEYS
                if name.endswith("PUT"):
                    memo[arg] = stack[-1]
                else:
                    stack.append(memo[arg])
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "STOP":
                break
            else:
                before = op.stack_before
                popped: list = []
                if pickletools.markobject in before:
                    while stack[-1] is not _MARK:
                        popped.append(stack.pop())
                    stack.pop()
                    before = before[:before.index(pickletools.markobject)]
                popped += [stack.pop() for _ in before]
                if name == "MARK":
                    stack.append(_MARK)
                    continue
                if name in _MUTATORS:
                    target = popped.pop()
                    if name in ("SETITEM", "SETITEMS"):  # popped: value, key, value, key, ... (last pushed first)
                        added = _collidable(popped[1::2])
                        keys += added
                    elif name == "BUILD":
                        added, state = 0, popped[0]
                        if target.keys is not None:  # torch merges a dict-like's state in by its keys (or pairs)
                            inner = state.first.keys if isinstance(state.first, _Node) else 0  # (dict, slots)
                            keys += (state.keys or 0) + (inner or 0)
                    else:
                        added = _collidable(popped)
                        keys += added if name == "ADDITEMS" else 0
                    if target.keys is not None:
                        target.keys += added
                    target.count = min(limit + 1, target.count + sum(n.count for n in popped))
                    target.depth = max([target.depth] + [1 + n.depth for n in popped])
                    node = target
                    stack.append(target)
                else:
                    node = _Node(min(limit + 1, 1 + sum(n.count for n in popped)),
                                 1 + max((n.depth for n in popped), default=0))
                    if name in _TEXT_OPS:  # text's hash is salted per process: "" stands for long text, bytes
                        node.collidable, node.salted, node.keys = False, True, 0
                        node.text = arg if isinstance(arg, str) and len(arg) <= 200 else ""
                    elif name in _SCALAR_OPS:
                        node.keys = 0
                        node.collidable = not (name in ("NONE", "NEWTRUE", "NEWFALSE")
                                               or (name in _INT_OPS and isinstance(arg, int) and abs(arg) < SMALL_INT))
                    elif name in _TUPLE_OPS or name in ("LIST", "DICT", "FROZENSET"):
                        items = popped[1::2] if name == "DICT" else popped  # a dict's keys
                        held = _collidable(items)
                        node.keys = held
                        if name in ("DICT", "FROZENSET"):
                            keys += held
                        if name in _TUPLE_OPS:  # a tuple of text only hashes as salted as its items
                            node.first = popped[-1] if popped else None
                            node.collidable = not all(n.salted for n in popped)
                    elif name in ("GLOBAL", "STACK_GLOBAL"):
                        texts = [n.text for n in reversed(popped)]  # STACK_GLOBAL: module, then name
                        node.text = arg if name == "GLOBAL" else " ".join(t or "" for t in texts)
                    elif name in _CALLS:
                        callee, first = _call_parts(name, arg, popped)
                        if callee in _HASHING:  # the result holds, and hashed, what its argument holds now
                            held = 0 if first is None else None if first is _NOT_TUPLE else first.keys
                            if held is None:
                                return uncounted
                            node.keys = held
                            keys += held
                    stack += [node] * len(op.stack_after)
                if node.count > limit:
                    return too_many
                if node.depth > MAX_PICKLE_DEPTH:
                    return too_deep
                if keys > MAX_COLLIDABLE_KEYS:
                    return COLLIDING_KEYS
    except Exception as e:  # corrupt or truncated: the unpickler says what is wrong, unless `strict`
        return f"not a readable pickle ({_first_line(e)})" if strict else None
    return None


def _array_state_problem(state: Any) -> str | None:
    """Why a numpy array's pickled state (version, shape, dtype, fortran, data) does not describe a whole array of
    its shape, or None. numpy's own __setstate__ takes an object array's items from the list without checking
    its length, so a short list makes it read past the list's end (a crash, or the heap's neighbours)."""
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
        return "an ndarray state that is not numpy's: version 1, shape, dtype, order, data"
    _, shape, dtype, fortran, data = state
    if (not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(dtype, np.dtype) or not isinstance(fortran, bool)):
        return "an ndarray state with a malformed shape, dtype or order"
    if dtype.hasobject != (dtype.kind == "O" or (dtype.fields is not None and dtype.hasobject)):
        return f"an ndarray of the dtype {dtype} whose flags do not match its kind"
    if dtype.subdtype is not None or (dtype.fields is not None and dtype.hasobject):
        return f"an ndarray of the dtype {dtype}: a subarray, or a structure holding objects"
    count = math.prod(shape)
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != count:
            listed = len(data) if isinstance(data, list) else "no"
            return f"an object ndarray of {count} items whose state lists {listed} items"
    elif not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
        have = len(data) if isinstance(data, (bytes, bytearray)) else "no"
        return f"an ndarray of {count} {dtype} values whose state holds {have} bytes, not {count * dtype.itemsize}"
    return None


MAX_ITEM_BYTES = 1 << 20  # a structured dtype's item; the project's files hold scalars and short strings


# numpy's dtype flags that mark items holding (or handled as) Python objects: a structured dtype without object
# fields has none of them (it may carry NEEDS_PYAPI, 16, and ALIGNED_STRUCT, 128)
_OBJECT_FLAGS = 1 | 2 | 4 | 8 | 32 | 64


def _plain_dtype_state_problem(state: tuple, plain: np.dtype) -> str | None:
    """Why a plain dtype's pickled state is not the one numpy itself writes for `plain` in its byte order, or None.
    Only the byte order may differ from np.dtype(spec)'s own: itemsize, alignment and flags set otherwise make
    dtypes numpy never does (an object dtype without its flags laid the file's bytes under an object array, item
    pointers the file chose; 'V8' of itemsize -8 or 0 gave a 0-byte array of shape (10**9,); 'U1' of itemsize 5
    failed on reading). The metadata a datetime's state carries (its unit) is numpy's to check."""
    order = state[1]
    try:
        own = plain.newbyteorder(order).__reduce__()[2] if order in ("<", ">", "|") else None
    except ValueError:
        own = None
    if own is None or own[1] != order:
        return f"the dtype {plain} with the byte order {order!r}"
    if state[0] not in (3, 4):
        return f"a dtype state of version {state[0]!r}"
    wrong = [f"{what} {theirs!r}, not its own {mine!r}" for what, theirs, mine in
             zip(("itemsize", "alignment", "flags"), state[5:8], own[5:8], strict=True) if theirs != mine]
    return f"the dtype {plain} with the {'; '.join(wrong)}" if wrong else None


def _dtype_state_problem(state: Any, plain: np.dtype | None = None) -> str | None:
    """Why a pickled numpy dtype state (version, byteorder, subarray, names, fields, itemsize, alignment, flags)
    is not a plain or structured dtype whose fields lie inside its item, or None. `plain`: the dtype the state is
    set on, as numpy's dtype(spec) made it; a plain state must be numpy's own for it (_plain_dtype_state_problem)."""
    if not isinstance(state, tuple) or len(state) not in (8, 9):
        return "a malformed dtype state"
    _, _, sub, names, fields, itemsize, align, flags = state[:8]
    if sub is not None:
        return "a subarray dtype"
    if not all(isinstance(v, int) for v in (itemsize, align, flags)) or (names is None) != (fields is None):
        return "a malformed dtype state"
    if names is None:
        return None if plain is None else _plain_dtype_state_problem(state, plain)
    if flags & _OBJECT_FLAGS:
        return f"a structured dtype with the object flags {flags}"
    if (not isinstance(names, tuple) or not isinstance(fields, dict) or set(names) != set(fields)
            or not all(isinstance(n, str) for n in names) or not 0 <= itemsize <= MAX_ITEM_BYTES):
        return "a malformed structured dtype"
    for f in fields.values():
        if not (isinstance(f, tuple) and len(f) in (2, 3) and isinstance(f[0], np.dtype) and isinstance(f[1], int)):
            return "a malformed structured dtype"
        if f[0].hasobject or not 0 <= f[1] <= itemsize - f[0].itemsize:
            return "a structured dtype with an object field or a field outside its item"
    return None


class _TooManyKeys(pickle.UnpicklingError):
    """A pickle hashed more than MAX_COLLIDABLE_KEYS keys whose hashes it could have chosen."""


def _collidable_key(key: Any) -> bool:
    """Whether a dict key or set item is of a kind whose hash a file can choose (see MAX_COLLIDABLE_KEYS)."""
    kind = type(key)
    if kind is str or kind is bytes or key is None or kind is bool:
        return False
    if kind is int:
        return not -SMALL_INT < key < SMALL_INT
    return not (kind is tuple and all(type(k) in (str, bytes) for k in key))


class _RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler whose globals come only from the allow-list (anything else raises _Refused), whose BUILD
    sets state only on a numpy array or dtype, after checking it, and which counts every collidable key it hashes
    (a dict's, a set's, a memo index) as it hashes it, refusing past MAX_COLLIDABLE_KEYS (_TooManyKeys). The
    Python implementation, as the C one's ops cannot be intercepted; the files it reads hold few, large objects."""

    stack: list[Any]  # set by load(); typeshed's pickle._Unpickler leaves out the Python implementation's state
    # the opcode handlers, called as functions of the unpickler (load_build is one of this class's)
    dispatch: dict[int, Callable[[Any], None]] = dict(pickle._Unpickler.dispatch)
    _hashed = 0  # collidable keys hashed so far

    def _hash(self, keys: Any) -> None:
        """Count the collidable keys about to be hashed; _TooManyKeys once there are more than the bound."""
        self._hashed += sum(1 for k in keys if _collidable_key(k))
        if self._hashed > MAX_COLLIDABLE_KEYS:
            raise _TooManyKeys(COLLIDING_KEYS)

    # the ops that hash keys, each counting them first: after MARK, self.stack holds the marked items
    def load_setitem(self) -> None:
        """SETITEM: the key is below the value."""
        self._hash(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)  # pyright: ignore[reportAttributeAccessIssue]

    def load_setitems(self) -> None:
        """SETITEMS: keys and values alternate after the mark."""
        self._hash(self.stack[::2])
        pickle._Unpickler.load_setitems(self)  # pyright: ignore[reportAttributeAccessIssue]

    def load_dict(self) -> None:
        """DICT: a new dict of the keys and values after the mark."""
        self._hash(self.stack[::2])
        pickle._Unpickler.load_dict(self)  # pyright: ignore[reportAttributeAccessIssue]

    def load_additems(self) -> None:
        """ADDITEMS: every item after the mark."""
        self._hash(self.stack)
        pickle._Unpickler.load_additems(self)  # pyright: ignore[reportAttributeAccessIssue]

    def load_frozenset(self) -> None:
        """FROZENSET: a new frozenset of the items after the mark."""
        self._hash(self.stack)
        pickle._Unpickler.load_frozenset(self)  # pyright: ignore[reportAttributeAccessIssue]

    def _memo_index(self) -> int:
        """The text PUT and GET ops' index, which may be any integer: a key of the memo dict."""
        i = int(self.readline()[:-1])  # pyright: ignore[reportAttributeAccessIssue]
        self._hash((i,))
        return i

    def load_put(self) -> None:
        """PUT: the top of the stack memoised under a text index."""
        i = self._memo_index()
        if i < 0:
            raise ValueError("negative PUT argument")
        self.memo[i] = self.stack[-1]  # pyright: ignore[reportAttributeAccessIssue]

    def load_get(self) -> None:
        """GET: the object memoised under a text index."""
        i = self._memo_index()
        try:
            self.append(self.memo[i])  # pyright: ignore[reportAttributeAccessIssue]
        except KeyError:
            raise pickle.UnpicklingError(f"Memo value not found at index {i}") from None

    for _op, _load in ((pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems), (pickle.DICT, load_dict),
                       (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset),
                       (pickle.PUT, load_put), (pickle.GET, load_get)):
        dispatch[_op[0]] = _load
    del _op, _load

    def _collection(self, kind: type, *args: Any) -> Any:
        """set(items) or frozenset(items) as a pickle calls them, counting each item before it is hashed."""
        if len(args) != 1:
            return kind(*args)  # empty, or the call's own TypeError
        items = []
        for item in args[0]:
            items.append(item)
            if _collidable_key(item):
                self._hash((item,))
        return kind(items)

    def load_build(self) -> None:
        """BUILD: an ndarray's state checked against its shape, a dtype's limited to plain ones; else refused."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray):
            problem = _array_state_problem(state)
        elif isinstance(inst, np.dtype):
            problem = _dtype_state_problem(state, inst)
        else:
            problem = f"state set on a {type(inst).__name__}"
        if problem:
            raise _BadState(problem)
        inst.__setstate__(state)  # pyright: ignore[reportAttributeAccessIssue]  # numpy's stub lacks dtype.__setstate__

    dispatch[pickle.BUILD[0]] = load_build

    def load_newobj(self) -> None:
        """NEWOBJ and NEWOBJ_EX build objects of classes; none of the allowed globals is pickled that way."""
        raise _Refused("an object built by NEWOBJ")

    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for module.name, or _Refused naming what the file asked for."""
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None
        if found is set or found is frozenset:
            return functools.partial(self._collection, found)
        return found

    def persistent_load(self, pid: Any) -> Any:
        """Persistent ids resolve to objects the caller supplies; nothing here supplies any."""
        raise _Refused("a persistent id")


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular_problem(mode: int) -> str | None:
    """'not a regular file (a FIFO)' and the like for a file mode (os.stat's st_mode) that is not a regular
    file's, or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown kind")
    return f"not a regular file ({kind})"


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """open(path, 'rb') for a regular file only (symlinks followed); UnsafeFileError naming what else it is, OSError
    as open() raises it. A FIFO's open() waits for a writer, forever, and the SIGTERM a scheduler sends meanwhile
    only interrupts it to be retried; a device reads without end. It is opened without waiting (O_NONBLOCK) and
    judged by what was opened, so a file swapped for a FIFO after the first look cannot block either."""
    problem = not_regular_problem(os.stat(path).st_mode)  # a socket cannot be opened at all: say what it is
    if problem:
        raise UnsafeFileError(path, problem)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        problem = not_regular_problem(os.fstat(fd).st_mode)
        if problem:
            raise UnsafeFileError(path, problem)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refusal(what: str, where: str = "") -> str:
    return f"refused: {where}pickle wants {what} ({ALLOWED_HINT})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unpickle(fp: IO[bytes], path: str | os.PathLike, where: str = "") -> Any:
    start = fp.tell()
    problem = pickle_objects_problem(fp, strict=True)
    if problem:
        raise UnsafeFileError(path, f"{where}{problem}")
    fp.seek(start)
    try:
        return _RestrictedUnpickler(fp).load()
    except _Refused as e:
        raise UnsafeFileError(path, _refusal(e.what, where)) from None
    except _BadState as e:
        raise UnsafeFileError(path, f"refused: {where}pickle holds {e}") from None
    except _TooManyKeys:
        raise UnsafeFileError(path, f"{where}{COLLIDING_KEYS}") from None
    except Exception as e:  # corrupt data raises many types; the user needs one line
        raise UnsafeFileError(path, f"{where}not a readable pickle ({_first_line(e)})") from None


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a file that may hold only plain data (dict, list, str, bytes, numbers, None) and numpy arrays."""
    try:
        with open_regular(path) as fh:
            return _unpickle(fh, path)
    except OSError as e:
        raise UnsafeFileError(path, f"cannot open ({e.strerror or _first_line(e)})") from None


MAX_NPY_HEADER = 1 << 16  # bytes of an .npy header's text: numpy writes a few hundred, and refuses past 10,000


def _read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """An .npy stream's (shape, fortran order, dtype), its header's declared length bounded before it is read:
    numpy reads all of a header (up to 4 GB, declared in four bytes) before it compares its length with its own
    limit."""
    magic = fp.read(8)  # the magic string, then the major and minor version
    if len(magic) < 8 or not magic.startswith(npformat.MAGIC_PREFIX):
        raise ValueError("no .npy magic string")
    if magic[6] not in (1, 2, 3):
        raise ValueError(f".npy format version {magic[6]}.{magic[7]} is not one numpy writes")
    width = 2 if magic[6] == 1 else 4  # the header length: two bytes in version 1, four after
    raw = fp.read(width)
    declared = int.from_bytes(raw, "little")
    if len(raw) < width:
        raise ValueError("cut short in its header")
    if declared > MAX_NPY_HEADER:
        raise ValueError(f"its header declares {declared} bytes (at most {MAX_NPY_HEADER})")
    text = fp.read(declared)
    if len(text) < declared:
        raise ValueError("cut short in its header")
    fp = io.BytesIO(magic + raw + text)  # numpy's readers parse this copy; the stream is now at the data
    version = npformat.read_magic(fp)
    if version == (1, 0):
        return npformat.read_array_header_1_0(fp)
    if version == (2, 0):
        return npformat.read_array_header_2_0(fp)
    # 3.0 differs from 2.0 only in the header's text encoding; numpy has no public reader for it, and its
    # private one moved between releases (numpy.lib.format in 1.x, numpy.lib._format_impl in 2.x)
    for name in ("numpy.lib._format_impl", "numpy.lib.format"):
        try:
            reader = getattr(importlib.import_module(name), "_read_array_header", None)
        except ImportError:
            continue
        if reader is not None:
            return reader(fp, version)
    raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported by this numpy")


def _read_npy(fp: IO[bytes], path: str | os.PathLike, where: str = "", size: int | None = None,
              expect: Callable[[tuple[int, ...], np.dtype], str | None] | None = None) -> np.ndarray:
    """One .npy stream of `size` bytes: its header checked (by `expect`, and against `size`) before any data is
    read, then plain dtypes by numpy with allow_pickle=False, object dtype by the restricted unpickler."""
    start = fp.tell()
    try:
        shape, fortran, dtype = _read_header(fp)
    except Exception as e:
        raise UnsafeFileError(path, f"{where}not an .npy array ({_first_line(e)})") from None
    shape = tuple(shape)
    if any(n < 0 for n in shape):
        raise UnsafeFileError(path, f"{where}header declares the shape {shape}")
    problem = expect(shape, dtype) if expect is not None else None
    if problem:
        raise UnsafeFileError(path, f"{where}{problem}")
    if not dtype.hasobject and size is not None:
        # numpy allocates what the header declares before it reads: a short member must not get that far
        need, have = math.prod(shape) * dtype.itemsize, size - (fp.tell() - start)
        if have < need:
            raise UnsafeFileError(path, f"{where}header declares {dtype} {shape} ({need} bytes) but the data is "
                                        f"{have} bytes")
    if dtype.hasobject:
        arr = _unpickle(fp, path, where)
        if not isinstance(arr, np.ndarray) or arr.shape != shape:
            got = f"an array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise UnsafeFileError(path, f"{where}pickled payload is {got}, the header says an array of {shape}")
        return arr
    try:
        fp.seek(start)
        return npformat.read_array(fp, allow_pickle=False)
    except Exception as e:
        raise UnsafeFileError(path, f"{where}not a readable .npy array ({_first_line(e)})") from None


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """Read a .npy file; an object-dtype array is rebuilt by the restricted unpickler."""
    try:
        with open_regular(path) as fh:
            return _read_npy(fh, path, size=os.fstat(fh.fileno()).st_size)
    except OSError as e:
        raise UnsafeFileError(path, f"cannot open ({e.strerror or _first_line(e)})") from None


class ZipEnd(NamedTuple):
    """A zip archive's end record as a reader finds it (the zip64 one's values when it has one)."""

    dir_size: int  # bytes of the central directory
    dir_offset: int  # where the directory starts, as declared
    entries: int  # entries in the directory, as declared
    dir_end: int  # where a directory written in one piece ends: at the zip64 end record, else at the end record
    trailing: int  # bytes after the end record (its comment, or anything appended)


def zip_end_record(fh: IO[bytes]) -> ZipEnd:
    """A zip archive's end record, found as Python's zipfile finds it (the last one in the file's final 64 KiB,
    the zip64 record just before its locator when there is one), read without parsing the directory (which
    zipfile and torch load whole); ValueError when there is none or it is damaged."""
    end = fh.seek(0, os.SEEK_END)
    start = max(0, end - 22)
    fh.seek(start)
    tail, i = fh.read(), 0
    if not (len(tail) == 22 and tail[:4] == b"PK\x05\x06" and tail[20:] == b"\0\0"):  # else a comment follows
        start = max(0, end - 22 - 0xFFFF)
        fh.seek(start)
        tail = fh.read()
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            raise ValueError("no zip end record")
    rec = tail[i:i + 22]
    size, offset = int.from_bytes(rec[12:16], "little"), int.from_bytes(rec[16:20], "little")
    entries, at = int.from_bytes(rec[10:12], "little"), start + i
    trailing = len(tail) - i - 22
    if at >= 20:
        fh.seek(at - 20)
        locator = fh.read(20)
        if locator[:4] == b"PK\x06\x07":  # zip64: zipfile reads its end record just before the locator, miniz
            # (torch's reader) where the locator says it is; an archive where the two differ is refused
            fh.seek(max(0, at - 20 - 56))
            rec64 = fh.read(56)
            if (at < 20 + 56 or len(rec64) < 56 or rec64[:4] != b"PK\x06\x06"
                    or int.from_bytes(locator[8:16], "little") != at - 20 - 56):
                raise ValueError("damaged zip64 end record")
            entries = int.from_bytes(rec64[32:40], "little")
            size, offset = int.from_bytes(rec64[40:48], "little"), int.from_bytes(rec64[48:56], "little")
            at -= 20 + 56
    return ZipEnd(size, offset, entries, at, trailing)


def zip_directory_size(fh: IO[bytes]) -> int:
    """The size of a zip archive's central directory as its end record declares it (`zip_end_record`)."""
    return zip_end_record(fh).dir_size


def open_zip(path: str | os.PathLike, fh: IO[bytes], max_members: int) -> zipfile.ZipFile:
    """A zip archive read from fh, refused (UnsafeFileError) when its directory is larger than
    MAX_ZIP_DIRECTORY_BYTES (checked before parsing it) or it holds more than max_members entries or a name twice."""
    try:
        size = zip_directory_size(fh)
    except ValueError as e:
        raise UnsafeFileError(path, f"not a readable zip archive ({e})") from None
    if size > MAX_ZIP_DIRECTORY_BYTES:
        raise UnsafeFileError(path, f"refused: its zip directory is {size} bytes (at most {MAX_ZIP_DIRECTORY_BYTES})")
    fh.seek(0)
    try:
        zf = zipfile.ZipFile(fh)
    except Exception as e:  # a damaged directory
        raise UnsafeFileError(path, f"not a readable zip archive ({_first_line(e)})") from None
    names = [i.filename for i in zf.infolist()]
    if len(names) > max_members:
        raise UnsafeFileError(path, f"refused: it holds {len(names)} members (at most {max_members})")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UnsafeFileError(path, f"refused: it holds the member {twice} twice")
    return zf


def load_npz(path: str | os.PathLike, keys: Collection[str] | None = None, expect: Expect | None = None,
             max_member_bytes: int | None = None, max_members: int = MAX_NPZ_MEMBERS) -> dict[str, np.ndarray]:
    """The arrays of an .npz (a zip of .npy members), all or those named in `keys`, read eagerly; object members
    go through the restricted unpickler. A file that is not a zip archive (say a pickle named .npz) is refused.

    Before a member's data is read: its size as the zip declares it must be at most `max_member_bytes`, its
    header's shape and dtype must fit its size and pass `expect(key, shape, dtype)` (which returns the problem,
    or None); the archive may hold at most `max_members` members, and a compressed member larger than
    DEFLATE_RATIO_FLOOR at most MAX_DEFLATE_RATIO times its compressed size (docs/FORMATS.md, "Safe loading")."""
    try:
        fh = open_regular(path)
    except OSError as e:
        raise UnsafeFileError(path, f"cannot open ({e.strerror or _first_line(e)})") from None
    out: dict[str, np.ndarray] = {}
    try:
        with fh:
            if not zipfile.is_zipfile(fh):
                raise UnsafeFileError(path, "refused: not a zip archive (an .npz must be one)")
            zf = open_zip(path, fh, max_members)
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise UnsafeFileError(path, f"member {info.filename} is not an .npy array")
                key = info.filename[:-len(".npy")]
                if keys is not None and key not in keys:
                    continue  # never read, so never unpickled: skipping costs no safety
                if max_member_bytes is not None and info.file_size > max_member_bytes:
                    raise UnsafeFileError(path, f"member {key}: {info.file_size} bytes, more than the "
                                                f"{max_member_bytes} it may have here")
                if (info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_RATIO_FLOOR
                        and info.file_size > MAX_DEFLATE_RATIO * info.compress_size):
                    raise UnsafeFileError(path, f"member {key}: {info.file_size} bytes compressed into "
                                                f"{info.compress_size}, more than {MAX_DEFLATE_RATIO} to 1 (a zip "
                                                f"bomb?); store it uncompressed (np.savez)")
                check = None if expect is None else (lambda shape, dtype, key=key: expect(key, shape, dtype))
                with zf.open(info) as member:
                    out[key] = _read_npy(member, path, f"member {key}: ", info.file_size, check)
    except UnsafeFileError:
        raise
    except Exception as e:  # a damaged archive (bad CRC, truncated member)
        raise UnsafeFileError(path, f"not a readable .npz archive ({_first_line(e)})") from None
    return out
