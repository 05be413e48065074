"""The restricted unpickler for the official CIFAR python pickles: ``CifarUnpickler`` can build
only what those files contain, so a crafted file can neither run code nor take memory beyond a
bound set by its size; ``safe_unpickle`` turns every failure into a ``DataError``."""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.core import DataError
from utils import printable


class CraftedPickle(pickle.UnpicklingError):
    """A pickle that builds something no CIFAR file does; the message says what, as a phrase
    ("calls numpy.ndarray directly")."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside ``CifarUnpickler.ALLOWED``."""


#: The numpy types an array in a CIFAR file may have (the files hold uint8 images; the others
#: are plain numbers that a re-saved file could use for labels). No objects, strings, records.
PLAIN_DTYPES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})
MAX_ARRAY_DIMS = 8
#: What each numpy call in a pickle is charged against the byte budget (its Python objects).
CALL_COST = 256


def _text(value: object) -> str | None:
    """``value`` as text when it is short ASCII text or bytes (Python 2 pickles give bytes)."""
    if isinstance(value, bytes) and len(value) <= 16:
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) and len(value) <= 16 else None


class _NdarrayMarker:
    """What ``numpy.ndarray`` unpickles to: the first argument ``_reconstruct`` expects. Calling
    it is refused, because ``ndarray(shape, dtype, buffer, offset, strides)`` can make an array
    that the file's bytes do not back (a stride of 0 turns one byte into any number of images)."""

    def __call__(self, *args: object) -> None:
        raise CraftedPickle("calls numpy.ndarray directly")


_NDARRAY = _NdarrayMarker()


class _PendingDtype:
    """A ``numpy.dtype`` call from a pickle, resolved to a built-in dtype once checked. numpy's
    own ``dtype.__setstate__`` is never called: with ``copy=False`` the dtype is numpy's shared
    one, and its state (byte order, fields) would change every array of that type."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.order: str | None = None

    def build(self, state: object) -> None:
        if self.order is not None:
            raise CraftedPickle("sets the state of one numpy dtype twice")
        orders = ("|",) if self.code[1] == "1" else ("<", ">", "=")
        order = _text(state[1]) if isinstance(state, tuple) and len(state) == 8 else None
        if order not in orders or state[0] != 3 or state[2:] != (None, None, None, -1, -1, 0):
            raise CraftedPickle(f"gives numpy dtype {self.code!r} a state numpy never writes")
        self.order = order

    def resolved(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in ("<", ">") else dtype


class _PendingArray:
    """A ``_reconstruct`` call from a pickle: an array only once ``build`` gives it its bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def build(self, state: object, unpickler: CifarUnpickler) -> None:
        if self.array is not None:
            raise CraftedPickle("sets the state of one array twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CraftedPickle("gives an array a state numpy never writes")
        version, shape, dtype, fortran, raw = state
        if (
            version != 1
            or not isinstance(shape, tuple)
            or len(shape) > MAX_ARRAY_DIMS
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(dtype, _PendingDtype)
            or type(fortran) not in (bool, int)
            or fortran not in (0, 1)
            or not isinstance(raw, bytes)
        ):
            raise CraftedPickle("gives an array a state numpy never writes")
        dtype = dtype.resolved()
        size = math.prod(shape) * dtype.itemsize
        if len(raw) != size:
            raise CraftedPickle(
                f"builds a {' x '.join(map(str, shape)) or 'scalar'} {dtype.name} array of {size:,} bytes from "
                f"{len(raw):,} bytes"
            )
        unpickler.charge(size)
        # A read-only view of the pickle's own bytes: what the array holds is what the file held.
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


class CifarUnpickler(pickle._Unpickler):
    """An unpickler that can build only what the official CIFAR files contain.

    The official files hold dicts of bytes keys, lists of ints and bytes, and uint8 numpy arrays,
    written as ``_reconstruct(ndarray, (0,), b"b")`` followed by a state (BUILD) that carries the
    array's shape, dtype and raw bytes (plus ``_codecs.encode(text, "latin1")``, which Python 3
    uses for bytes in protocol-2 pickles). Any other global, such as ``os.system`` in a crafted
    file, is refused before it can be called.

    None of numpy's own constructors is reachable: the allowed globals resolve to stand-ins that
    accept exactly the calls numpy writes, so that whatever a file says, the data it yields is
    backed by its own bytes and memory stays bounded by its size:

    - an array exists only once its state gave it raw bytes of exactly shape x itemsize length
      and a plain dtype (``PLAIN_DTYPES``); ``ndarray`` is not callable (strides, offsets and
      foreign buffers are how a few bytes became 100 images), and an array left without its
      state (numpy would hand out uninitialised memory) is refused;
    - ``_codecs.encode`` encodes text as latin-1 and nothing else (other codecs, such as hex,
      double their input at each call of a chain);
    - every array and encoded string is charged against a budget of ``4 x file size + 1 MiB``
      bytes, whether or not it shares memory, so memo references that reuse one big bytes object
      for many arrays cannot multiply memory either. (Lists, tuples and dicts cost at most a few
      dozen bytes per byte of the file, a bound of the same kind.)

    It extends the pure-Python unpickler: the C one grows its memo table to the largest index a
    file names, so four damaged bytes in a PUT opcode can make it fill gigabytes (found by the
    fuzz tests). The Python one keeps a dict, and is as fast on these files (they are one big
    byte string and a list of labels).
    """

    ALLOWED: ClassVar[dict[tuple[str, str], Callable[[CifarUnpickler], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): lambda u: u._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda u: u._reconstruct,
        ("numpy", "ndarray"): lambda u: _NDARRAY,
        ("numpy", "dtype"): lambda u: u._dtype,
        ("_codecs", "encode"): lambda u: u._encode,
    }

    def __init__(self, file: io.BytesIO, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self.budget = 4 * size + (1 << 20)
        self.size = size
        self.spent = 0

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)](self)
        raise ForbiddenGlobal(f"{module}.{name}")

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` more of memory against the file's budget, before they are taken."""
        self.spent += nbytes
        if self.spent > self.budget:
            raise CraftedPickle(f"needs more than {self.budget:,} bytes of memory for its {self.size:,} bytes")

    def _reconstruct(self, subtype: object, shape: object, code: object) -> _PendingArray:
        if subtype is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
            raise CraftedPickle("calls numpy's _reconstruct with arguments numpy never writes")
        self.charge(CALL_COST)
        return _PendingArray()

    def _dtype(self, code: object, align: object = False, copy: object = True) -> _PendingDtype:
        text = _text(code)
        if text not in PLAIN_DTYPES:
            shown = printable(repr(code))
            raise CraftedPickle(f"asks for numpy dtype {shown[:40]}, which is not a plain number type")
        if type(align) not in (bool, int) or align != 0 or type(copy) not in (bool, int) or copy not in (0, 1):
            raise CraftedPickle("calls numpy.dtype with arguments numpy never writes")
        self.charge(CALL_COST)
        return _PendingDtype(text)

    def _encode(self, text: object, *args: object) -> bytes:
        if not isinstance(text, str) or args not in (("latin1",), ("latin-1",)):
            raise CraftedPickle("calls _codecs.encode other than as encode(text, 'latin1') for bytes")
        self.charge(len(text))
        return text.encode("latin-1")

    def load_build(self) -> None:
        """BUILD gives state to what ``_reconstruct`` and ``dtype`` returned, and to nothing else."""
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, _PendingArray):
            target.build(state, self)
        elif isinstance(target, _PendingDtype):
            target.build(state)
        else:
            raise CraftedPickle(f"sets the state of a {type(target).__name__}")

    dispatch: ClassVar[dict] = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}

    def load(self) -> object:
        return self._resolve(super().load(), {})

    def _resolve(self, obj: object, seen: dict[int, object]) -> object:
        """``obj`` with every stand-in replaced by its array or dtype; containers are visited
        once each (shared tuples would otherwise cost exponential time)."""
        if isinstance(obj, _PendingArray):
            if obj.array is None:
                raise CraftedPickle("makes an array without giving it its bytes")
            return obj.array
        if isinstance(obj, _PendingDtype):
            return obj.resolved()
        if isinstance(obj, (bytes, str, int, float, type(None))):  # bool is an int
            return obj
        if not isinstance(obj, (list, dict, tuple, set, frozenset)):
            kind = "bare numpy or codecs function" if callable(obj) else type(obj).__name__
            raise CraftedPickle(f"holds a {kind} among its data")
        if id(obj) in seen:
            return seen[id(obj)]
        seen[id(obj)] = obj
        if isinstance(obj, list):
            obj[:] = [self._resolve(item, seen) for item in obj]
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if self._resolve(key, seen) is not key:
                    raise CraftedPickle("uses an array as a dictionary key")
                obj[key] = self._resolve(value, seen)
        elif isinstance(obj, tuple):
            items = [self._resolve(item, seen) for item in obj]
            if any(a is not b for a, b in zip(items, obj, strict=False)):
                seen[id(obj)] = tuple(items)
        elif any(self._resolve(item, seen) is not item for item in obj):
            raise CraftedPickle("puts an array in a set")
        return seen[id(obj)]


def safe_unpickle(path: Path) -> object:
    """Load a CIFAR pickle with ``CifarUnpickler``; every failure is a ``DataError``."""
    try:
        # From memory, not the file: a damaged length field then cannot make the unpickler
        # reserve gigabytes for bytes that are not there.
        data = path.read_bytes()
        return CifarUnpickler(io.BytesIO(data), size=len(data)).load()
    except ForbiddenGlobal as error:
        raise DataError(
            f"{path} asks to call {error}, which no CIFAR file does, so it was not loaded (it may be crafted "
            "to run code); replace it with the file from the official archive."
        ) from None
    except CraftedPickle as error:
        raise DataError(
            f"{path} was not loaded: it {error}, which no CIFAR file does (it may be crafted); replace it with the "
            "file from the official archive."
        ) from None
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}); check the file and its permissions."
        ) from None
    except Exception as error:  # noqa: BLE001 (any parse failure of untrusted bytes means a damaged file)
        raise DataError(
            f"{path} is truncated or not a CIFAR pickle ({type(error).__name__}); "
            "replace it with the file from the official archive."
        ) from None
