"""runtime/abi.py, the one Python source of the runtime contract, held against
the C header runtime/sqk_runtime.h: version, error codes, buffer kinds, dtype
codes, the program table's struct layouts; and the constants' storage layout
with its inverse."""
from __future__ import annotations

import re

import numpy as np
import pytest

from sqk.ir import dtypes
from sqk.runtime import abi
from sqk.runtime.ffi import HEADER


@pytest.fixture(scope="module")
def header() -> str:
    return open(HEADER).read()


def defines(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"#define (SQK_\w+) (-?\d+)", text)}


def test_constants_match_the_header(header):
    define = defines(header)
    assert define["SQK_ABI_VERSION"] == abi.ABI_VERSION
    assert {k: v for k, v in define.items() if k == "SQK_OK" or k.startswith("SQK_ERR_")} == \
        {f"SQK_{k}": v for k, v in abi.ERRORS.items()}
    assert [define[f"SQK_BUF_{k}"] for k in ("INPUT", "OUTPUT", "CONST", "ARENA")] == \
        [abi.BUF_INPUT, abi.BUF_OUTPUT, abi.BUF_CONST, abi.BUF_ARENA]
    dtype_defines = {k: v for k, v in define.items()
                     if not re.match(r"SQK_(ERR_|BUF_|OK$|ABI_VERSION$)", k)}
    assert dtype_defines == {f"SQK_{name.upper().rstrip('_')}": code for name, code in abi.DTYPE_CODES.items()}
    assert abi.DTYPE_CODES == {d.name: d.code for d in dtypes.ALL}
    assert "(64-byte aligned)" in header and abi.ALIGN == 64


def c_structs(text: str) -> dict[str, tuple]:
    """{name: ((field, "i64"|"ptr"), ...)} of the header's ``typedef struct {...} name;``."""
    out = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", text, re.S):
        fields = []
        for line in re.sub(r"/\*.*?\*/", "", body, flags=re.S).split(";"):
            m = re.fullmatch(r"\s*(.+?)\s*\b(\w+)\s*", line)
            if not m:
                continue
            ctype, field = m.groups()
            kind = "ptr" if "*" in ctype or ctype == "sqk_kernel_fn" else ctype
            fields.append((field, {"int64_t": "i64"}.get(kind, kind)))
        out[name] = tuple(fields)
    return out


def test_struct_layouts_match_the_header(header):
    structs = c_structs(header)
    for name, fields in abi.STRUCTS.items():
        assert structs[name] == fields, name
    assert {"sqk_buffer", "sqk_step", "sqk_tensor_info", "sqk_program"} <= set(structs)


def test_lowering_emits_the_abi_layout():
    pytest.importorskip("llvmlite")
    from llvmlite import ir

    from sqk.codegen.lower import _struct, _struct_type

    t = _struct_type("sqk_step")
    assert [str(e) for e in t.elements] == [k for _, k in abi.STRUCTS["sqk_step"]]   # "ptr": LLVM's opaque pointer
    c = _struct("sqk_buffer", kind=abi.BUF_CONST, index=128, nbytes=64)
    assert str(c) == "{i64, i64, i64} {i64 2, i64 128, i64 64}"
    with pytest.raises(ValueError, match="sqk_buffer: fields"):
        _struct("sqk_buffer", kind=0, index=0)
    assert isinstance(c, ir.Constant)


@pytest.mark.parametrize("name", [d.name for d in dtypes.ALL])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5)])
def test_storage_layout_round_trips(name, shape):
    d = dtypes.dtype(name)
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    size = int(np.prod(shape))
    if name == "i4":
        arr = rng.integers(-8, 8, size).astype(np.int8).reshape(shape)
    elif name == "bool":
        arr = (rng.random(size) > 0.5).reshape(shape)
    else:
        arr = (rng.standard_normal(size) * 50).astype(d.np_dtype).reshape(shape)
    data = abi.storage_bytes(arr, d)
    assert len(data) == d.nbytes(size)
    back = abi.from_storage(data, d, shape)
    assert back.dtype == d.np_dtype and back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_i4_nibble_order():
    """Element 2i in the low nibble, 2i+1 in the high one; an odd count pads a zero high nibble."""
    assert abi.storage_bytes(np.array([1, -2, 7], np.int8), dtypes.i4) == bytes([0xE1, 0x07])
    assert list(abi.from_storage(bytes([0xE1, 0x07]), dtypes.i4, (3,))) == [1, -2, 7]
