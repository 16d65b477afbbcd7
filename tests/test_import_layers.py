"""The package's imports point down (STYLE.md; issue 23).

Reads the sources of `hysac_jax/` with `ast`, function-local imports
included, and runs nothing of the package. `LAYERS` is the README's map
("Where things live"): a module imports from its own layer or the layers
below, never above, and no two modules import each other, however
indirectly.
"""

import ast
import pathlib

import pytest

PACKAGE = "hysac_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a format module may import: the formats, the models, geometry,
# bounds, image normalisation and generic IO (Orbax's one-line errors
# included); nothing of serving, training, evaluation or the CLIs.
FORMATS = f"{PACKAGE}.formats"
FORMATS_MAY_IMPORT = (FORMATS, f"{PACKAGE}.models", f"{PACKAGE}.lorentz",
                      f"{PACKAGE}.safety", f"{PACKAGE}.data.preprocess",
                      f"{PACKAGE}.finite", f"{PACKAGE}.outdir",
                      f"{PACKAGE}.input_file", f"{PACKAGE}.orbax_errors")
# The layers, bottom first: (name, the modules in it, by prefix; the longest
# prefix that matches places a module). The README's "Where things live"
# draws the same map.
LAYERS = (
    ("primitives", ("lorentz", "finite", "outdir", "input_file", "cli",
                    "run_log", "run_lock", "compilation_cache",
                    "distributed", "orbax_errors")),
    ("models", ("models",)),
    ("metrics, losses, safety, data",
     ("evaluation", "losses", "safety", "data")),
    ("formats", ("formats",)),
    ("the schema, the model from a config, the run's store",
     ("config", "pretrained", "checkpoint")),
    ("serving, training, evaluation tasks",
     ("serving", "training", "evaluation.embed", "evaluate_run",
      "evaluate_tasks")),
    ("tools", ("convert", "export", "predict", "index", "openclip_import",
               "release_format")),
    ("the package and its demo", ("", "demo")),
)


def package_sources(root=ROOT):
  """{module name: (source text, is a package)} of every file in the package."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    is_pkg = parts[-1] == "__init__"
    name = ".".join(parts[:-1] if is_pkg else parts)
    out[name] = (path.read_text(encoding="utf-8"), is_pkg)
  return out


def _private(name):
  return name.startswith("_") and not name.startswith("__")


def _within(name, prefixes):
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _owner(name, known):
  """The longest module in `known` that `name` is or lies inside, or None."""
  while name:
    if name in known:
      return name
    name = name.rpartition(".")[0]
  return None


def _base(module, is_pkg, node):
  """The absolute module an `ImportFrom` node names."""
  if not node.level:
    return node.module or ""
  parts = module.split(".")
  if not is_pkg:
    parts = parts[:-1]
  parts = parts[:len(parts) - (node.level - 1)]
  return ".".join(parts + ([node.module] if node.module else []))


def import_graph(sources):
  """The package's imports, wherever they sit (function bodies included).

  Args:
    sources: {module name: (source text, is a package)}.

  Returns:
    `(edges, private)`: edges is {module: {imported module: set of names}}
    (no self edges); private lists `(module, imported module, name)` for
    every private name taken from another module, by `from … import _x` or
    as `alias._x` of an imported module.
  """
  known = set(sources)
  edges = {m: {} for m in sources}
  private = []
  for module, (text, is_pkg) in sources.items():
    aliases = {}  # local name -> package module it is bound to

    def add(target, name, module=module):
      if target and target != module:
        edges[module].setdefault(target, set()).add(name)

    tree = ast.parse(text)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          target = _owner(a.name, known)
          add(target, a.name)
          if target and a.asname:
            aliases[a.asname] = target
      elif isinstance(node, ast.ImportFrom):
        base = _base(module, is_pkg, node)
        for a in node.names:
          sub = f"{base}.{a.name}"
          if sub in known:
            add(sub, a.name)
            aliases[a.asname or a.name] = sub
            continue
          target = _owner(base, known)
          add(target, a.name)
          if target and target != module and _private(a.name):
            private.append((module, target, a.name))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and _private(node.attr)
          and aliases[node.value.id] != module):
        private.append((module, aliases[node.value.id], node.attr))
  return edges, sorted(set(private))


def circles(edges):
  """The import circles: strongly connected sets of more than one module,
  each sorted (Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  for start in sorted(edges):
    if start in index:
      continue
    work = [(start, iter(sorted(edges[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(edges.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          out.append(sorted(component))
  return sorted(out)


def layer_of(module):
  """(index, name) of the layer `module` (e.g. "hysac_jax.formats.hf_clip")
  lies in: the longest matching prefix of `LAYERS`."""
  rest = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
  best = None
  for index, (name, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      inside = (prefix == "" and rest == "") or (
          prefix and (rest == prefix or rest.startswith(prefix + ".")))
      if inside and (best is None or len(prefix) > best[0]):
        best = (len(prefix), index, name)
  return None if best is None else best[1:]


@pytest.fixture(scope="module")
def graph():
  return import_graph(package_sources())


def test_the_graph_counts_function_local_relative_and_attribute_imports():
  sources = {
      "p": ("", True),
      "p.a": ("def f():\n  from p import b\n  return b._hidden\n", False),
      "p.b": ("from .c import _secret, public\n", False),
      "p.c": ("import p.a as a_mod\n", False),
  }
  edges, private = import_graph(sources)
  assert edges["p.a"] == {"p.b": {"b"}}
  assert edges["p.b"] == {"p.c": {"_secret", "public"}}
  assert private == [("p.a", "p.b", "_hidden"), ("p.b", "p.c", "_secret")]
  assert circles(edges) == [["p.a", "p.b", "p.c"]]


def test_no_module_imports_a_private_name_from_another(graph):
  _, private = graph
  assert private == [], "\n".join(
      f"{m} takes {name} from {target}" for m, target, name in private)


def test_formats_import_only_models_geometry_and_generic_io(graph):
  edges, _ = graph
  formats = [m for m in edges if _within(m, (FORMATS,))]
  for name in ("torch_state", "hf_clip", "converted", "release", "exports",
               "run_dir", "openclip", "detect"):
    assert f"{FORMATS}.{name}" in formats
  wrong = [f"{m} -> {target}" for m in formats for target in edges[m]
           if _within(target, (PACKAGE,))
           and not _within(target, FORMATS_MAY_IMPORT)]
  assert wrong == []


def test_export_and_release_format_are_in_no_import_circle(graph):
  edges, _ = graph
  pair = {f"{PACKAGE}.export", f"{FORMATS}.release"}
  assert [c for c in circles(edges) if pair & set(c)] == []


def test_the_package_has_no_import_circle(graph):
  edges, _ = graph
  assert circles(edges) == []


def test_every_module_lies_in_a_layer(graph):
  edges, _ = graph
  assert [m for m in edges if layer_of(m) is None] == []


def test_imports_point_down_the_layers(graph):
  edges, _ = graph
  upward = []
  for module, targets in edges.items():
    here = layer_of(module)
    for target in targets:
      there = layer_of(target)
      if here and there and there[0] > here[0]:
        upward.append(f"{module} ({here[1]}) -> {target} ({there[1]})")
  assert upward == []


def test_the_layer_map_places_modules_as_the_readme_does():
  assert layer_of(f"{PACKAGE}.formats.detect")[1] == "formats"
  assert layer_of(f"{PACKAGE}.evaluation.retrieval")[0] < layer_of(
      f"{PACKAGE}.evaluation.embed")[0]
  assert layer_of(PACKAGE)[0] == len(LAYERS) - 1
  assert layer_of(f"{PACKAGE}.training.step")[0] > layer_of(
      f"{PACKAGE}.pretrained")[0]


def test_only_train_py_imports_the_training_loop(graph):
  edges, _ = graph
  loop = f"{PACKAGE}.training.loop"
  assert [m for m, targets in edges.items() if loop in targets] == []


def test_the_checkpoint_store_builds_no_model(graph):
  edges, _ = graph
  store = edges[f"{PACKAGE}.checkpoint"]
  assert [t for t in store if _within(t, (f"{PACKAGE}.training",
                                          f"{PACKAGE}.models",
                                          f"{PACKAGE}.pretrained"))] == []


def test_the_train_step_reads_no_file_format(graph):
  edges, _ = graph
  step = edges[f"{PACKAGE}.training.step"]
  assert [t for t in step if _within(t, (FORMATS, f"{PACKAGE}.convert",
                                         f"{PACKAGE}.serving"))] == []


def test_the_models_read_no_file():
  sources = package_sources()
  models = [m for m in sources if _within(m, (f"{PACKAGE}.models",))]
  readers = []
  for module in models:
    for node in ast.walk(ast.parse(sources[module][0])):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == "open"):
        readers.append(f"{module}:{node.lineno}")
  # The one exception: the deprecated path argument of
  # sizes.clip_config_from_hf, which goes when it does.
  assert [r for r in readers
          if not r.startswith(f"{PACKAGE}.models.sizes:")] == []

