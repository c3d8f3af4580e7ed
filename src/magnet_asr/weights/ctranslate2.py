"""Reader for CTranslate2's ``model.bin`` (what faster-whisper ships), without CTranslate2.

The format is written by ``ModelSpec._serialize`` in CTranslate2's Python package and read by
``models::Model::load`` in its C++ core. All integers are little-endian:

    uint32  binary_version                      (6 today; 1-5 are older layouts, see below)
    string  spec_name, uint32 spec_revision     (binary_version >= 2; e.g. "WhisperSpec", 3)
    uint32  num_variables, then per variable, sorted by name:
        string  name                            (scopes joined by "/", e.g. "encoder/conv1/weight")
        uint8   rank, rank x uint32 dims
        uint8   dtype id, uint32 num_bytes       (binary_version >= 4)
        | uint8 item_size, uint32 num_items      (binary_version < 4: the dtype follows from item_size)
        bytes   the row-major values
    uint32  num_aliases, then (string alias, string target) pairs     (binary_version >= 3)

A string is ``uint16 length`` (including a trailing NUL) then the UTF-8 bytes and the NUL. Scalars
(rank 0) hold settings such as ``encoder/num_heads``. Quantized weights (int8/int16) come with a
``<name>_scale`` variable; the value is ``stored / scale`` (per output row for int8, one scalar for int16).

The reader streams: it takes one file or several parts to read as one concatenated file (a model split
across packages) and yields one variable at a time, so a converter never holds the raw file and its
converted copy at once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from magnet_asr.weights.packages import WeightsError

SUPPORTED_BINARY_VERSIONS = range(1, 7)

# DataType enum order in CTranslate2's include/ctranslate2/types.h. numpy has no bfloat16: it is
# read as uint16 and widened to float32 (a bfloat16 is the top half of a float32).
DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
# binary_version < 4 stored an item size instead of a dtype id (``get_dtype_from_item_size`` in C++).
_DTYPE_FROM_ITEM_SIZE: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
SCALE_SUFFIX = "_scale"


@dataclass
class CT2Variable:
    name: str
    dtype: str  # the stored dtype name, one of DTYPES' values
    value: np.ndarray  # the stored values (bfloat16 already widened to float32); shape () for scalars

    @property
    def is_scalar(self) -> bool:
        return self.value.ndim == 0


class _ConcatenatedFiles:
    """Read several files as one stream (a model.bin split into parts), exact reads only."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = None
        self.offset = 0
        self.total_bytes = sum(p.stat().st_size for p in self._paths)

    def read(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n > 0:
            if self._file is None:
                if self._index >= len(self._paths):
                    raise WeightsError(
                        f"{self._paths[-1]}: model.bin ends early (truncated at byte {self.offset})"
                    )
                self._file = open(self._paths[self._index], "rb")  # noqa: SIM115 - closed in close()/on EOF
            chunk = self._file.read(n)
            if len(chunk) < n:
                self._file.close()
                self._file = None
                self._index += 1
            chunks.append(chunk)
            self.offset += len(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def at_end(self) -> bool:
        return self.offset >= self.total_bytes

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CT2Reader:
    """Stream the variables of a CTranslate2 ``model.bin`` (one file, or parts to concatenate).

    Use as a context manager; iterate :meth:`variables` to the end before reading :attr:`aliases`.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path]) -> None:
        parts = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not parts:
            raise WeightsError("no model.bin file given")
        for p in parts:
            if not p.is_file():
                raise WeightsError(f"{p}: model.bin (part) not found")
        self.name = " + ".join(str(p) for p in parts)
        self._stream = _ConcatenatedFiles(parts)
        self.aliases: dict[str, str] = {}
        self._read_header()

    # -- primitives -------------------------------------------------------------------------------
    def _unpack(self, fmt: str) -> int:
        return int(struct.unpack("<" + fmt, self._stream.read(struct.calcsize(fmt)))[0])

    def _string(self) -> str:
        raw = self._stream.read(self._unpack("H"))
        if not raw or raw[-1] != 0:
            raise WeightsError(f"{self.name}: corrupt model.bin (bad string at byte {self._stream.offset})")
        return raw[:-1].decode("utf-8")

    def _read_header(self) -> None:
        self.binary_version = self._unpack("I")
        if self.binary_version not in SUPPORTED_BINARY_VERSIONS:
            raise WeightsError(
                f"{self.name}: not a CTranslate2 model.bin, or binary version {self.binary_version} "
                f"is newer than supported ({SUPPORTED_BINARY_VERSIONS[-1]})"
            )
        has_spec = self.binary_version >= 2
        self.spec_name = self._string() if has_spec else ""
        self.spec_revision = self._unpack("I") if has_spec else 1
        self.num_variables = self._unpack("I")

    def _variable(self) -> CT2Variable:
        name = self._string()
        shape = tuple(self._unpack("I") for _ in range(self._unpack("B")))
        if self.binary_version >= 4:
            type_id = self._unpack("B")
            if type_id not in DTYPES:
                raise WeightsError(f"{self.name}: variable {name} has unknown dtype id {type_id}")
            dtype, num_bytes = DTYPES[type_id], self._unpack("I")
        else:
            item_size = self._unpack("B")
            if item_size not in _DTYPE_FROM_ITEM_SIZE:
                raise WeightsError(f"{self.name}: variable {name} has unknown item size {item_size}")
            dtype, num_bytes = _DTYPE_FROM_ITEM_SIZE[item_size], self._unpack("I") * item_size
        return CT2Variable(name, dtype, _decode(self._stream.read(num_bytes), dtype, shape, name))

    # -- public -----------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return self._stream.total_bytes

    @property
    def offset(self) -> int:
        return self._stream.offset

    def variables(self) -> Iterator[CT2Variable]:
        """Yield the stored variables in file order, then read the alias table into :attr:`aliases`."""
        for _ in range(self.num_variables):
            yield self._variable()
        if self.binary_version >= 3:
            for _ in range(self._unpack("I")):
                alias = self._string()
                self.aliases[alias] = self._string()
        if not self._stream.at_end():
            raise WeightsError(
                f"{self.name}: {self._stream.total_bytes - self.offset} unexpected trailing bytes"
            )

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> CT2Reader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _decode(raw: bytes, dtype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    np_dtype = _NUMPY_DTYPES[dtype]
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(raw) != expected:
        raise WeightsError(
            f"variable {name}: {len(raw)} bytes stored, shape {shape} x {dtype} needs {expected}"
        )
    # frombuffer over the immutable bytes gives a read-only view; copy so callers own writable arrays.
    value = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    if dtype == "bfloat16":
        value = (value.astype(np.uint32) << 16).view(np.float32)
    return value


def dequantize(variables: Iterator[CT2Variable]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float array)`` for every variable, folding ``*_scale`` variables into their weights.

    Integer weights that have a scale become ``stored / scale`` in float32; the scale variables
    themselves are not yielded. Variables are sorted by name in the file, so a weight arrives just
    before its scale: only weights waiting for a scale are buffered. Scalars pass through unchanged.
    """
    pending: dict[str, CT2Variable] = {}
    for var in variables:
        base = var.name[: -len(SCALE_SUFFIX)] if var.name.endswith(SCALE_SUFFIX) else None
        if base is not None and base in pending:
            weight = pending.pop(base).value.astype(np.float32)
            scale = var.value.astype(np.float32)
            yield base, weight / (scale[:, None] if scale.ndim == 1 else scale)
        elif var.dtype in ("int8", "int16") and not var.is_scalar:
            pending[var.name] = var
        else:
            yield var.name, var.value
    for name, var in pending.items():  # integer tensors without a scale are plain integers
        yield name, var.value


def read_model_bin(paths: str | Path | Sequence[str | Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole ``model.bin`` into memory: ``(variables, aliases)``, quantized weights dequantized."""
    with CT2Reader(paths) as reader:
        variables = dict(dequantize(reader.variables()))
        return variables, dict(reader.aliases)
