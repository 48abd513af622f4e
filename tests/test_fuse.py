"""The fuse pass, the fused op and its kernels: which groups fuse, kernel counts
on the example models, outputs equal to the unfused reference (host and
riscv64), the IR text of fused graphs, and memory planning of the result."""
from __future__ import annotations

import numpy as np
import pytest

import sqk
from harness import assert_close, check, compile_for, rand
from sqk.codegen.fused import body_kind
from sqk.codegen.lower import is_view, pack_constants
from sqk.codegen.matmul import GEMM_KC
from sqk.compiler.memory import plan_memory
from sqk.compiler.models import small_cnn, transformer_block
from sqk.compiler.pipeline import PassManager, parse_pipeline
from sqk.ir import GraphBuilder, IRError, ParseError

FUSE = "fold_constants,dce,fuse"


def fuse(g, spec="fuse"):
    return PassManager(parse_pipeline(spec)).run(g)


def fused_nodes(g):
    return [n for n in g.nodes if n.op == "fused"]


def kernels(g):
    return sum(n.op != "const" for n in g.nodes)


def steps(g):
    """Kernels lowering makes of ``g``: no const, no reshape planned as a view."""
    plan = plan_memory(g, pack_constants(g))
    return sum(n.op != "const" and not is_view(n, plan.buffers) for n in g.nodes)


def run_fused(g, inputs, target="host", kinds=None, rtol=None, spec=FUSE):
    """Compile ``g`` through the fuse pass, compare with the unfused reference;
    ``kinds``: the body kinds the pass must make.  Returns the fused graph and the module."""
    gf = fuse(g, spec)
    if kinds is not None:
        assert sorted(body_kind(n.attrs["body"]) for n in fused_nodes(gf)) == sorted(kinds), gf
    m = compile_for(g, target, pipeline=spec)
    assert len(m.manifest["kernels"]) == steps(gf)
    out, ref = m(**inputs), sqk.reference(g, **inputs)
    for i, (o, r) in enumerate(zip(*((out, ref) if isinstance(ref, tuple) else ((out,), (ref,))))):
        assert_close(o, r, rtol, what=f"{g.name} fused on {target}: output {i}")
    roundtrip(gf)
    return gf, m


def roundtrip(g):
    s = g.to_text()
    g2 = sqk.parse_ir(s, g.constants)
    assert g2 == g and g2.to_text() == s
    if sum(a.size for a in g.constants.values()) < 1 << 14:  # all inline: no side table needed
        assert sqk.parse_ir(g.to_text(inline_limit=None)) == g


# --- the example models ------------------------------------------------------------------

def test_transformer_block_kernels_and_outputs():
    g = transformer_block()
    check(g, {"x": rand((4, 768))}, rtol=1e-4)  # unfused, the default pipeline
    gf, m = run_fused(g, {"x": rand((4, 768))}, rtol=1e-4)
    # the projections with bias (two with the residual), the MLP's first matmul
    # with bias and gelu, and attention (q.k^T, scale, mask, softmax, @v) as one kernel
    assert kernels(g) == 30 and kernels(gf) == 17
    assert steps(gf) == 13  # its 4 reshapes are views
    assert [n.attrs["body"].name for n in fused_nodes(gf)] == [
        "matmul_add", "matmul_add", "matmul_add", "matmul_mul_add_softmax_matmul", "matmul_add_add",
        "matmul_add_gelu", "matmul_add_add"]
    assert [n.op for n in gf.nodes if n.op in ("softmax", "layernorm")] == ["layernorm", "layernorm"]
    # without the attention pattern, softmax stays a kernel of its own
    gf2 = fuse(g, "fuse{attention=false}")
    assert kernels(gf2) == 19 and "matmul_mul_add" in [n.attrs["body"].name for n in fused_nodes(gf2)]
    # the memory bound: the arena holds at most half of all intermediates
    assert m.manifest["arena_bytes"] <= m.manifest["intermediate_bytes"] // 2


def test_transformer_block_gemm_path_riscv64():
    """Five tokens take the GEMM path of the projections (M > STREAM_MAX_M)."""
    g = transformer_block(hidden=96, heads=4, ffn=192, tokens=5, seed=1)
    run_fused(g, {"x": rand((5, 96))}, "riscv64", rtol=1e-4)


def test_transformer_block_gemm_path_host():
    g = transformer_block(hidden=96, heads=4, ffn=192, tokens=9, seed=2)
    run_fused(g, {"x": rand((9, 96))}, rtol=1e-4)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_small_cnn(target):
    g = small_cnn(channels=(8, 12), image=12) if target != "host" else small_cnn()
    shape = g.inputs[0].shape
    gf, _ = run_fused(g, {"image": rand(shape)}, target, kinds=["conv2d", "conv2d", "matmul"])
    assert kernels(g) == 11 and kernels(gf) == 8


# --- elementwise maps ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 5, 17)])
def test_elementwise_tree_with_broadcast(dtype, shape):
    """gelu(x * s + bias) - sigmoid(y): a tree over broadcast inputs in one map."""
    b = GraphBuilder("tree")
    x, y = b.input("x", shape, dtype), b.input("y", shape, dtype)
    s = b.input("s", (), dtype)
    bias = b.const(rand(shape[-1:], dtype), name="bias")
    g = b.output(b.sub(b.gelu(b.add(b.mul(x, s), bias), approximate="tanh"), b.sigmoid(y)))
    gf, _ = run_fused(g, {"x": rand(shape, dtype), "y": rand(shape, dtype), "s": rand((), dtype)}, kinds=["map"])
    assert kernels(gf) == 1


def test_diamond_and_casts():
    """A value read twice inside the group; casts to f16 and back round where the unfused graph does."""
    b = GraphBuilder("diamond")
    x = b.input("x", (4, 33))
    t = b.exp(b.cast(b.cast(x, to="f16"), to="f32"))
    g = b.output(b.cast(b.add(b.neg(t), b.mul(t, t)), to="i32"))
    gf, _ = run_fused(g, {"x": rand((4, 33), low=-2, high=2)}, kinds=["map"])
    assert kernels(gf) == 1


def test_int_map():
    b = GraphBuilder("ints")
    x, y = b.input("x", (5, 9), "i32"), b.input("y", (9,), "i32")
    g = b.output(b.relu(b.sub(b.max(x, y), b.mul(x, y))))
    run_fused(g, {"x": rand((5, 9), "i32"), "y": rand((9,), "i32")}, kinds=["map"])


def test_shared_and_output_values_stay():
    """A value read outside the group, or returned, is not swallowed by it."""
    b = GraphBuilder("shared")
    x = b.input("x", (6, 8))
    t = b.exp(x)
    u = b.neg(x)
    g = b.output(b.add(t, u), b.softmax(t), u)
    gf, _ = run_fused(g, {"x": rand((6, 8))}, kinds=[])
    assert kernels(gf) == kernels(g)


def test_broadcast_intermediate_is_not_fused():
    """exp(v) of a smaller shape than the sum would be recomputed per element: it stays apart."""
    b = GraphBuilder("bcast")
    x, v = b.input("x", (4, 8)), b.input("v", (8,))
    g = b.output(b.tanh(b.add(x, b.exp(v))))
    gf, _ = run_fused(g, {"x": rand((4, 8)), "v": rand((8,))}, kinds=["map"])
    assert [n.op for n in gf.nodes] == ["exp", "fused"]


# --- matmul epilogues ----------------------------------------------------------------------

def mlp_layer(m, k, n, dtype="f32", batch=(), residual=True, act="relu"):
    b = GraphBuilder("layer")
    x = b.input("x", batch + (m, k), dtype)
    w = b.const(rand((k, n), dtype, np.random.default_rng(1)) / np.float32(np.sqrt(k)), dtype, name="w")
    bias = b.const(rand((n,), dtype, np.random.default_rng(2)), dtype, name="bias")
    y = getattr(b, act)(b.add(b.matmul(x, w), bias))
    if residual:
        y = b.add(y, b.input("r", batch + (m, n), dtype))
    g = b.output(y)
    inputs = {"x": rand(batch + (m, k), dtype)}
    if residual:
        inputs["r"] = rand(batch + (m, n), dtype)
    return g, inputs


@pytest.mark.parametrize("mkn", [(1, 7, 5), (3, 40, 70), (13, 31, 37), (64, 64, 64), (9, 2 * GEMM_KC + 3, 21)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matmul_bias_act_residual(mkn):
    """GEMV (M <= 4) and GEMM paths, tails in M and N, several K blocks (the
    epilogue only on the last one)."""
    g, inputs = mlp_layer(*mkn)
    gf, _ = run_fused(g, inputs, kinds=["matmul"], rtol=1e-4)
    assert kernels(gf) == 1 and fused_nodes(gf)[0].attrs["body"].name == "matmul_add_relu_add"


@pytest.mark.parametrize("mkn", [(2, 19, 33), (11, 20, 45)])
def test_matmul_epilogue_f16(mkn):
    g, inputs = mlp_layer(*mkn, dtype="f16", act="gelu")
    run_fused(g, inputs, kinds=["matmul"])


def test_matmul_epilogue_folded_batch():
    """[2, 3, 5, 6] @ [6, 7]: the batch is folded into rows; the residual steps linearly over them."""
    g, inputs = mlp_layer(5, 6, 7, batch=(2, 3))
    run_fused(g, inputs, kinds=["matmul"])


def test_matmul_epilogue_rejects_nonlinear_rows():
    """A residual broadcast over the first batch dim does not step by one stride
    over the folded rows: the add stays out of the matmul's kernel."""
    b = GraphBuilder("nonlinear")
    x, r = b.input("x", (2, 3, 5, 6)), b.input("r", (1, 3, 5, 7))
    y = b.add(b.matmul(x, b.const(rand((6, 7)), name="w")), r)
    g = b.output(y)
    gf, _ = run_fused(g, {"x": rand((2, 3, 5, 6)), "r": rand((1, 3, 5, 7))}, kinds=[])
    assert [n.op for n in gf.nodes if n.op != "const"] == ["matmul", "add"]


@pytest.mark.parametrize("target", ["host", "riscv64-scalar"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 9, 11), (1, 1, 4, 9), (1, 17, 3, 6)], ids=["4d", "1x1", "t17"])
def test_attention(target, shape):
    """softmax(q @ kt) @ v as one kernel: odd sizes, T and E tails of the vector width."""
    batch, (m, d, t, e) = shape[:-4], shape[-4:]
    b = GraphBuilder("attention")
    q, kt, v = b.input("q", batch + (m, d)), b.input("kt", batch + (d, t)), b.input("v", batch + (t, e))
    g = b.output(b.matmul(b.softmax(b.matmul(q, kt)), v))
    run_fused(g, {"q": rand(batch + (m, d)), "kt": rand(batch + (d, t)), "v": rand(batch + (t, e))}, target,
              kinds=["attention"], rtol=1e-4)


def test_attention_limits():
    """Long sequences, f16 and softmax over another axis keep the separate kernels."""
    from sqk.codegen.fused import ATTENTION_MAX_T

    for t, dtype, axis in ((ATTENTION_MAX_T + 1, "f32", -1), (8, "f16", -1), (8, "f32", -2)):
        b = GraphBuilder("attention")
        q, kt, v = b.input("q", (2, 8, 4), dtype), b.input("kt", (2, 4, t), dtype), b.input("v", (2, t, 3), dtype)
        g = b.output(b.matmul(b.softmax(b.matmul(q, kt), axis=axis), v))
        assert [n.op for n in fuse(g).nodes] == ["matmul", "softmax", "matmul"]


@pytest.mark.parametrize("tokens", [4, 7])
def test_attention_scores(tokens):
    """q @ k^T per head (batched, not folded), scaled, plus a causal mask broadcast over heads;
    a per-row term [T, 1] reads with a column stride of 0."""
    b = GraphBuilder("scores")
    q, kt = b.input("q", (3, tokens, 16)), b.input("kt", (3, 16, tokens))
    mask = b.const(np.triu(np.full((tokens, tokens), -1e9, np.float32), 1), name="mask")
    row = b.input("row", (tokens, 1))
    g = b.output(b.add(b.add(b.mul(b.matmul(q, kt), b.const(np.float32(0.25), name="scale")), mask), row))
    run_fused(g, {"q": rand((3, tokens, 16)), "kt": rand((3, 16, tokens)), "row": rand((tokens, 1))},
              kinds=["matmul"])


def test_options():
    g, inputs = mlp_layer(3, 8, 9)
    b = GraphBuilder("maps")
    g2 = b.output(b.relu(b.neg(b.input("x", (2, 3)))))
    assert not fused_nodes(fuse(g, "fuse{epilogues=false,elementwise=false}"))
    # without epilogues the elementwise tail fuses on its own
    assert [body_kind(n.attrs["body"]) for n in fused_nodes(fuse(g, "fuse{epilogues=false}"))] == ["map"]
    assert not fused_nodes(fuse(g2, "fuse{elementwise=false}"))
    assert [body_kind(n.attrs["body"]) for n in fused_nodes(fuse(g, "fuse{elementwise=false}"))] == ["matmul"]


# --- conv2d epilogues ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_conv_relu(dtype):
    b = GraphBuilder("conv")
    x = b.input("x", (1, 3, 9, 11), dtype)
    w = b.const(rand((5, 3, 3, 3), dtype), name="w")
    g = b.output(b.silu(b.relu(b.conv2d(x, w, pads=(1, 1, 1, 1)))))
    run_fused(g, {"x": rand((1, 3, 9, 11), dtype)}, kinds=["conv2d"])


def test_conv_residual_stays_apart():
    """conv2d epilogues take unary ops only: the residual add is a kernel of its own."""
    b = GraphBuilder("conv_res")
    x = b.input("x", (1, 4, 6, 6))
    y = b.conv2d(x, b.const(rand((4, 4, 1, 1)), name="w"))
    g = b.output(b.add(y, x))
    gf, _ = run_fused(g, {"x": rand((1, 4, 6, 6))}, kinds=[])
    assert [n.op for n in gf.nodes if n.op != "const"] == ["conv2d", "add"]


# --- the fused op's IR -------------------------------------------------------------------

def _fused_text():
    b = GraphBuilder("m")
    x = b.input("x", (2, 3))
    g = b.output(b.relu(b.add(x, b.const(rand((3,)), name="bias"))))
    return fuse(g).to_text()


def test_text_form():
    s = _fused_text()
    assert ("  %1 = fused(%x, %bias) {body=graph @add_relu(%x: f32[2,3], %bias: f32[3]) -> f32[2,3] {\n"
            "    %0 = add(%x, %bias) : f32[2,3]\n"
            "    %1 = relu(%0) : f32[2,3]\n"
            "    return %1\n"
            "  }} : f32[2,3]\n") in s, s
    roundtrip(sqk.parse_ir(s))


@pytest.mark.parametrize("edit,line,col,msg", [
    # the region ends early: no return
    (lambda s: s.replace("    return %1\n", ""), 6, 3, "expected value"),
    # a body sees only its own values
    (lambda s: s.replace("add(%x, %bias)", "add(%x, %y)"), 4, 18, "undefined value %y"),
    # the return does not match the region's signature
    (lambda s: s.replace("-> f32[2,3] {\n    %0", "-> f32[3,2] {\n    %0"), 3, 31, "return types"),
    # an ill-typed body points at its header
    (lambda s: s.replace("%bias: f32[3]) ->", "%bias: f32[4]) ->"), 3, 31, "do not broadcast"),
    # a region that does not close
    (lambda s: s.replace("  }} : f32[2,3]", "  } : f32[2,3]"), 7, 5, "expected ',' or '}'"),
])
def test_malformed_region(edit, line, col, msg):
    s = edit(_fused_text())
    with pytest.raises(ParseError) as e:
        sqk.parse_ir(s)
    assert (e.value.line, e.value.col) == (line, col) and msg in str(e.value), (str(e.value), s)


def test_fused_arity_and_constants_are_checked():
    b = GraphBuilder("body")
    body = b.output(b.neg(b.input("a", (2,))))
    g = GraphBuilder("outer")
    with pytest.raises(IRError, match="1 inputs"):
        g.fused(g.input("x", (2,)), g.input("y", (2,)), body=body)
    with pytest.raises(IRError, match="f32\\[3\\]"):
        g.fused(g.input("z", (3,)), body=body)
    b = GraphBuilder("withconst")
    body = b.output(b.add(b.input("a", (2,)), b.const(np.ones(2, np.float32))))
    with pytest.raises(IRError, match="constant"):
        GraphBuilder().fused(GraphBuilder().input("x", (2,)), body=body)


def test_reference_of_fused_is_its_body():
    g, inputs = mlp_layer(3, 8, 9)
    gf = fuse(g)
    np.testing.assert_array_equal(sqk.reference(gf, **inputs), sqk.reference(g, **inputs))


def test_unfusable_body_is_refused_by_codegen():
    """A body the emitter cannot make (softmax inside) fails to compile with a clear message."""
    b = GraphBuilder("body")
    body = b.output(b.softmax(b.exp(b.input("a", (2, 3)))))
    g = GraphBuilder("outer")
    out = g.output(g.fused(g.input("x", (2, 3)), body=body))
    with pytest.raises(NotImplementedError, match="exp, softmax"):
        sqk.compile(out)


# --- memory planning: in-place maps -------------------------------------------------------

@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_in_place_chain(target):
    """Unfused maps write over their dying input: the whole chain needs one arena slot."""
    b = GraphBuilder("chain")
    x, y = b.input("x", (64, 1000)), b.input("y", (1000,))
    t = b.tanh(b.add(b.exp(b.neg(x)), y))
    g = b.output(b.sigmoid(b.mul(t, t)))
    m = check(g, {"x": rand((64, 1000)), "y": rand((1000,))}, target, pipeline="fold_constants,dce")
    assert m.manifest["arena_bytes"] == 64 * 1000 * 4 and m.manifest["intermediate_bytes"] == 5 * 64 * 1000 * 4


def test_in_place_needs_same_shape_and_element_size():
    b = GraphBuilder("plan")
    x, big = b.input("x", (8,)), b.input("big", (4, 8))
    t = b.exp(x)
    u = b.neg(t)                       # same shape and size: takes t's slot
    w = b.add(big, u)                  # u is broadcast here: w gets a slot of its own
    c = b.cast(w, to="f16")            # narrower elements: a slot of its own
    g = b.output(b.neg(c))
    plan = plan_memory(g)
    assert plan.buffers[u] == plan.buffers[t]
    assert plan.buffers[w] != plan.buffers[u] and plan.buffers[c] != plan.buffers[w]
    assert plan_memory(g, in_place=False).buffers[u] != plan.buffers[t]


def _layers(sparse="dense", n=3, seed=0):
    """n identical-shape layers (matmul + bias + gelu, fused), each with its own weights."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("layers")
    x = b.input("x", (5, 64))
    for _ in range(n):
        w = rng.standard_normal((64, 64)).astype(np.float32) / 8
        if sparse != "dense":
            w[rng.random(w.shape) < 0.8] = 0
        x = b.gelu(b.add(b.matmul(x, b.const(w), sparse=sparse), b.const(rng.standard_normal(64).astype(np.float32))))
    return b.output(x)


@pytest.mark.parametrize("target", ["host", "riscv64"])
def test_identical_layers_share_one_kernel(target):
    """Layers of equal signature (codegen.lower.kernel_signature) are emitted once: the
    later steps call the first one's kernel; outputs still equal the reference."""
    import re

    g = _layers()
    _, m = run_fused(g, {"x": rand((5, 64))}, target, rtol=1e-4)
    bodies = re.findall(r'^define[^@\n]*@"?(k\d+_\w+)\.body"?\(', m.llvm_ir, re.M)
    assert len(bodies) == 1, bodies
    for later in ("k1_fused", "k2_fused"):
        fn = m.llvm_ir[re.search(rf'define i32 @"?{later}"?\(', m.llvm_ir).start():]
        assert re.match(r'[^{]*\{\s*entry:\s*%"?[\w.]+"? = call i32 @"?k0_fused"?\(', fn), fn[:300]


def test_sparse_layers_are_not_shared():
    """A sparse kernel is cut from its weight's nonzeros: equal shapes, other weights,
    other kernels (the signature hashes the values)."""
    import re

    g = _layers("csr")
    _, m = run_fused(g, {"x": rand((5, 64))}, rtol=1e-4)
    assert len(re.findall(r'^define[^@\n]*@"?k\d+_matmul\.body"?\(', m.llvm_ir, re.M)) == 3


def test_signature_renames_body_inputs_at_once():
    """Body inputs keep their outer names; one called "in0" must not meet the placeholder
    the first input is renamed to: (x - in0) + x and (x - in0) + in0 are other kernels."""
    from sqk.ir.text import node_signature

    b = GraphBuilder("g")
    x, y = b.input("x", (8,)), b.input("in0", (8,))
    g = b.output(b.add(b.sub(x, y), x), b.add(b.sub(x, y), y))
    inputs = {"x": np.arange(8, dtype=np.float32), "in0": np.full(8, 10, np.float32)}
    gf, m = run_fused(g, inputs)
    a, c = fused_nodes(gf)
    assert node_signature(a) != node_signature(c)
