"""LLM artifacts: a Decoder compiled ahead of time (``sqk compile MODEL -o model.sqk``),
loaded by ``sqk.llm.load("model.sqk")`` with the runtime only (numpy, cffi, tokenizers;
no llvmlite, no compiler, no weights read or converted).

A directory::

    llm.json          format "sqk-llm", version, target, the LlamaConfig, KV dtype,
                      prefill chunk, one entry per module (its chunk length, directory,
                      manifest content hash, constants file), the constants and
                      tokenizer files with their sha256, and the numerics of the
                      file's quantized weights (activations, act_group: what
                      Decoder.activations reports)
    decode/           the one-token step: an artifact (manifest.json, model.so or runner)
    prefill64/        the prefill chunk (Decoder.prefill pads a prompt's last piece to it)
    runner            riscv64: the runner of both modules with a generate mode
                      (runtime/runner_generate.c): ``./runner --generate --prompt-ids
                      1,2,3 -n 32 --consts constants.bin`` on a board, no Python
    constants.bin     the packed weights, stored once: the modules' manifests all name
                      content the same (they are compiled from one set of weights in one
                      layout); modules whose constants differ get constants-N.bin files
    tokenizer/        tokenizer.json, tokenizer_config.json (special tokens, chat
                      template), generation_config.json (BOS/EOS ids): Tokenizer.save

Written under a temporary name and renamed, so a failed compile leaves no partial
artifact; loading checks llm.json against every module and file (a module or
constants file from another compile, a missing tokenizer, another target) and
refuses with ``ArtifactError`` naming what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from ..runtime.module import ArtifactError, Module, manifest_hash, replace_dir, sha256_file
from .decoder import Decoder, LlamaConfig

LLM_FORMAT = 1
INDEX = "llm.json"


def is_llm_artifact(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), INDEX))


def chunk_lengths(prefill_chunk: int) -> list[int]:
    """The modules' token counts: 1 (the step) and the padded prefill chunk
    (Decoder.prefill) when it has 2 tokens or more."""
    return [1] + ([prefill_chunk] if prefill_chunk >= 2 else [])


def module_dir(tokens: int) -> str:
    return "decode" if tokens == 1 else f"prefill{tokens}"


def save_llm(dec: Decoder, path) -> None:
    """Write ``dec`` (compiled with its weights) as an LLM artifact at ``path``:
    every chunk module compiled first, the constants stored once."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not is_llm_artifact(path):
        raise FileExistsError(f"{path} exists and is not an sqk LLM artifact; not overwriting it")
    mods = decoder_modules(dec)
    parent = os.path.dirname(path) or "."
    tmp = tempfile.mkdtemp(prefix=".sqk-llm-", dir=parent)
    try:
        os.chmod(tmp, 0o755)   # mkdtemp's 0700 would stay the artifact's
        consts: list[dict] = []          # distinct constants files, by content
        entries = []
        for t, m in mods.items():
            c = m.manifest["constants"]
            idx = next((i for i, e in enumerate(consts) if e["sha256"] == c["sha256"]), None)
            if idx is None:
                idx = len(consts)
                name = "constants.bin" if idx == 0 else f"constants-{idx}.bin"
                shutil.copyfile(m._consts_path, os.path.join(tmp, name))
                consts.append({"file": name, "bytes": c["bytes"], "sha256": c["sha256"]})
            sub = os.path.join(tmp, module_dir(t))
            os.mkdir(sub)
            files = ["manifest.json", m.manifest["code"]["file"]] + (
                [m.manifest["report"]["file"]] if "report" in m.manifest else [])
            for f in files:
                shutil.copy2(os.path.join(m.path, f), os.path.join(sub, f))
            entries.append({"tokens": t, "dir": module_dir(t), "content_hash": m.manifest["content_hash"],
                            "constants": idx})
        tokenizer = None
        if dec.tokenizer is not None:
            d = dec.tokenizer.save(os.path.join(tmp, "tokenizer"))
            tokenizer = {"dir": "tokenizer",
                         "files": {f: sha256_file(os.path.join(d, f)) for f in sorted(os.listdir(d))}}
        generate = None
        if dec.module.target != "host":   # the runner that generates in one process (llm/native.py)
            from .native import generate_runner

            shutil.copyfile(generate_runner(dec), os.path.join(tmp, "runner"))
            os.chmod(os.path.join(tmp, "runner"), 0o755)
            generate = {"file": "runner", "sha256": sha256_file(os.path.join(tmp, "runner"))}
        from .. import __version__

        index = {"format": "sqk-llm", "format_version": LLM_FORMAT, "sqk_version": __version__,
                 "target": dec.module.target, "config": config_to_json(dec.cfg), "kv_dtype": dec.kv_dtype,
                 "prefill_chunk": dec.prefill_chunk, "modules": entries, "constants": consts,
                 "tokenizer": tokenizer, "generate": generate,
                 "activations": dec.activations, "act_group": dec.act_group}
        with open(os.path.join(tmp, INDEX), "w") as f:   # written last: its presence means complete
            json.dump(index, f, indent=1)
        replace_dir(tmp, path)   # an existing artifact ends up in tmp: removed below
    finally:
        if os.path.islink(tmp):  # path was a symlink, swapped out: the link goes, not its target
            os.unlink(tmp)
        elif os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def decoder_modules(dec: Decoder) -> dict:
    """{token count: Module} of ``dec``: the step and its prefill chunk (compiled now if need be)."""
    return {t: dec.module if t == 1 else dec.chunk_module(t) for t in chunk_lengths(dec.prefill_chunk)}


def config_to_json(cfg: LlamaConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(d: dict, where: str) -> LlamaConfig:
    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ArtifactError(f"{where}: unknown config fields {unknown} (written by a newer sqk?)")
    return LlamaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def read_index(path: str) -> dict:
    ipath = os.path.join(path, INDEX)
    try:
        with open(ipath) as f:
            index = json.load(f)
    except FileNotFoundError:
        if os.path.isfile(os.path.join(path, "manifest.json")):
            raise ArtifactError(f"{path} is an sqk artifact of a graph, not of an LLM (no {INDEX}): load it with "
                                "sqk.load") from None
        raise ArtifactError(f"{path}: no {INDEX} (not an LLM artifact, or a partial one)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{ipath}: corrupt ({e})") from None
    if not isinstance(index, dict) or index.get("format") != "sqk-llm":
        raise ArtifactError(f"{ipath}: not an sqk LLM artifact index")
    if index.get("format_version") != LLM_FORMAT:
        raise ArtifactError(f"{ipath}: LLM artifact format version {index.get('format_version')}, this sqk reads "
                            f"version {LLM_FORMAT}; recompile the model")
    try:
        names = []   # (directory, name): every file of the artifact
        for e in index["modules"]:
            int(e["tokens"]), e["content_hash"], index["constants"][e["constants"]]
            names.append((path, e["dir"]))
        for c in index["constants"]:
            int(c["bytes"]), c["sha256"]
            names.append((path, c["file"]))
        index["target"], index["config"], index["kv_dtype"], int(index["prefill_chunk"])
        tok = index.get("tokenizer")
        if tok is not None:
            names += [(path, tok["dir"])] + [(os.path.join(path, str(tok["dir"])), f) for f in tok["files"]]
        if index.get("generate") is not None:
            names.append((path, index["generate"]["file"]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ArtifactError(f"{ipath}: incomplete index ({e!r})") from None
    for where, name in names:   # each directly inside its directory, through any symlinks
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ArtifactError(f"{ipath}: {name!r} is not a file name inside the artifact")
        real = os.path.realpath(os.path.join(where, name))
        if os.path.exists(real) and os.path.dirname(real) != os.path.realpath(where):
            raise ArtifactError(f"{ipath}: {name} resolves to {real}, outside the artifact directory")
    return index


def load_llm(path, *, target: str | None = None, max_seq: int | None = None, kv_dtype: str | None = None,
             threads: int | None = None, verify: bool = True, **compile_options) -> Decoder:
    """The Decoder of the LLM artifact at ``path`` (module docstring).  ``target``,
    ``max_seq`` and ``kv_dtype`` were fixed when it was compiled: given, they must
    match; compile options cannot apply.  ``verify`` hashes every file once."""
    path = os.path.abspath(os.fspath(path))
    index = read_index(path)
    where = os.path.join(path, INDEX)
    cfg = config_from_json(index["config"], where)
    if compile_options:
        raise ArtifactError(f"{path} is compiled already: {', '.join(sorted(compile_options))} cannot apply "
                            "(recompile the model with them)")
    for name, given, have in (("target", target, index["target"]), ("max_seq", max_seq, cfg.max_seq),
                              ("kv_dtype", kv_dtype, index["kv_dtype"])):
        if given is not None and given != have:
            raise ArtifactError(f"{path} was compiled with {name}={have!r}, not {given!r}: recompile the model "
                                f"(sqk compile MODEL -o OUT --{name.replace('_', '-')} ...)")
    consts = []
    for c in index["constants"]:
        p = os.path.join(path, c["file"])
        if not os.path.isfile(p):
            raise ArtifactError(f"{path}: constants file {c['file']} is missing (partial artifact)")
        if os.path.getsize(p) != c["bytes"]:
            raise ArtifactError(f"{p}: {os.path.getsize(p)} bytes, {INDEX} says {c['bytes']} (truncated or replaced)")
        if verify and sha256_file(p) != c["sha256"]:
            raise ArtifactError(f"{p}: content hash does not match {INDEX} (corrupt or modified)")
        consts.append(p)
    modules = {}
    for e in index["modules"]:
        d = os.path.join(path, e["dir"])
        if not os.path.isfile(os.path.join(d, "manifest.json")):
            raise ArtifactError(f"{path}: module {e['dir']} is missing (partial artifact)")
        m = Module(d, verify=False, threads=threads, constants=consts[e["constants"]])   # hashed here, once
        if verify and manifest_hash(m.manifest) != m.manifest.get("content_hash"):
            raise ArtifactError(f"{d}: manifest.json does not match its content_hash (corrupt or modified)")
        if m.manifest.get("content_hash") != e["content_hash"]:
            raise ArtifactError(f"{d}: its manifest is not the one {INDEX} names (a module of another compile: "
                                "stale artifact); recompile the model")
        if m.manifest["constants"]["sha256"] != index["constants"][e["constants"]]["sha256"]:
            raise ArtifactError(f"{d}: its constants are not {index['constants'][e['constants']]['file']} "
                                "(stale artifact); recompile the model")
        code = os.path.join(d, m.manifest["code"]["file"])
        if verify and sha256_file(code) != m.manifest["code"]["sha256"]:
            raise ArtifactError(f"{code}: content hash does not match the manifest (corrupt or modified)")
        modules[int(e["tokens"])] = m
    want = set(chunk_lengths(int(index["prefill_chunk"])))
    if set(modules) != want:
        raise ArtifactError(f"{where}: modules for chunk lengths {sorted(modules)}, prefill needs {sorted(want)}")
    dec = Decoder.from_modules(cfg, modules, tokenizer=load_tokenizer(path, index, verify),
                               kv_dtype=index["kv_dtype"], prefill_chunk=int(index["prefill_chunk"]),
                               activations=index.get("activations", "none"), act_group=int(index.get("act_group", 0)))
    gen = index.get("generate")
    if gen is not None:
        p = os.path.join(path, gen["file"])
        if not os.path.isfile(p):
            raise ArtifactError(f"{path}: the generate runner {gen['file']} is missing (partial artifact)")
        if verify and sha256_file(p) != gen["sha256"]:
            raise ArtifactError(f"{p}: content hash does not match {INDEX} (corrupt or modified)")
        dec.generate_runner = p
    elif dec.target != "host":
        raise ArtifactError(f"{where}: a {dec.target} artifact without its generate runner (partial artifact)")
    return dec


def load_tokenizer(path: str, index: dict, verify: bool):
    entry = index.get("tokenizer")
    if entry is None:
        return None
    d = os.path.join(path, entry["dir"])
    for f, digest in entry["files"].items():
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            raise ArtifactError(f"{path}: tokenizer file {entry['dir']}/{f} is missing (partial artifact)")
        if verify and sha256_file(p) != digest:
            raise ArtifactError(f"{p}: content hash does not match {INDEX} (corrupt or modified)")
    from .tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(d)
