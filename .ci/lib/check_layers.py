#!/usr/bin/env python3
"""Checks that the crate's modules import only downwards.

The layer table at the top of src/lib.rs is the input: each row names a
layer number and the top-level modules in it (as [`module`] or `module`).
The check fails when

- a module declared in lib.rs is missing from the table, or the table names
  one that lib.rs does not declare;
- a module refers (`use crate::x`, or a `crate::x::...` path anywhere in its
  code) to a module of a higher layer;
- the top-level modules import each other in a cycle (within a layer too);
- inside a directory module, at any depth, sibling submodules import each
  other in a cycle (`super::x` or `crate::<dir>::x`; the directory's own
  mod.rs is exempt, it is the parent that re-exports; so are inline
  `#[cfg(test)] mod tests` blocks, which may share test scaffolding).

Comments and string literals are ignored. `python3 check_layers.py --self-test`
proves the check fails on an upward import and on a cycle before trusting it.

Usage: check_layers.py [SRC_DIR]   (default: src next to this repo's root)
"""

import os
import re
import shutil
import sys
import tempfile

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Source without comments, string and char literals (so doc text and
    messages that mention `crate::x` do not count as imports)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            i = n if end < 0 else end + 1 + len(hashes)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", text[i:]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_unit_tests(code):
    """`code` (already stripped) minus its `#[cfg(test)] mod x { ... }`
    blocks: a module's unit tests may use its siblings' test scaffolding
    without that being a dependency of the module itself."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+" + IDENT + r"\s*\{", code):
        if m.start() < i:
            continue
        out.append(code[i : m.start()])
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        i = j
    out.append(code[i:])
    return "".join(out)


def use_trees(code, root):
    """The first path segment of every item of `use <root>::...;` trees."""
    names = []
    for m in re.finditer(r"\buse\s+" + root + r"::", code):
        i = m.end()
        if i < len(code) and code[i] == "{":
            depth, j = 0, i
            while j < len(code):
                if code[j] == "{":
                    depth += 1
                elif code[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            for item in split_top(code[i + 1 : j]):
                first = re.match(IDENT, item.strip())
                if first:
                    names.append(first.group(0))
        else:
            first = re.match(IDENT, code[i:])
            if first:
                names.append(first.group(0))
    return names


def split_top(body):
    """`body`'s comma-separated items at brace depth 0."""
    depth, cur, items = 0, "", []
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 and ch == ",":
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i for i in items if i.strip()]


def expand(tree):
    """A use tree (`a::{b::C, d}`) as its paths: [["a", "b", "C"], ["a", "d"]]."""
    tree = tree.strip()
    if "{" not in tree:
        segs = [x.strip() for x in tree.split(" as ")[0].split("::") if x.strip()]
        return [segs] if segs else []
    i = tree.index("{")
    prefix = [x.strip() for x in tree[:i].split("::") if x.strip()]
    body = tree[i + 1 : tree.rindex("}")]
    return [prefix + p for item in split_top(body) for p in expand(item)]


def crate_use_paths(code):
    """Every path of every `use crate::...;` tree, expanded: a sibling named
    deep inside a nested tree (`use crate::{obs::{audit::Fields}}`) counts."""
    paths = []
    for m in re.finditer(r"\buse\s+crate::", code):
        end = code.find(";", m.end())
        if end != -1:
            paths.extend(expand(code[m.end() : end]))
    return paths


def crate_refs(code):
    """Top-level modules a file refers to through `crate::`."""
    refs = set(use_trees(code, "crate"))
    refs.update(re.findall(r"\bcrate::(" + IDENT + ")", code))
    return refs


def read_table(lib_rs):
    """{module: layer} from the doc table, and the modules lib.rs declares."""
    text = open(lib_rs, encoding="utf-8").read()
    layers = {}
    for line in text.splitlines():
        m = re.match(r"^//!\s*\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        layer = int(m.group(1))
        for name in re.findall(r"`(" + IDENT + ")`", m.group(2)):
            if name in layers:
                raise SystemExit(f"lib.rs: `{name}` is in the layer table twice")
            layers[name] = layer
    declared = set(re.findall(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+(" + IDENT + r")\s*;", strip_code(text), re.M))
    return layers, declared


def module_files(src):
    """{top-level module: [files]} (src/x.rs, src/x/**/*.rs; not lib.rs,
    main.rs or src/bin)."""
    files = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            files.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path) and entry != "bin":
            for dirpath, _, names in os.walk(path):
                for f in sorted(names):
                    if f.endswith(".rs"):
                        files.setdefault(entry, []).append(os.path.join(dirpath, f))
    return files


def find_cycle(graph):
    """One cycle as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def submodule_graph(src, rel, paths):
    """Sibling imports inside directory module `rel` ("domain",
    "domain/tokens"): {child: {child}}, from the files under it."""
    base = os.path.join(src, rel)
    modpath = rel.replace(os.sep, "::")
    children = {}
    for path in paths:
        sub = os.path.relpath(path, base)
        if sub.startswith("..") or sub == "mod.rs" or not sub.endswith(".rs"):
            continue
        children.setdefault(sub.split(os.sep)[0].removesuffix(".rs"), []).append(path)
    graph = {}
    for child, files in children.items():
        refs = set()
        for path in files:
            code = without_unit_tests(strip_code(open(path, encoding="utf-8").read()))
            # `super::x` names a sibling from a direct child: a/b.rs or a/b/mod.rs.
            sub = os.path.relpath(path, base)
            if os.path.dirname(sub) == "" or sub == os.path.join(child, "mod.rs"):
                refs.update(use_trees(code, "super"))
                refs.update(re.findall(r"\bsuper::(" + IDENT + ")", code))
            refs.update(re.findall(r"\bcrate::" + modpath + "::(" + IDENT + ")", code))
            segs = modpath.split("::")
            for p in crate_use_paths(code):
                if p[: len(segs)] == segs and len(p) > len(segs):
                    refs.add(p[len(segs)])
        graph[child] = {r for r in refs if r in children and r != child}
    return graph


def directory_modules(src, top):
    """`top` and every directory module under it, as paths relative to src."""
    found = []
    for dirpath, _, _ in os.walk(os.path.join(src, top)):
        found.append(os.path.relpath(dirpath, src))
    return sorted(found)


def check(src):
    problems = []
    layers, declared = read_table(os.path.join(src, "lib.rs"))
    for name in sorted(declared - layers.keys()):
        problems.append(f"src/lib.rs declares `{name}`, which the layer table does not place")
    for name in sorted(layers.keys() - declared):
        problems.append(f"the layer table names `{name}`, which src/lib.rs does not declare")
    files = module_files(src)
    graph = {}
    for top, paths in files.items():
        if top not in declared:
            continue
        edges = set()
        for path in paths:
            code = strip_code(open(path, encoding="utf-8").read())
            for ref in crate_refs(code):
                if ref == top or ref not in layers or top not in layers:
                    continue
                edges.add(ref)
                if layers[ref] > layers[top]:
                    problems.append(
                        f"{os.path.relpath(path, os.path.dirname(src))}: `{top}` (layer {layers[top]}) "
                        f"imports `{ref}` (layer {layers[ref]}), a layer above it"
                    )
        graph[top] = edges
        if os.path.isdir(os.path.join(src, top)):
            for rel in directory_modules(src, top):
                cycle = find_cycle(submodule_graph(src, rel, paths))
                if cycle:
                    name = rel.replace(os.sep, "::")
                    problems.append(f"import cycle inside `{name}`: " + " -> ".join(cycle))
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle between modules: " + " -> ".join(cycle))
    return problems, graph, layers


def self_test(src):
    """The check must fail on an upward import and on a cycle."""
    layers, _ = read_table(os.path.join(src, "lib.rs"))
    low = min(layers, key=layers.get)
    high = max(layers, key=layers.get)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(src, copy)
        target = module_files(copy)[low][0]
        with open(target, "a", encoding="utf-8") as f:
            f.write(f"\n#[allow(unused_imports)]\nuse crate::{high} as _upward;\n")
        problems, _, _ = check(copy)
        if not any("a layer above it" in p for p in problems):
            return f"an upward import ({low} -> {high}) went unnoticed"
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(src, copy)
        # Two modules of one layer importing each other.
        by_layer = {}
        for name, layer in layers.items():
            by_layer.setdefault(layer, []).append(name)
        pair = next((sorted(v)[:2] for v in by_layer.values() if len(v) > 1), None)
        if pair is None:
            return None
        files = module_files(copy)
        for a, b in (pair, pair[::-1]):
            with open(files[a][0], "a", encoding="utf-8") as f:
                f.write(f"\nfn _cycle() {{ let _ = crate::{b}::X; }}\n")
        problems, _, _ = check(copy)
        if not any("cycle" in p for p in problems):
            return f"a cycle ({pair[0]} <-> {pair[1]}) went unnoticed"
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(src, copy)
        # Two siblings of the deepest directory module importing each other.
        nested = []
        for top, paths in module_files(copy).items():
            if os.path.isdir(os.path.join(copy, top)):
                for rel in directory_modules(copy, top):
                    kids = sorted(
                        f for f in os.listdir(os.path.join(copy, rel))
                        if f.endswith(".rs") and f != "mod.rs"
                    )
                    if len(kids) > 1:
                        nested.append((rel.count(os.sep), rel, kids[:2]))
        if not nested:
            return None
        _, rel, (a, b) = max(nested)
        for x, y in ((a, b), (b, a)):
            with open(os.path.join(copy, rel, x), "a", encoding="utf-8") as f:
                f.write(f"\nfn _cycle() {{ let _ = super::{y[:-3]}::X; }}\n")
        problems, _, _ = check(copy)
        if not any(f"inside `{rel.replace(os.sep, '::')}`" in p for p in problems):
            return f"a cycle inside {rel} ({a} <-> {b}) went unnoticed"
        # The same cycle, one edge written as a nested `crate::{...}` tree.
        shutil.rmtree(copy)
        shutil.copytree(src, copy)
        modpath = rel.replace(os.sep, "::")
        head, _, last = modpath.rpartition("::")
        nested_use = f"{head}::{{{last}::{{{b[:-3]}::X}}}}" if head else f"{{{last}::{{{b[:-3]}::X}}}}"
        with open(os.path.join(copy, rel, a), "a", encoding="utf-8") as f:
            f.write(f"\n#[allow(unused_imports)]\nuse crate::{{clock, {nested_use}}};\n")
        with open(os.path.join(copy, rel, b), "a", encoding="utf-8") as f:
            f.write(f"\nfn _cycle() {{ let _ = super::{a[:-3]}::X; }}\n")
        problems, _, _ = check(copy)
        if not any(f"inside `{modpath}`" in p for p in problems):
            return f"a cycle inside {rel} through a nested use tree ({a} <-> {b}) went unnoticed"
    return None


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    src = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "..", "src")
    src = os.path.normpath(src)
    if "--self-test" in argv:
        failure = self_test(src)
        if failure:
            print(f"check_layers self-test FAILED: {failure}", file=sys.stderr)
            return 1
        print("check_layers self-test: an upward import, a cycle and a nested sibling cycle are all caught")
    problems, graph, layers = check(src)
    if "--graph" in argv:
        for top in sorted(graph, key=lambda t: (-layers.get(t, -1), t)):
            print(f"{layers.get(top)} {top} -> {' '.join(sorted(graph[top]))}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    print(f"layers: {len(graph)} modules, no upward import, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
