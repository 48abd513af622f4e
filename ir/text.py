"""The IR text form: printer and parser.

    graph @mlp(%x: f32[1,768]) -> f32[1,3072] {
      %w1 = const @w1 : f32[768,3072]
      %b = const [0.5, -1.0] : f32[2]
      %0 = matmul(%x, %w1) : f32[1,3072]
      %1 = gelu(%0) {approximate="tanh"} : f32[1,3072]
      return %1
    }

One node per line, SSA values, a type on every result.  Constants with more
elements than the printer's ``inline_limit`` print as ``@name`` references to
a side table (``Graph.constants``), which ``parse_ir`` takes as ``constants=``.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import zipfile

import numpy as np

from . import dtypes as dt
from .graph import INT64_MAX, INT64_MIN, Graph, IRError, Node, TensorType, Value
from .ops import OPS, REQUIRED


class ParseError(IRError):
    """Malformed IR text; the message starts with ``line L, column C``."""

    def __init__(self, msg: str, line: int, col: int):
        super().__init__(f"line {line}, column {col}: {msg}")
        self.line, self.col = line, col


# --- printing -------------------------------------------------------------------------

def _scalar(v, d) -> str:
    if d is dt.bool_:
        return "true" if v else "false"
    if d.is_float:
        return str(d.np_dtype.type(v))  # shortest text that parses back to the same value
    return str(int(v))


def _attr(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dt.DType):
        return v.name
    if isinstance(v, tuple):
        return "[" + ", ".join(_attr(x) for x in v) + "]"
    raise IRError(f"cannot print attribute value {v!r}")


def _region(body: Graph, inline_limit, canonical: bool) -> str:
    """A graph attribute: the body's own text, nested lines indented one level
    (its value names are its own scope)."""
    return print_graph(body, inline_limit, canonical).rstrip("\n").replace("\n", "\n  ")


def print_graph(g: Graph, inline_limit: int | None = 16, canonical: bool = False) -> str:
    names: dict[Value, str] = {}
    inputs = set(g.inputs)  # input names are part of the API: canonical form keeps them
    taken = {v.name for v in g.inputs}
    counter = iter(n for n in map(str, itertools.count()) if n not in taken)

    def name(v: Value) -> str:
        if v not in names:
            # canonical numbers skip input names: an input called "0" must not alias node 0
            names[v] = next(counter) if canonical and v not in inputs else v.name
        return "%" + names[v]

    sig = ", ".join(f"{name(v)}: {v.type}" for v in g.inputs)
    outs = [str(v.type) for v in g.outputs]
    ret = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
    lines = [f"graph @{g.name}({sig}) -> {ret} {{"]
    for n in g.nodes:
        lhs = ", ".join(name(v) for v in n.outputs)
        types = ", ".join(str(v.type) for v in n.outputs)
        if n.op == "const":
            arr = n.attrs["value"]
            if inline_limit is None or arr.size <= inline_limit:
                d = n.output.dtype
                body = "[" + ", ".join(_scalar(x, d) for x in arr.reshape(-1).tolist()) + "]"
            else:
                body = "@" + names[n.output]
            lines.append(f"  {lhs} = const {body} : {types}")
            continue
        args = ", ".join(name(v) for v in n.inputs)
        # defaults are left out; compared as text so -0.0 is not taken for a default 0.0
        attrs = ", ".join(f"{k}={_region(v, inline_limit, canonical) if isinstance(v, Graph) else _attr(v)}"
                          for k, v in n.attrs.items()
                          if OPS[n.op].attrs[k].default is REQUIRED or _attr(v) != _attr(OPS[n.op].attrs[k].default))
        attrs = f" {{{attrs}}}" if attrs else ""
        lines.append(f"  {lhs} = {n.op}({args}){attrs} : {types}")
    lines.append("  return " + ", ".join(name(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _anonymous(body: Graph) -> str:
    """A body's canonical text without its own names: the graph's (unique to each fused
    group) and its inputs' (kept by the canonical form), which become %in0, %in1 ...;
    constants inside print their values (a kernel compiles them in)."""
    text = re.sub(r"^graph @[\w.]*\(", "graph @(", print_graph(body, None, True))   # constants inline
    # every input at once (one at a time, an input called "in0" would meet a renamed one)
    index = {v.name: j for j, v in enumerate(body.inputs)}
    if index:
        names = "|".join(re.escape(n) for n in sorted(index, key=len, reverse=True))
        text = re.sub(rf"%({names})(?![\w.])", lambda m: f"%in{index[m.group(1)]}", text)
    # the canonical numbers skip the input names: renumber them in order of appearance
    order: dict[str, str] = {}
    return re.sub(r"%(\d+)(?![\w.])", lambda m: "%" + order.setdefault(m.group(1), f"v{len(order)}"), text)


def node_signature(n: Node) -> str:
    """``n`` as text without value names: op, attributes (a body in canonical form,
    unnamed) and the types of its inputs and outputs.  Nodes with the same signature
    compute the same function of their inputs (codegen shares one kernel between them)."""
    attrs = ", ".join(f"{k}={_anonymous(v) if isinstance(v, Graph) else _attr(v)}" for k, v in n.attrs.items())
    ins = ", ".join("-" if v is None else str(v.type) for v in n.inputs)
    return f"{n.op}({ins}) {{{attrs}}} : " + ", ".join(str(v.type) for v in n.outputs)


# --- parsing ---------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|\#[^\n]*) |
    (?P<nl>\n) |
    (?P<value>%[A-Za-z0-9_.]+) |
    (?P<ref>@[A-Za-z0-9_.]+) |
    (?P<string>"(?:[^"\\\n]|\\.)*") |
    (?P<number>[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf\b|nan\b)) |
    (?P<arrow>->) |
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*) |
    (?P<punct>[(){}\[\],:=])
""", re.VERBOSE | re.ASCII)
MAX_NESTING = 64   # brackets and graph regions inside one another (the parser recurses on them)


def _found(tok) -> str:
    return "end of input" if tok[0] == "eof" else ("end of line" if tok[0] == "nl" else repr(tok[1]))


class _Parser:
    def __init__(self, text: str, constants):
        self.toks = []
        line, start = 1, 0
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ParseError(f"unexpected character {text[pos]!r}", line, pos - start + 1)
            kind = m.lastgroup
            if kind == "nl":
                self.toks.append(("nl", "\n", line, pos - start + 1))
                line, start = line + 1, m.end()
            elif kind != "ws":
                self.toks.append((kind, m.group(), line, pos - start + 1))
            pos = m.end()
        self.toks.append(("eof", "", line, pos - start + 1))
        self.i = 0
        self.depth = 0
        self.constants = constants or {}
        self.env: dict[str, Value] = {}

    # token helpers
    def peek(self, skip_nl=True):
        while skip_nl and self.toks[self.i][0] == "nl":
            self.i += 1
        return self.toks[self.i]

    def error(self, msg, tok=None):
        tok = tok or self.peek()
        return ParseError(msg, tok[2], tok[3])

    def take(self, kind=None, text=None, skip_nl=True):
        tok = self.peek(skip_nl)
        if (kind and tok[0] != kind) or (text and tok[1] != text):
            want = repr(text) if text else kind
            raise self.error(f"expected {want}, found {_found(tok)}", tok)
        self.i += 1
        return tok

    def sep(self, close) -> bool:
        """After a list item: True when ``close`` follows (consumed), False after a ','."""
        if self.accept(close):
            return True
        tok = self.peek()
        if tok[1] != ",":
            raise self.error(f"expected ',' or {close!r}, found {_found(tok)}", tok)
        self.i += 1
        return False

    def accept(self, text):
        if self.peek()[1] == text:
            self.i += 1
            return True
        return False

    # grammar
    def type_(self) -> TensorType:
        tok = self.take("ident")
        if tok[1] not in dt.BY_NAME:
            raise self.error(f"unknown dtype {tok[1]!r}; expected one of {', '.join(dt.BY_NAME)}", tok)
        self.take(text="[")
        dims = []
        if not self.accept("]"):
            while True:
                t = self.take("number")
                if not t[1].isdigit():
                    raise self.error(f"dimension must be a non-negative integer, got {t[1]}", t)
                dims.append(int(t[1]))
                if self.sep("]"):
                    break
        try:
            return TensorType(dt.BY_NAME[tok[1]], tuple(dims))
        except IRError as e:   # beyond int64
            raise self.error(str(e), tok) from None

    def use(self) -> Value:
        tok = self.take("value")
        if tok[1][1:] not in self.env:
            raise self.error(f"use of undefined value {tok[1]}", tok)
        return self.env[tok[1][1:]]

    def define(self, tok, t: TensorType) -> Value:
        name = tok[1][1:]
        if name in self.env:
            raise self.error(f"value %{name} is defined twice", tok)
        v = self.env[name] = Value(name, t)
        return v

    def literal(self):
        tok = self.peek()
        if tok[1] == "[" or tok[1] == "graph":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.error(f"lists and graphs nested more than {MAX_NESTING} deep", tok)
            try:
                return self._nested(tok)
            finally:
                self.depth -= 1
        if tok[0] == "number":
            self.take()
            return self.number(tok)
        if tok[0] == "string":
            self.take()
            try:
                return json.loads(tok[1])
            except ValueError as e:   # an escape JSON lacks: \x, \u12
                raise self.error(f"bad string literal {tok[1]}: {e.args[0].split(':')[0]}", tok) from None
        if tok[0] == "ident":
            self.take()
            return {"true": True, "false": False}.get(tok[1], tok[1])
        raise self.error("expected a value (number, string, true/false, name, [list] or graph @name(...) {...})")

    def number(self, tok):
        """An int within int64, or a float; a finite spelling too large for a
        double (1e999) is an error, not inf."""
        s = tok[1]
        if re.fullmatch(r"[-+]?\d+", s):
            v = int(s)
            if not INT64_MIN <= v <= INT64_MAX:
                raise self.error(f"integer {s} is beyond int64", tok)
            return v
        v = float(s)
        if math.isinf(v) and "inf" not in s:
            raise self.error(f"number {s} is beyond the float range (write inf for infinity)", tok)
        return v

    def _nested(self, tok):
        if tok[1] == "[":
            self.take()
            items = []
            if not self.accept("]"):
                while True:
                    items.append(self.literal())
                    if self.sep("]"):
                        break
            return tuple(items)
        if self.toks[self.i + 1][0] == "ref":
            return self.graph(nested=True)
        self.take()
        return "graph"

    def graph(self, nested: bool = False) -> Graph:
        """``graph @name(inputs) -> types { nodes return values }``; a ``nested``
        graph (an attribute's region) has its own value scope and ends at its '}'."""
        start = self.take("ident", "graph")
        outer_env = self.env
        if nested:
            self.env = {}
        gname = self.take("ref")[1][1:]
        self.take(text="(")
        inputs = []
        if not self.accept(")"):
            while True:
                tok = self.take("value")
                self.take(text=":")
                inputs.append(self.define(tok, self.type_()))
                if self.sep(")"):
                    break
        self.take("arrow")
        if self.accept("("):
            ret_types = [self.type_()]
            while self.accept(","):
                ret_types.append(self.type_())
            self.take(text=")")
        else:
            ret_types = [self.type_()]
        self.take(text="{")
        nodes = []
        while self.peek()[1] != "return":
            nodes.append(self.node())
        self.take("ident", "return")
        outputs = [self.use()]
        while self.accept(","):
            outputs.append(self.use())
        self.take(text="}")
        if nested:
            self.env = outer_env
        else:
            self.take("eof")
        got = [v.type for v in outputs]
        if got != ret_types:
            line, col = (start[2], start[3]) if nested else (self.toks[0][2], 1)
            raise ParseError(f"return types {', '.join(map(str, got))} do not match the signature "
                             f"{', '.join(map(str, ret_types))}", line, col)
        g = Graph(gname, inputs, nodes, outputs)
        if nested:
            from .verify import verify  # verify imports this module

            try:
                verify(g)
            except IRError as e:
                raise self.error(f"graph @{gname}: {e}", start) from None
        return g

    def node(self) -> Node:
        start = self.peek()
        lhs = [self.take("value")]
        while self.accept(","):
            lhs.append(self.take("value"))
        self.take(text="=")
        optok = self.take("ident")
        op = optok[1]
        if op not in OPS:
            raise self.error(f"unknown op {op!r}", optok)
        if op == "const":
            return self.const(lhs, start)
        self.take(text="(")
        args = []
        if not self.accept(")"):
            while True:
                args.append(self.use())
                if self.sep(")"):
                    break
        attrs, attr_toks = {}, {}
        if self.accept("{"):
            if not self.accept("}"):
                while True:
                    k = self.take("ident")
                    if k[1] in attrs:
                        raise self.error(f"attribute {k[1]!r} is given twice", k)
                    self.take(text="=")
                    attr_toks[k[1]] = (k, self.peek())
                    attrs[k[1]] = self.literal()
                    if self.sep("}"):
                        break
        self.take(text=":")
        types = [self.type_()]
        while self.accept(","):
            types.append(self.type_())
        if len(types) != len(lhs):
            raise self.error(f"{len(lhs)} results but {len(types)} types", start)
        opdef = OPS[op]
        for k, v in attrs.items():  # point at the attribute at fault
            ktok, vtok = attr_toks[k]
            if k not in opdef.attrs:
                raise self.error(f"{op} has no attribute {k!r}; attributes: {', '.join(opdef.attrs) or 'none'}", ktok)
            try:
                opdef.attrs[k].normalize(k, v)
            except IRError as e:
                raise self.error(f"{op}: {e}", vtok) from None
        try:
            opdef.check_arity(len(args))
            attrs = opdef.normalize_attrs(attrs)
        except IRError as e:
            raise ParseError(str(e), start[2], start[3]) from None
        outs = tuple(self.define(t, ty) for t, ty in zip(lhs, types))
        return Node(op, tuple(args), outs, attrs)

    def const(self, lhs, start) -> Node:
        if len(lhs) != 1:
            raise self.error("const has one result", start)
        tok = self.peek()
        if tok[0] == "ref":
            self.take()
            ref = tok[1][1:]
            if ref not in self.constants:
                raise self.error(f"constant @{ref} is not in the side table: pass constants= "
                                 f"(or keep the .npz beside the IR file)", tok)
            data = np.asarray(self.constants[ref])
        else:
            data = self.literal()
            if not isinstance(data, tuple):
                raise self.error("const needs @name or a [list] of values", tok)
        self.take(text=":")
        t = self.type_()
        try:
            arr = _as_array(data, t)
        except (ValueError, TypeError, OverflowError) as e:
            raise self.error(f"constant {lhs[0][1]}: {e}", tok) from None
        return Node("const", (), (self.define(lhs[0], t),), {"value": arr})


def _as_array(data, t: TensorType) -> np.ndarray:
    if isinstance(data, tuple):
        if any(isinstance(x, tuple) for x in data):
            raise ValueError("inline constants are flat lists")
        # no silent conversions: 1.5 is not an i32, 2 is not a bool, true is not an f32
        kind = bool if t.dtype is dt.bool_ else int if t.dtype.is_int else (int, float)
        bad = [x for x in data if not isinstance(x, kind) or (kind is not bool and isinstance(x, bool))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a value of dtype {t.dtype}")
        arr = np.array(data, dtype=np.float64 if t.dtype.is_float else object)
        if arr.size != t.size:
            raise ValueError(f"{arr.size} values for type {t} ({t.size} elements)")
        wide = arr
        with np.errstate(over="ignore"):
            arr = arr.astype(t.dtype.np_dtype).reshape(t.shape)
        if t.dtype.is_float:   # rounds to inf in the dtype: an error unless written as inf
            over = np.isinf(arr.reshape(-1)) & np.isfinite(wide)
            if over.any():
                big = f"{float(np.finfo(t.dtype.np_dtype).max):.8g}"
                raise ValueError(f"{float(wide[over][0])!r} is beyond the range of {t.dtype} (largest {big}; "
                                 f"write inf for infinity)")
    else:
        arr = data
        if arr.shape != t.shape or arr.dtype != t.dtype.np_dtype:
            raise ValueError(f"side-table array is {arr.dtype}{list(arr.shape)}, type says {t}")
    check_const(arr, t)
    return arr


def check_const(arr: np.ndarray, t: TensorType) -> None:
    if t.dtype is dt.i4 and arr.size and (arr.min() < -8 or arr.max() > 7):
        raise ValueError("i4 values must lie in [-8, 7]")


def parse_ir(text: str, constants: dict[str, np.ndarray] | None = None) -> Graph:
    """Parse the text form back to a Graph (verified).  ``constants`` resolves
    ``@name`` references.  Errors are ParseError with line and column."""
    from .verify import verify

    g = _Parser(text, constants).graph()
    verify(g)
    return g


def save_ir(g: Graph, path, inline_limit: int = 16) -> None:
    """Write ``path`` (text) and, when there are large constants, ``path + '.npz'``."""
    import os

    text = g.to_text(inline_limit)
    big = {k: v for k, v in g.constants.items() if v.size > inline_limit}
    tmp = f"{path}.tmp{os.getpid()}"
    if big:
        # written entry by entry rather than np.savez(**big): a constant named
        # "file" or "allow_pickle" would collide with savez's own parameters
        with zipfile.ZipFile(tmp + ".npz", "w") as z:
            for k, v in big.items():
                with z.open(k + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
        os.replace(tmp + ".npz", f"{path}.npz")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_ir(path) -> Graph:
    """Read an IR text file and its ``.npz`` side table, if there is one."""
    import os

    with open(path) as f:
        text = f.read()
    consts = None
    if os.path.exists(f"{path}.npz"):
        try:
            with np.load(f"{path}.npz", allow_pickle=False) as z:
                consts = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # truncated, not a zip, pickled
            raise IRError(f"{path}.npz: cannot read the constants beside the IR: {type(e).__name__}: {e}") from None
    return parse_ir(text, consts)
