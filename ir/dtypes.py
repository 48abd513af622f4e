"""Element types of the IR.

Each dtype has a short name used in the text form (``f32``), a numpy storage
dtype, and a code shared with the C runtime (``SQK_F32`` ... in
runtime/sqk_runtime.h).  ``i4`` is a packed 4-bit signed integer: in the IR
it is stored unpacked (one int8 per value, range [-8, 7]); codegen packs two
values per byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    code: int           # runtime code, see runtime/sqk_runtime.h
    np_dtype: np.dtype  # storage dtype in numpy
    bits: int

    @property
    def is_float(self) -> bool:
        return self.name in ("f32", "f16")

    @property
    def is_int(self) -> bool:
        return self.name in ("i64", "i32", "i8", "u8", "i4")

    @property
    def is_signed(self) -> bool:
        return self.name in ("i64", "i32", "i8", "i4")

    def nbytes(self, count: int) -> int:
        """Bytes taken by ``count`` packed elements."""
        return (count * self.bits + 7) // 8

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


f32 = DType("f32", 0, np.dtype(np.float32), 32)
f16 = DType("f16", 1, np.dtype(np.float16), 16)
i64 = DType("i64", 2, np.dtype(np.int64), 64)
i32 = DType("i32", 3, np.dtype(np.int32), 32)
i8 = DType("i8", 4, np.dtype(np.int8), 8)
u8 = DType("u8", 5, np.dtype(np.uint8), 8)
bool_ = DType("bool", 6, np.dtype(np.bool_), 8)
i4 = DType("i4", 7, np.dtype(np.int8), 4)

ALL = (f32, f16, i64, i32, i8, u8, bool_, i4)
BY_NAME = {d.name: d for d in ALL}
BY_CODE = {d.code: d for d in ALL}
FLOATS = (f32, f16)
INTS = (i64, i32, i8, u8)
NUMERIC = FLOATS + INTS
# dtypes a compiled model can take as input or give as output
IO = (f32, f16, i64, i32, i8, u8, bool_)


def dtype(x) -> DType:
    """Coerce a name (``"f32"``), a DType or a numpy dtype to a DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str) and x in BY_NAME:
        return BY_NAME[x]
    try:
        npd = np.dtype(x)
    except TypeError:
        npd = None
    for d in ALL:
        if d is not i4 and d.np_dtype == npd:
            return d
    raise TypeError(f"unknown dtype {x!r}; expected one of {', '.join(BY_NAME)}")
