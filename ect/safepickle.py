"""One strict reader for every pickle we read: EDM, EDM2 and ECT snapshots (and the torch storages inside
them), CIFAR-10's batches, EDM2's published statistics.

A pickle is a program for a stack machine; Python's unpickler runs it with the power to call anything.
This is our own interpreter of the opcodes those formats use, and of nothing else:

- **An allow-list per format.** A global resolves only through the format's own table, to a handler of
  ours (never the real constructor); REDUCE and NEWOBJ call only those handlers; BUILD hands a state only
  to our own placeholders, which check it. Persistent ids go to the format's handler, or are refused.
- **Built once.** A memo reference pushes the very object the memo holds; a handler called again on the
  same immutable arguments returns its first result, so no work is repeated per reference.
- **Nothing attacker-built is hashed or compared recursively.** Dict keys and set items must be strings
  (or bytes, as Python 2's pickles have them); membership tests look at type and identity first.
- **Explicit limits**, checked as the program runs: bytes materialised (strings, containers, arrays) at
  most a budget proportional to the file's size; nesting depth (tuples when built, everything at the end,
  by an iterative walk); stack and memo sizes; integer sizes.
Every refusal is a :class:`PickleRefused` naming the reason, never echoing more than a short excerpt of
the file. Parsing a downloaded file also runs in a child process with resource limits
(``ect/untrusted.py``): this reader is the design, the process boundary the defence in depth.
"""
from __future__ import annotations

import codecs
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ect.errors import BadInput

MAX_DEPTH = 100  # nesting of containers and records; EDM's module trees are about 30 deep
MAX_STACK = 1_000_000
MAX_INT_BYTES = 64  # LONG1/LONG4: no EDM or numpy pickle needs a larger integer
SLOT_BYTES = 16  # what a container slot costs against the budget


class PickleRefused(BadInput):
    """The pickle is not one of the format's, or asks for more than it may: nothing of it was run."""


def describe(value, limit: int = 60) -> str:
    """A short description of an untrusted value: its type, and a bounded excerpt of a str/int/bytes. Never
    the repr of a container (a pickle can build a graph whose repr is exponentially long)."""
    if isinstance(value, (str, bytes)):
        text = value[:limit]
        return f"{type(value).__name__} {text!r}{'...' if len(value) > limit else ''}"
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return f"int of {value.bit_length()} bits" if value.bit_length() > 64 else f"int {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    return f"a {type(value).__name__}"


def is_str(value) -> bool:
    return type(value) is str


@dataclass(frozen=True)
class Handler:
    """What a global of a format resolves to: ``call(reader, *args)`` for REDUCE, ``new(reader)`` for NEWOBJ
    (a class with no arguments). ``pure``: a REDUCE on the same immutable arguments may reuse the result."""

    name: str
    call: Callable | None = None
    new: Callable | None = None
    pure: bool = True


@dataclass(frozen=True)
class Format:
    """A pickle format: its globals, its persistent ids, how Python 2's byte strings are read."""

    name: str
    globals: dict  # (module, name) -> Handler
    persistent: Callable | None = None  # persistent id -> object; None refuses them
    py2_strings: str = "refuse"  # STRING/BINSTRING: "bytes" (CIFAR's encoding='bytes') or "refuse"


class Buildable:
    """A placeholder of ours that takes pickle's BUILD state, checking it (never a real class's setstate)."""

    def pickle_state(self, reader: Reader, state) -> None:
        raise NotImplementedError


@dataclass
class Reader:
    """The state of one run of a pickle program."""

    data: bytes
    format: Format
    budget: int
    stack: list = field(default_factory=list)
    marks: list = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    spent: int = 0
    calls: dict = field(default_factory=dict)  # (handler, ids of immutable args) -> result
    used: set = field(default_factory=set)  # the globals referenced, by name
    keep: list = field(default_factory=list)  # keeps cached arguments alive, so their ids stay theirs
    depth: dict = field(default_factory=dict)  # id(tuple) -> nesting depth, exact (tuples are immutable)
    cache: dict = field(default_factory=dict)  # for handlers: work done once per object (e.g. a hash)

    def charge(self, nbytes: int, what: str) -> None:
        """Count bytes materialised against the budget (proportional to the file's size)."""
        self.spent += nbytes
        if self.spent > self.budget:
            raise PickleRefused(f"{self.format.name}: {what} would materialise more than {self.budget:,} bytes from "
                                f"a {len(self.data):,}-byte file")


def load(data: bytes, fmt: Format, budget: int | None = None, used: set | None = None):
    """Run a pickle program of ``fmt`` on ``data``: its value, built by our handlers only. ``used`` collects the
    names of the globals it referenced (a format can insist on a smaller list of its own)."""
    reader = Reader(bytes(data), fmt, budget if budget is not None else 2 * len(data) + (16 << 20))
    value, _ = run_at(reader, 0)
    if used is not None:
        used |= reader.used
    return value


def run_at(r: Reader, start: int):
    """The value of the pickle program that starts at byte ``start`` of the reader's data, and where it ends
    (a file may hold several pickles one after another, as torch's legacy storages do)."""
    try:
        value, end = _run(r, start)
    except PickleRefused:
        raise
    except (IndexError, KeyError, struct.error, UnicodeDecodeError, OverflowError, ValueError, TypeError) as exc:
        raise PickleRefused(f"{r.format.name}: not a readable pickle (truncated or corrupt): {type(exc).__name__}: "
                            f"{str(exc)[:120]}") from None
    check_depth(value, r.format.name)
    return value, end


def _run(r: Reader, pos: int):
    view, end = memoryview(r.data), len(r.data)
    while pos < end:
        op = r.data[pos]
        pos += 1
        action = OPCODES.get(op)
        if action is None:
            raise PickleRefused(f"{r.format.name}: opcode {bytes([op])!r} at byte {pos - 1} is not one this format "
                                "uses; refusing to load")
        pos = action(r, view, pos)
        if pos < 0:  # STOP
            if len(r.stack) != 1 or r.marks:
                raise PickleRefused(f"{r.format.name}: the pickle stops with an unbalanced stack")
            return r.stack.pop(), -pos - 1
        if len(r.stack) > MAX_STACK or len(r.marks) > MAX_STACK:
            raise PickleRefused(f"{r.format.name}: a stack deeper than {MAX_STACK:,}")
    raise PickleRefused(f"{r.format.name}: the pickle ends without STOP (truncated)")


# ---------------------------------------------------------------------------------------------
# Reading arguments from the byte stream.

def _take(view, pos: int, n: int) -> tuple[bytes, int]:
    if n < 0 or pos + n > len(view):
        raise PickleRefused(f"a field of {n} bytes at byte {pos} runs past the end of the file (truncated)")
    return bytes(view[pos:pos + n]), pos + n


def _unpack(fmt: str, view, pos: int):
    size = struct.calcsize(fmt)
    raw, pos = _take(view, pos, size)
    return struct.unpack(fmt, raw)[0], pos


def _line(view, pos: int, limit: int = 256) -> tuple[bytes, int]:
    """A newline-terminated argument of the text opcodes (GLOBAL, INT, ...), short by rule."""
    stop = bytes(view[pos:pos + limit + 1]).find(b"\n")
    if stop < 0:
        raise PickleRefused(f"a text argument at byte {pos} is longer than {limit} bytes or unterminated")
    return bytes(view[pos:pos + stop]), pos + stop + 1


# ---------------------------------------------------------------------------------------------
# The opcodes: each takes (reader, view, pos) and returns the next position (-1 for STOP).

def _push(r: Reader, value, cost: int = 0):
    if cost:
        r.charge(cost, "a value")
    r.stack.append(value)


def _pop_mark(r: Reader) -> list:
    if not r.marks:
        raise PickleRefused(f"{r.format.name}: an opcode needs a MARK that is not there")
    start = r.marks.pop()
    if start > len(r.stack):
        raise PickleRefused(f"{r.format.name}: a MARK beyond the stack")
    items = r.stack[start:]
    del r.stack[start:]
    return items


def _op_proto(r, view, pos):
    version, pos = _unpack("<B", view, pos)
    if version > 5:
        raise PickleRefused(f"{r.format.name}: pickle protocol {version} is newer than any this reader knows")
    return pos


def _op_frame(r, view, pos):
    _, pos = _unpack("<Q", view, pos)  # a length hint only: the opcodes are read as they come
    return pos


def _op_stop(r, view, pos):
    return -pos - 1  # negative: stop, and where the next pickle would start


def _op_mark(r, view, pos):
    r.marks.append(len(r.stack))
    return pos


def _op_pop(r, view, pos):
    r.stack.pop()
    return pos


def _op_pop_mark(r, view, pos):
    _pop_mark(r)
    return pos


def _op_dup(r, view, pos):
    r.stack.append(r.stack[-1])
    return pos


def _constant(value):
    def op(r, view, pos):
        r.stack.append(value)
        return pos
    return op


def _fixed_int(fmt: str):
    def op(r, view, pos):
        value, pos = _unpack(fmt, view, pos)
        r.stack.append(value)
        return pos
    return op


def _op_long(nbytes_fmt: str):
    def op(r, view, pos):
        n, pos = _unpack(nbytes_fmt, view, pos)
        if n > MAX_INT_BYTES:
            raise PickleRefused(f"{r.format.name}: an integer of {n} bytes (at most {MAX_INT_BYTES} are read)")
        raw, pos = _take(view, pos, n)
        r.stack.append(int.from_bytes(raw, "little", signed=True))
        return pos
    return op


def _op_binfloat(r, view, pos):
    value, pos = _unpack(">d", view, pos)
    r.stack.append(value)
    return pos


def _op_int_text(r, view, pos):  # protocol 0 INT (also True/False as 01/00)
    raw, pos = _line(view, pos, 40)
    r.stack.append(True if raw == b"01" else False if raw == b"00" else int(raw))
    return pos


def _sized(length_fmt: str, kind: str):
    """Strings and bytes with a length prefix: BINUNICODE*, BINBYTES*, BINSTRING*, BYTEARRAY8."""
    def op(r, view, pos):
        n, pos = _unpack(length_fmt, view, pos)
        raw, pos = _take(view, pos, n)
        r.charge(n, f"a string of {n:,} bytes")
        if kind == "str":
            r.stack.append(raw.decode("utf-8", "surrogatepass"))
        elif kind == "py2":
            if r.format.py2_strings != "bytes":
                raise PickleRefused(f"{r.format.name}: Python 2 byte strings are not used by this format")
            r.stack.append(raw)
        else:
            r.stack.append(raw)
        return pos
    return op


def _op_empty(factory):
    def op(r, view, pos):
        r.charge(64, "a container")
        r.stack.append(factory())
        return pos
    return op


def _tuple_of(r: Reader, items: list) -> tuple:
    r.charge(SLOT_BYTES * len(items) + 64, "a tuple")
    value = tuple(items)
    depth = 1 + max((r.depth.get(id(item), 1) for item in items if type(item) is tuple), default=0)
    if depth > MAX_DEPTH:
        raise PickleRefused(f"{r.format.name}: tuples nested deeper than {MAX_DEPTH}")
    if depth > 1:
        r.depth[id(value)] = depth
        r.keep.append(value)
    return value


def _op_tuple(r, view, pos):
    r.stack.append(_tuple_of(r, _pop_mark(r)))
    return pos


def _op_tuple_n(n: int):
    def op(r, view, pos):
        if len(r.stack) < n:
            raise PickleRefused(f"{r.format.name}: TUPLE{n} on a stack of {len(r.stack)}")
        items = r.stack[len(r.stack) - n:] if n else []
        del r.stack[len(r.stack) - n:]
        r.stack.append(_tuple_of(r, items))
        return pos
    return op


def _op_list(r, view, pos):
    items = _pop_mark(r)
    r.charge(SLOT_BYTES * len(items) + 64, "a list")
    r.stack.append(list(items))
    return pos


def _op_dict(r, view, pos):
    items = _pop_mark(r)
    target = {}
    r.charge(64, "a dict")
    _set_items(r, target, items)
    r.stack.append(target)
    return pos


def _set_items(r: Reader, target, items: list) -> None:
    if type(target) is not dict or len(items) % 2:
        raise PickleRefused(f"{r.format.name}: SETITEMS on {describe(target)}: only dicts take items, in pairs")
    r.charge(SLOT_BYTES * len(items), "dict items")
    for i in range(0, len(items), 2):
        key = items[i]
        if type(key) not in (str, bytes):  # never hash an attacker-built structure
            raise PickleRefused(f"{r.format.name}: a dict key is {describe(key)}: this format keys dicts by name")
        target[key] = items[i + 1]


def _op_setitem(r, view, pos):
    value, key = r.stack.pop(), r.stack.pop()
    _set_items(r, r.stack[-1], [key, value])
    return pos


def _op_setitems(r, view, pos):
    items = _pop_mark(r)
    _set_items(r, r.stack[-1], items)
    return pos


def _op_append(r, view, pos):
    value = r.stack.pop()
    _extend(r, r.stack[-1], [value])
    return pos


def _op_appends(r, view, pos):
    items = _pop_mark(r)
    _extend(r, r.stack[-1], items)
    return pos


def _extend(r: Reader, target, items: list) -> None:
    if type(target) is not list:
        raise PickleRefused(f"{r.format.name}: APPENDS on {describe(target)}: only lists take appended items")
    r.charge(SLOT_BYTES * len(items), "list items")
    target.extend(items)


def _names(r: Reader, items: list) -> list:
    if not all(is_str(i) for i in items):
        raise PickleRefused(f"{r.format.name}: a set of anything but names")
    r.charge(SLOT_BYTES * len(items), "set items")
    return items


def _op_additems(r, view, pos):
    items = _names(r, _pop_mark(r))
    if type(r.stack[-1]) is not set:
        raise PickleRefused(f"{r.format.name}: ADDITEMS on {describe(r.stack[-1])}")
    r.stack[-1].update(items)
    return pos


def _op_frozenset(r, view, pos):
    r.stack.append(frozenset(_names(r, _pop_mark(r))))
    return pos


# The memo: a reference pushes the very object stored, never a copy.

def _op_put_bin(fmt: str):
    def op(r, view, pos):
        index, pos = _unpack(fmt, view, pos)
        r.memo[index] = r.stack[-1]
        return pos
    return op


def _op_memoize(r, view, pos):
    r.memo[len(r.memo)] = r.stack[-1]
    return pos


def _op_get_bin(fmt: str):
    def op(r, view, pos):
        index, pos = _unpack(fmt, view, pos)
        if index not in r.memo:
            raise PickleRefused(f"{r.format.name}: a memo reference to {index}, which was never stored")
        r.stack.append(r.memo[index])
        return pos
    return op


# Globals, calls, builds: only the format's handlers.

def _resolve(r: Reader, module, name) -> Handler:
    handler = r.format.globals.get((module, name)) if is_str(module) and is_str(name) else None
    if handler is not None:
        r.used.add((module, name))
    else:
        raise PickleRefused(f"{r.format.name}: refusing to load global '{str(module)[:80]}.{str(name)[:80]}': it is "
                            "not on this format's allow-list (the file may be malicious or not what it claims); "
                            "nothing from it was executed")
    return handler


def _op_global(r, view, pos):
    module, pos = _line(view, pos)
    name, pos = _line(view, pos)
    r.stack.append(_resolve(r, module.decode("utf-8", "replace"), name.decode("utf-8", "replace")))
    return pos


def _op_stack_global(r, view, pos):
    name, module = r.stack.pop(), r.stack.pop()
    r.stack.append(_resolve(r, module, name))
    return pos


def _op_reduce(r, view, pos):
    args, func = r.stack.pop(), r.stack[-1]
    if type(func) is not Handler or func.call is None or type(args) is not tuple:
        raise PickleRefused(f"{r.format.name}: refusing to call {describe(func)}: only this format's allow-list is "
                            "called")
    immutable = all(type(a) in (str, bytes, int, float, bool, type(None), Handler) for a in args)
    key = (id(func), tuple(id(a) for a in args)) if func.pure and immutable else None
    if key is not None and key in r.calls:
        r.stack[-1] = r.calls[key]  # the same call on the same objects: built once
        return pos
    result = func.call(r, *args)
    if key is not None:
        r.calls[key] = result
        r.keep.append(args)
    r.stack[-1] = result
    return pos


def _op_newobj(r, view, pos):
    args, cls = r.stack.pop(), r.stack.pop()
    if type(cls) is not Handler or cls.new is None or type(args) is not tuple or len(args):
        raise PickleRefused(f"{r.format.name}: refusing to create {describe(cls)}: not one of this format's "
                            "containers")
    r.charge(64, "an object")
    r.stack.append(cls.new(r))
    return pos


def _op_newobj_ex(r, view, pos):
    kwargs = r.stack.pop()
    if type(kwargs) is not dict or len(kwargs):
        raise PickleRefused(f"{r.format.name}: NEWOBJ_EX with keyword arguments")
    return _op_newobj(r, view, pos)


def _op_build(r, view, pos):
    state, target = r.stack.pop(), r.stack[-1]
    if isinstance(target, Buildable):
        target.pickle_state(r, state)
    else:
        raise PickleRefused(f"{r.format.name}: refusing to set the state of {describe(target)} (pickle BUILD): only "
                            "this format's placeholders take a state, through their checks")
    return pos


def _op_persid_bin(r, view, pos):
    pid = r.stack.pop()
    if r.format.persistent is None:
        raise PickleRefused(f"{r.format.name}: persistent ids are not used by this format")
    r.stack.append(r.format.persistent(r, pid))
    return pos


def _refused(what: str):
    def op(r, view, pos):
        raise PickleRefused(f"{r.format.name}: the pickle uses {what}, which this format never does; refusing it")
    return op


OPCODES: dict[int, Callable] = {
    0x80: _op_proto, 0x95: _op_frame, ord("."): _op_stop, ord("("): _op_mark, ord("0"): _op_pop,
    ord("1"): _op_pop_mark, ord("2"): _op_dup,
    ord("N"): _constant(None), 0x88: _constant(True), 0x89: _constant(False),
    ord("J"): _fixed_int("<i"), ord("K"): _fixed_int("<B"), ord("M"): _fixed_int("<H"), ord("I"): _op_int_text,
    0x8A: _op_long("<B"), 0x8B: _op_long("<i"), ord("G"): _op_binfloat,
    ord("X"): _sized("<I", "str"), 0x8C: _sized("<B", "str"), 0x8D: _sized("<Q", "str"),
    ord("B"): _sized("<I", "bytes"), ord("C"): _sized("<B", "bytes"), 0x8E: _sized("<Q", "bytes"),
    0x96: _sized("<Q", "bytes"), ord("T"): _sized("<i", "py2"), ord("U"): _sized("<B", "py2"),
    ord("}"): _op_empty(dict), ord("]"): _op_empty(list), ord(")"): _op_tuple_n(0), 0x8F: _op_empty(set),
    ord("t"): _op_tuple, 0x85: _op_tuple_n(1), 0x86: _op_tuple_n(2), 0x87: _op_tuple_n(3),
    ord("l"): _op_list, ord("d"): _op_dict, ord("s"): _op_setitem, ord("u"): _op_setitems,
    ord("a"): _op_append, ord("e"): _op_appends, 0x90: _op_additems, 0x91: _op_frozenset,
    ord("q"): _op_put_bin("<B"), ord("r"): _op_put_bin("<I"), 0x94: _op_memoize,
    ord("h"): _op_get_bin("<B"), ord("j"): _op_get_bin("<I"),
    ord("c"): _op_global, 0x93: _op_stack_global, ord("R"): _op_reduce, 0x81: _op_newobj, 0x92: _op_newobj_ex,
    ord("b"): _op_build, ord("Q"): _op_persid_bin,
    ord("i"): _refused("INST (protocol-0 class instantiation)"), ord("o"): _refused("OBJ (protocol-1 instantiation)"),
    ord("p"): _refused("PUT (a protocol-0 memo with a text index)"), ord("g"): _refused("GET (a text memo index)"),
    ord("P"): _refused("PERSID (a text persistent id)"), ord("S"): _refused("STRING (protocol-0 escaped text)"),
    ord("V"): _refused("UNICODE (protocol-0 escaped text)"), ord("F"): _refused("FLOAT (protocol-0 text)"),
    ord("L"): _refused("LONG (protocol-0 text)"), 0x82: _refused("EXT1 (the extension registry)"),
    0x83: _refused("EXT2 (the extension registry)"), 0x84: _refused("EXT4 (the extension registry)"),
    0x97: _refused("NEXT_BUFFER (out-of-band buffers)"), 0x98: _refused("READONLY_BUFFER (out-of-band buffers)"),
}


# ---------------------------------------------------------------------------------------------
# numpy arrays and dtypes, as numpy pickles them: plain numeric dtypes only, data of exactly their size.

# numpy dtype names a snapshot's scalars may use: plain numbers only (no objects, fields, subarrays).
NUMERIC_DTYPES = frozenset({f"{kind}{size}" for kind, sizes in (("f", (2, 4, 8)), ("i", (1, 2, 4, 8)),
                                                                ("u", (1, 2, 4, 8))) for size in sizes} | {"b1"})


class DtypeSpec(Buildable):
    """Stand-in for ``numpy.dtype(name, align, copy)``: a plain numeric dtype by name. The state pickle's BUILD
    hands a dtype is checked here and never reaches numpy's ``__setstate__``."""

    def __init__(self, name):
        if not is_str(name) or name not in NUMERIC_DTYPES:
            raise PickleRefused(f"numpy dtype {describe(name)} is not a plain numeric type; refusing it")
        self.name, self.byteorder = name, "<" if name not in ("i1", "u1", "b1") else "|"

    def pickle_state(self, reader: Reader, state) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) for a plain number
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4) or type(state[0]) is not int:
            raise PickleRefused(f"numpy dtype state {describe(state)} is not that of a plain number")
        byteorder, subarray, names, fields = state[1:5]
        if not (is_str(byteorder) and byteorder in ("<", "|", "=")) or subarray is not None or names is not None \
                or fields is not None:
            raise PickleRefused("numpy dtype state declares a byte order, fields or a subarray: refused (only plain "
                                "little-endian numbers are read)")
        size = int(self.name[1:])
        if any(type(v) is not int or v not in (-1, size) for v in state[5:7]):
            raise PickleRefused("numpy dtype state declares a size that is not its type's")

    def dtype(self) -> np.dtype:
        return np.dtype(self.byteorder + self.name)


def _dtype(r: Reader, name, align=False, copy=True):
    return DtypeSpec(name)


NUMPY_DTYPE = Handler("numpy dtype", call=_dtype, pure=False)


class ArrayPlaceholder(Buildable):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``: BUILD then gives the array's state, (version,
    shape, dtype, fortran order, data), checked here and turned into an array that views the data's bytes."""

    def __init__(self):
        self.array = None

    def pickle_state(self, reader: Reader, state) -> None:
        if type(state) is not tuple or len(state) != 5 or state[0] != 1 or type(state[0]) is not int:
            raise PickleRefused(f"numpy array state {describe(state)} is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        self.array = array_of(reader, data, dtype, shape, "F" if fortran is True else "C")

    def pickle_children(self):
        return []


def array_of(reader: Reader, data, dtype, shape, order: str = "C"):
    """A numpy array of a plain numeric dtype over exactly its bytes (never an object array, never more than
    the data holds)."""
    if not isinstance(dtype, DtypeSpec):
        raise PickleRefused(f"numpy array of {describe(dtype)}: only plain numeric dtypes are read")
    if type(shape) is not tuple or len(shape) > 8 or not all(type(n) is int and 0 <= n < 2**40 for n in shape):
        raise PickleRefused(f"numpy array shape {describe(shape)} is not up to 8 non-negative integers")
    if type(data) not in (bytes, bytearray):
        raise PickleRefused(f"numpy array data is {describe(data)}, not bytes (object arrays are refused)")
    real = dtype.dtype()
    count = 1
    for n in shape:
        count *= n
    if count * real.itemsize != len(data):
        raise PickleRefused(f"numpy array of shape {shape} and dtype {dtype.name} needs {count * real.itemsize:,} "
                            f"bytes, the file gives {len(data):,}")
    return np.frombuffer(data, dtype=real).reshape(shape, order=order)


def _reconstruct(r: Reader, cls, shape, typecode):
    if cls is not NUMPY_NDARRAY or type(shape) is not tuple or shape != (0,) or type(typecode) is not bytes:
        raise PickleRefused("numpy _reconstruct of anything but an empty ndarray")
    return ArrayPlaceholder()


def _frombuffer(r: Reader, buffer, dtype, shape, order):
    """numpy's protocol-5 array pickling: ``_frombuffer(buffer, dtype, shape, order)``."""
    if not (is_str(order) and order in ("C", "F")):
        raise PickleRefused(f"numpy array order {describe(order)}")
    return array_of(r, buffer, dtype, shape, order)


def _latin1_bytes(r: Reader, text, encoding="utf-8"):
    """Protocol 2 pickles bytes as ``_codecs.encode(str, 'latin1')``."""
    if not is_str(text) or not is_str(encoding) or encoding != "latin1":
        raise PickleRefused("_codecs.encode is allowed only for latin-1 text (protocol-2 bytes)")
    r.charge(len(text), "latin-1 bytes")
    return codecs.encode(text, "latin1")


LATIN1_BYTES = Handler("latin-1 bytes", call=_latin1_bytes)  # how protocol 2 pickles bytes: _codecs.encode
NUMPY_NDARRAY = Handler("numpy ndarray")
NUMPY_ARRAY_GLOBALS = {  # numpy 1 pickles name numpy.core, numpy 2 numpy._core
    ("numpy.core.multiarray", "_reconstruct"): Handler("numpy array", call=_reconstruct, pure=False),
    ("numpy._core.multiarray", "_reconstruct"): Handler("numpy array", call=_reconstruct, pure=False),
    ("numpy.core.numeric", "_frombuffer"): Handler("numpy array", call=_frombuffer, pure=False),
    ("numpy._core.numeric", "_frombuffer"): Handler("numpy array", call=_frombuffer, pure=False),
    ("numpy", "ndarray"): NUMPY_NDARRAY,
    ("numpy", "dtype"): NUMPY_DTYPE,
    ("_codecs", "encode"): LATIN1_BYTES,
}


def arrays(value, done: dict | None = None):
    """A loaded value with every array placeholder replaced by its array, each container rebuilt once however
    often it is shared (the depth is already bounded by the load)."""
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, ArrayPlaceholder):
        if value.array is None:
            raise PickleRefused("a numpy array without its state")
        out = value.array
    elif type(value) is dict:
        out = {}
        done[id(value)] = out
        out.update({k: arrays(v, done) for k, v in value.items()})
    elif type(value) is list:
        out = []
        done[id(value)] = out
        out.extend(arrays(v, done) for v in value)
    else:
        out = value
    done[id(value)] = out
    return out


# ---------------------------------------------------------------------------------------------
# The depth of the value, checked once at the end: an iterative walk, each object once.

def children(value) -> list:
    """The values a container or a placeholder holds (placeholders list theirs in ``pickle_children``)."""
    if type(value) in (list, tuple, set, frozenset):
        return list(value)
    if type(value) is dict:
        return list(value.values())
    return list(getattr(value, "pickle_children", lambda: [])())


def check_depth(root, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse a value nested deeper than ``limit`` (cycles do not count as depth)."""
    seen, pending = {id(root)}, [(root, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            raise PickleRefused(f"{what}: values nested deeper than {limit}")
        for child in children(value):
            if id(child) not in seen and type(child) not in (str, bytes, int, float, bool, type(None)):
                seen.add(id(child))
                pending.append((child, depth + 1))


def read_file_limited(path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (a device, a FIFO or anything larger is refused)."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PickleRefused(f"{path}: not a regular file (a device, a FIFO or a directory is refused)")
        if info.st_size > limit:
            raise PickleRefused(f"{path}: {info.st_size:,} bytes, more than the {limit:,} this file may have")
        with io.FileIO(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)  # one more: a file that grew since is refused, not cut
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise PickleRefused(f"{path}: changed while it was read")
    return data
