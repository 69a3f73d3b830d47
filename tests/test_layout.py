"""The package layout (docs/architecture.md): no import cycles between our modules, the core imports no host
or UI toolkit, every concept that used to exist twice exists once."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lora_train")


def _modules():
    out = {}
    for dp, _dn, fn in os.walk(PKG):
        for f in fn:
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                m = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
                is_pkg = m.endswith(".__init__")
                out[m[:-9] if is_pkg else m] = (p, is_pkg)
    return out


def _imported(node, m, is_pkg, mods):
    """Our modules an import statement of module `m` names (empty for other packages' imports)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            pkg = (m if is_pkg else m.rsplit(".", 1)[0]).split(".")
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        elif node.module and node.module.split(".")[0] == "lora_train":
            base = node.module
        else:
            return set()
        return {base + "." + a.name if base + "." + a.name in mods else base for a in node.names}
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "lora_train"}
    return set()


def _top_level_imports(mods):
    """{module: {our modules it imports when it is imported}} (module-level statements only)."""
    graph = {}
    for m, (p, is_pkg) in mods.items():
        deps = set()
        for node in ast.parse(open(p, encoding="utf-8").read()).body:
            deps |= _imported(node, m, is_pkg, mods)
        # importing a.b.c imports a.b first
        deps |= {".".join(d.split(".")[:i]) for d in list(deps) for i in range(2, d.count(".") + 1)}
        graph[m] = {d for d in deps if d in mods and d != m and not m.startswith(d + ".")}
    return graph


def test_no_import_cycles():
    graph = _top_level_imports(_modules())
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == [], cycles


def test_core_never_imports_a_host_or_ui_toolkit_at_module_level():
    banned = ("gradio", "modules", "comfy", "folder_paths", "nodes", "backend", "networks")
    for m, (p, _pkg) in _modules().items():
        tree = ast.parse(open(p, encoding="utf-8").read())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n.split(".")[0] in banned]
            ok_here = m in ("lora_train.ui.tab", "lora_train.ui.compat") or m.startswith("lora_train.ui.sections.")  # the gradio tab
            assert not bad or (ok_here and bad == ["gradio"]), (m, bad)


def test_one_place_for_each_concept():
    """Definitions that used to exist two or three times (issue 15) exist once."""
    wanted = {"PRECISIONS": 1, "train_for_host": 1, "publish": 1, "free_name": 1, "scan_folder": 1,
              "class Diagnoser": 1, "DEFAULT_NAME": 1, "LR_BY_BATCH": 1, "learning_rate_for": 1,
              "resolve_precision": 1, "epoch_file": 1, "epoch_of": 1, "check_name": 1, "clean_name": 1,
              "fixed_noise_loss": 1, "publish_to_host": 1}
    found = {k: [] for k in wanted}
    for dp, _dn, fn in os.walk(ROOT):
        if any(part.startswith(".") for part in os.path.relpath(dp, ROOT).split(os.sep)) or "tests" in dp:
            continue
        for f in fn:
            if not f.endswith(".py"):
                continue
            text = open(os.path.join(dp, f), encoding="utf-8").read()
            for k in wanted:
                pat = k if k.startswith("class ") else None
                if pat and f"\n{pat}" in text:
                    found[k].append(f)
                elif not pat and (f"\ndef {k}(" in text or f"\n    def {k}(" in text or f"\n{k} = " in text
                                  or f"\n{k}: " in text):
                    found[k].append(f)
    assert {k: len(v) for k, v in found.items()} == wanted, found


def test_tab_sections_keep_distinct_names():
    """Each section keeps its components on the tab's shared namespace (`keep(c, {...})`): a name kept by two
    sections makes one section's events drive the other's component (the Auto section's grid once hid the Test grid)."""
    import glob
    import re

    seen = {}
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lora_train", "ui", "sections")
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for block in re.findall(r"keep\(c, \{(.*?)\}\)", text, re.S):
            for key in re.findall(r'"(\w+)":', block):
                assert key not in seen, f"{key!r} kept by {seen[key]} and {os.path.basename(path)}"
                seen[key] = os.path.basename(path)
    assert len(seen) > 20


def _all_imports(mods):
    """{module: {our modules it imports anywhere}}: module level and inside functions (a lazy import is still a
    dependency of the file)."""
    graph = {}
    for m, (p, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
            deps |= _imported(node, m, is_pkg, mods)
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def _cycles(graph):
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _folder(m):
    """lora_train.training.trainer -> training; lora_train.run -> run (a top-level file is its own unit)."""
    parts = m.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_circles_between_files_or_folders_counting_lazy_imports():
    graph = _all_imports(_modules())
    assert _cycles(graph) == [], "files that import each other (lazily too)"
    folders = {}
    for m, deps in graph.items():
        for d in deps:
            a, b = _folder(m), _folder(d)
            if a != b and "lora_train" not in (a, b):
                folders.setdefault(a, set()).add(b)
    bad = _cycles(folders)
    detail = {(a, b): sorted(m for m in graph if _folder(m) == a and any(_folder(d) == b for d in graph[m]))
              for comp in bad for a in comp for b in comp if b in folders.get(a, ())}
    assert bad == [], f"folders that import each other: {bad}; by file: {detail}"
    # the checker sees a circle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: model-family branches (a family's name compared, `kind == "sdxl"`) outside lora_train/families/, per file: what
#: is left to move into the families (issue: families as plugins). The count may only go down.
def _family_branch_pattern():
    from lora_train import families

    names = "|".join(re.escape(n) for n in families.NAMES)
    return re.compile(rf'(==|!=|\bin\b|not in) *\(?"({names})"|"({names})" *(==|!=)')


_FAMILY_BRANCH = _family_branch_pattern()


def test_no_family_name_branches_outside_families():
    """The trainer, networks, loaders, advisor, outputs and sampler ask `families.of(model)` / `families.get(kind)`
    what differs; no module outside lora_train/families/ compares a family's name."""
    pkg = os.path.join(ROOT, "lora_train")
    found = {}
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), pkg).replace(os.sep, "/")
            if rel.startswith("families/"):
                continue
            with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                hits = [line.strip() for line in fh if _FAMILY_BRANCH.search(line.split("#")[0])]
            if hits:
                found[rel] = hits
    assert not found, f"family-name branches outside lora_train/families/: {found}; ask lora_train.families instead"
    # and the issue's own check, literally: `grep -rn "kind ==" lora_train` finds nothing outside families/ (event,
    # widget and component kinds have names of their own)
    literal = re.compile(r"\bkind (==|!=|in \()")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), pkg).replace(os.sep, "/")
            if f.endswith(".py") and not rel.startswith("families/"):
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    assert not any(literal.search(line) for line in fh), rel
    # the check sees a branch when there is one, for every family
    assert _FAMILY_BRANCH.search('if m.kind == "sdxl":') and _FAMILY_BRANCH.search('kind in ("qwen_image", "x")')
    assert not _FAMILY_BRANCH.search("if families.of(m).flow:")
