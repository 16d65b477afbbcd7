"""`open_clip`'s own model code for parity tests, on a machine whose
torchvision cannot be imported.

`open_clip/__init__.py` imports its image transforms (`torchvision.transforms`)
and `open_clip/utils.py` imports `torchvision.ops.misc.FrozenBatchNorm2d`
(used only to freeze ResNet towers). The model code the tests check against,
`open_clip.model.CLIP` with `open_clip.transformer`, needs torch alone. The
torchvision wheel on PyPI is built for CUDA torch, so next to the CPU torch
pinned for tests its import fails ("operator torchvision::nms does not
exist"), or torchvision is not installed at all. Only then, and only while open_clip is being imported, does
`load_open_clip` put a stub `torchvision` in `sys.modules`: it defines exactly
the names open_clip imports, and every one of them raises if used, so a test
cannot silently run through a stub. The stub is taken out again afterwards,
so any other `import torchvision` behaves as before.
"""

import contextlib
import importlib
import importlib.machinery
import sys
import types

# The torchvision names open_clip 3.x imports at module level
# (open_clip/transform.py and open_clip/utils.py).
_TRANSFORMS = ("Normalize", "Compose", "RandomResizedCrop", "ToTensor",
               "Resize", "CenterCrop", "ColorJitter", "Grayscale")


def _unavailable(name):
  """A class standing in for torchvision's `name`: it cannot be built."""

  def __init__(self, *args, **kwargs):
    raise RuntimeError(f"torchvision.{name} is a test stub: torchvision "
                       "does not import here (see tests/open_clip_import.py)")

  return type(name.rpartition(".")[2], (), {"__init__": __init__})


def _drop_torchvision_modules():
  for key in [k for k in sys.modules
              if k == "torchvision" or k.startswith("torchvision.")]:
    del sys.modules[key]


@contextlib.contextmanager
def _torchvision_stub():
  """A stub `torchvision` in `sys.modules` for the duration of the block."""
  _drop_torchvision_modules()  # The half-imported real package.
  modules = {name: types.ModuleType(name) for name in (
      "torchvision", "torchvision.ops", "torchvision.ops.misc",
      "torchvision.transforms", "torchvision.transforms.functional")}
  for name, module in modules.items():
    # transformers' availability check calls importlib.util.find_spec.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    parent, _, child = name.rpartition(".")
    if parent:
      setattr(modules[parent], child, module)
  modules["torchvision.ops.misc"].FrozenBatchNorm2d = _unavailable(
      "ops.misc.FrozenBatchNorm2d")
  transforms = modules["torchvision.transforms"]
  for name in _TRANSFORMS:
    setattr(transforms, name, _unavailable(f"transforms.{name}"))
  functional = modules["torchvision.transforms.functional"]

  def functional_getattr(name):
    if name.startswith("__"):  # inspect and pickle probe module dunders
      raise AttributeError(name)
    raise RuntimeError(f"torchvision.transforms.functional.{name} is a test "
                       "stub: torchvision does not import here")

  functional.__getattr__ = functional_getattr  # PEP 562: on any name.
  # An enum in torchvision; open_clip reads two members as default values.
  transforms.InterpolationMode = types.SimpleNamespace(
      BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
  sys.modules.update(modules)
  try:
    yield
  finally:
    _drop_torchvision_modules()


def load_open_clip():
  """`open_clip` (its model code usable), importing torchvision if it can.

  Returns:
    the `open_clip` package; `open_clip.model.CLIP` is the reference.
  """
  if "open_clip" in sys.modules:
    return sys.modules["open_clip"]
  try:
    importlib.import_module("torchvision")
  except (ImportError, RuntimeError):
    with _torchvision_stub():
      return importlib.import_module("open_clip")
  return importlib.import_module("open_clip")
