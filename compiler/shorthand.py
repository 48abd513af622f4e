"""The shorthands ``compile(quantize="int4", group=32, ...)`` and ``sqk compile
--quantize int4 --group 32``, generated from the passes' dataclass fields.

Three passes take options from users outside a pipeline string: sparsify,
quantize and select_format (``SHORTHANDS``, in pipeline order).  Every field
of theirs is a ``compile()`` keyword and a CLI flag: its public keyword is the
field name unless ``passes.option(keyword=...)`` renames it (quantize's
``method`` is ``quantize_method``); a keyword two passes share (``skip``,
``seed``, ``samples``, ``damp``) goes to each of them that runs.  The field a
pass's own keyword sets (``quantize=`` sets ``weights``, ``sparsify=`` sets
``pattern``) is its ``main`` field.  So a new option is one field (with
:func:`~sqk.compiler.passes.option` for its help text and choices) and appears
in the pipeline string, ``sqk.compile``, ``quantize_pipeline``,
``sparsify_pipeline``, ``sqk.llm.load`` and the command line at once.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

from .passes import PASSES
from .pipeline import PipelineError


class Shorthand(NamedTuple):
    pass_name: str
    main: str | None     # the field the pass's own keyword (``quantize=``) sets; None: no keyword of its own
    hint: str            # how the keyword is spelled in errors


SHORTHANDS = (Shorthand("sparsify", "pattern", 'sparsify="PATTERN"'),
              Shorthand("quantize", "weights", 'quantize="int8" or "int4"'),
              Shorthand("select_format", None, "select_format"))


def keyword(f: dataclasses.Field) -> str:
    """A pass field's ``compile()`` keyword."""
    return f.metadata.get("keyword") or f.name


def option_fields() -> dict[str, list[tuple[Shorthand, dataclasses.Field]]]:
    """{keyword: [(shorthand, field), ...]} for every option of the shorthand
    passes (their main fields excepted), in pipeline and field order."""
    out: dict = {}
    for sh in SHORTHANDS:
        for f in dataclasses.fields(PASSES[sh.pass_name]):
            if f.name != sh.main:
                out.setdefault(keyword(f), []).append((sh, f))
    return out


def _spell(name: str, pairs) -> str:
    """``name{k=v,...}``: lists joined with '|', a dict as "key:value" items."""
    opts = []
    for k, v in pairs:
        if isinstance(v, dict):
            v = [f"{a}:{b}" for a, b in v.items()]
        if not isinstance(v, str) and hasattr(v, "__iter__"):
            v = "|".join(map(str, v))
        o = f"{k}={v}"
        if any(c in o for c in ",{}"):
            raise PipelineError(f"{name} option {o!r} cannot contain ',', '{{' or '}}'")
        opts.append(o)
    return name + ("{" + ",".join(opts) + "}" if opts else "")


def shorthand_pipeline(quantize: str | None = None, sparsify: str | None = None, **options) -> str | None:
    """The pipeline string the shorthands mean:
    ``fold_constants,[sparsify{...},][quantize{...},]select_format{...},dce,fuse``,
    or None when nothing is given.  Options left None keep the passes'
    defaults; an option of a pass that does not run is an error."""
    known = option_fields()
    unknown = [k for k in options if k not in known]
    if unknown:
        raise TypeError(f"unexpected keyword argument{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                        f"pass options: {', '.join(known)}")
    if quantize is not None and not isinstance(quantize, str):
        raise PipelineError(f"quantize= must be \"int8\" or \"int4\", got {quantize!r}")
    if sparsify is not None and not isinstance(sparsify, str):
        raise PipelineError(f"sparsify= must be a pattern string (\"unstructured\", \"2:4\", \"block=4x4\"), "
                            f"got {sparsify!r}")
    given = {k: v for k, v in options.items() if v is not None}
    mains = {"quantize": quantize, "sparsify": sparsify}
    if quantize is None and sparsify is None and not any(sh.main is None for k in given for sh, _ in known[k]):
        stray(given, known, set())
        return None
    items, used = ["fold_constants"], set()
    for sh in SHORTHANDS:
        if sh.main is not None and mains[sh.pass_name] is None:
            continue
        pairs = [(sh.main, mains[sh.pass_name])] if sh.main else []
        for f in dataclasses.fields(PASSES[sh.pass_name]):
            if f.name != sh.main and keyword(f) in given:
                pairs.append((f.name, given[keyword(f)]))
                used.add(keyword(f))
        items.append(_spell(sh.pass_name, pairs))
    stray(given, known, used)
    return ",".join(items + ["dce", "fuse"])


def stray(given: dict, known: dict, used: set) -> None:
    """PipelineError for options given whose passes do not run."""
    left: dict[str, list[str]] = {}
    for k in given:
        if k not in used:
            left.setdefault(" or ".join(dict.fromkeys(sh.hint for sh, _ in known[k])), []).append(k)
    if left:
        raise PipelineError("; ".join(f"{', '.join(ks)}= only apply with {hint}" for hint, ks in left.items()))


def signature_parameters() -> list[inspect.Parameter]:
    """The generated keyword-only parameters of ``compile()`` (all default None)."""
    ann = {int: "int | None", float: "float | None", bool: "bool | None", str: "str | None"}
    out = []
    for k, owners in option_fields().items():
        ty = owners[0][1].type
        ty = {"int": int, "float": float, "bool": bool, "str": str}.get(ty, ty) if isinstance(ty, str) else ty
        out.append(inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=ann.get(ty, "object")))
    return out


def options_doc() -> str:
    """The generated options as a docstring paragraph."""
    lines = ["Pass options (generated from the passes' fields, ``compiler/shorthand.py``;",
             "each also a ``sqk compile`` flag):"]
    for k, owners in option_fields().items():
        f = owners[0][1]
        default = "inf" if isinstance(f.default, float) and math.isinf(f.default) else repr(f.default)
        where = ", ".join(f"{sh.pass_name}'s {g.name}" if g.name != k else sh.pass_name for sh, g in owners)
        text = _help(owners)
        lines.append(f"    ``{k}`` ({where}; default {default}){': ' + text if text else ''}")
    return "\n".join(lines)


def _help(owners) -> str:
    return next((f.metadata["help"] for _, f in owners if f.metadata.get("help")), "")


_DEST = "pass_option_"


def add_arguments(parser, skip=()) -> None:
    """``--quantize``, ``--sparsify`` and one flag per option (``dest`` the keyword);
    ``skip``: options left off (a command whose own flag has the name)."""
    for sh in SHORTHANDS:
        if sh.main is None:
            continue
        f = next(f for f in dataclasses.fields(PASSES[sh.pass_name]) if f.name == sh.main)
        parser.add_argument(f"--{sh.pass_name}", default=None, choices=f.metadata.get("choices"),
                            metavar=None if f.metadata.get("choices") else sh.main.upper(),
                            help=f.metadata.get("help") or f"the {sh.pass_name} pass's {sh.main}")
    for k, owners in option_fields().items():
        f = owners[0][1]
        flag = f.metadata.get("flag")
        if flag == "" or k in skip:
            continue
        flag = flag or "--" + k.replace("_", "-")
        ty = {"int": int, "float": float, "bool": bool, "str": str}.get(f.type, f.type) \
            if isinstance(f.type, str) else f.type
        text = _help(owners) or f"option {f.name} of {' and '.join(sh.pass_name for sh, _ in owners)}"
        dest = _DEST + k   # apart from the command's own arguments (--calibration FILE.npz)
        if ty is bool:
            parser.add_argument(flag, dest=dest, action="store_const", const=not f.default, default=None, help=text)
        elif f.metadata.get("repeat"):
            parser.add_argument(flag, dest=dest, action="append", default=None, metavar=k.upper(),
                                help=text + " (repeatable)")
        else:
            parser.add_argument(flag, dest=dest, type=ty, default=None, choices=f.metadata.get("choices"),
                                metavar=None if f.metadata.get("choices") else k.upper(), help=text)


def parsed_options(args) -> dict:
    """The shorthand keywords given on the command line (parsed by :func:`add_arguments`)."""
    out = {k: getattr(args, k) for k in ("quantize", "sparsify")}
    for k, owners in option_fields().items():
        if owners[0][1].metadata.get("flag") != "":
            out[k] = getattr(args, _DEST + k, None)
    return {k: v for k, v in out.items() if v is not None}
