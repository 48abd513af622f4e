"""The ``fuse`` pass: groups of nodes become one ``fused`` node (one kernel),
so their intermediates never go through memory.

    fuse{epilogues=true, elementwise=true, attention=true}

- ``elementwise``: a tree of elementwise ops (unary, binary with
  broadcasting, gelu, cast) whose intermediates each have one consumer, in
  the group, and the group's output shape, becomes one map kernel.
- ``epilogues``: a matmul (dense f32/f16) or conv2d whose result feeds only
  such a tree becomes one kernel that applies the tree to each output tile
  before storing it: bias add, activation, residual add, attention scale and
  mask ...  (conv2d takes unary activations only.)
- ``attention``: matmul -> elementwise (scale, mask) -> softmax over the last
  axis -> matmul, in f32 with a short key axis (ir.fusion.ATTENTION_MAX_T),
  becomes one kernel: per query row, scores, softmax and the weighted sum of v.

Otherwise softmax, layernorm and rmsnorm are single kernels already and stay
as they are.  Elementwise means an op of KIND "elementwise" (ir/ops.py).  A
group is fused only when ``ir.fusion.body_kind`` says it is a body the fused
op defines, all of which codegen emits: the pass reads the IR's definitions,
nothing of codegen.  Attention patterns are taken first, then groups are grown
greedily from the last node backwards.  The default pipeline ends with it
(``pipeline="fold_constants,dce"`` compiles without fusion).
"""
from __future__ import annotations

from ...ir.fusion import ANCHORS, body_kind, is_elementwise
from ...ir.graph import Graph, IRError, Node, Value
from . import Context, Pass, register


@register
class Fuse(Pass):
    """Fuse elementwise trees, matmul/conv2d epilogues and attention (see the module docstring)."""

    name = "fuse"
    epilogues: bool = True
    elementwise: bool = True
    attention: bool = True

    def run(self, graph: Graph, ctx: Context | None = None) -> Graph:
        prod = graph.producers()
        users = graph.users()
        outputs = set(graph.outputs)
        order = {n: i for i, n in enumerate(graph.nodes)}
        taken: set[Node] = set()
        fused_at: dict[Node, Node] = {}    # last node of a group -> its fused node

        def owned(v: Value, group) -> bool:
            """v is made by a node free to join ``group``, and read only inside it."""
            p = prod.get(v)
            return (p is not None and p not in taken and p not in group and v not in outputs
                    and len(p.outputs) == 1 and all(u in group for u in users[v]))

        def tree(group: list[Node], shape) -> list[Node]:
            """``group`` grown by the elementwise producers (of ``shape``) it owns."""
            frontier = [v for n in group for v in n.inputs]
            while frontier:  # a value is looked at again each time another of its readers joins
                v = frontier.pop()
                if owned(v, group) and is_elementwise(prod[v]) and v.shape == shape:
                    group.append(prod[v])
                    frontier.extend(prod[v].inputs)
            return group

        def with_anchor(group: list[Node], result: Value, tail=()):
            """The body of an anchor (matmul, conv2d) owned by ``group`` followed by
            ``group`` and ``tail``, with the nodes, when codegen takes it."""
            for v in _external_inputs(group):
                if owned(v, group + list(tail)) and prod[v].op in ANCHORS:
                    nodes = [prod[v]] + sorted(group, key=order.get) + list(tail)
                    body, outer = _body(nodes, result)
                    if body is not None and body_kind(body) in ANCHORS + ("attention",):
                        return body, outer, nodes
            return None

        def fuse(nodes, body, outer):
            taken.update(nodes)
            last = max(nodes, key=order.get)
            fused_at[last] = Node("fused", tuple(outer), last.outputs, {"body": body})

        # attention: matmul -> elementwise (scale, mask) -> softmax -> matmul, short sequences
        for n in graph.nodes if self.attention else ():
            if n.op != "matmul" or n in taken:
                continue
            sm = prod.get(n.inputs[0])
            if sm is None or sm.op != "softmax" or not owned(n.inputs[0], [n]):
                continue
            s = sm.inputs[0]
            if not owned(s, [sm, n]):
                continue
            if prod[s].op == "matmul":   # no elementwise step between the matmul and softmax
                found = with_anchor([sm, n], n.output)
            elif is_elementwise(prod[s]):
                found = with_anchor(tree([prod[s]], s.shape), n.output, (sm, n))
            else:
                found = None
            if found:
                fuse(found[2], found[0], found[1])

        for root in reversed(graph.nodes):
            if root in taken or not is_elementwise(root):
                continue
            group = tree([root], root.output.shape)
            found = with_anchor(group, root.output) if self.epilogues else None
            if found is None and self.elementwise and len(group) > 1:
                body, outer = _body(sorted(group, key=order.get), root.output)
                if body is not None and body_kind(body) == "map":
                    found = body, outer, group
            if found:
                fuse(found[2], found[0], found[1])

        nodes = []
        for n in graph.nodes:
            if n in fused_at:
                nodes.append(fused_at[n])
            elif n not in taken:
                nodes.append(n)
        return graph.with_nodes(nodes)


def _external_inputs(nodes) -> list[Value]:
    """Values read by ``nodes`` and made outside them, in order of first use."""
    made = {v for n in nodes for v in n.outputs}
    out: list[Value] = []
    for n in nodes:
        for v in n.inputs:
            if v not in made and v not in out:
                out.append(v)
    return out


def _body(nodes: list[Node], result: Value) -> tuple[Graph, list[Value]]:
    """The sub-graph of ``nodes`` (in order) returning ``result``, and the outer
    values bound to its inputs: those the nodes read from outside, in order of
    first use.  The body has fresh Values of the same names and types (a body
    is its own scope)."""
    from ...ir.verify import verify

    outer = _external_inputs(nodes)
    env = {v: Value(v.name, v.type) for v in outer}
    body_nodes = []
    for n in nodes:
        outs = tuple(Value(v.name, v.type) for v in n.outputs)
        env.update(zip(n.outputs, outs))
        body_nodes.append(Node(n.op, tuple(env[v] for v in n.inputs), outs, n.attrs))
    try:
        g = verify(Graph("_".join(n.op for n in nodes), [env[v] for v in outer], body_nodes, [env[result]]))
    except IRError:  # e.g. an input dtype a graph cannot take (i4): not a body
        return None, outer
    return g, outer
