"""`synthetic_visu`: a procedurally drawn ViSU look-alike, no download.

Each quadruple is a scene of 1-3 objects (4 shapes, 5 colours, 2 sizes) on
one of 3 backgrounds. The safe image V draws the scene; the safe caption S
names count, size, colour, shape and background. The unsafe twin G redraws
the same scene with a fresh layout and adds a salient motif: a striped
red/black diagonal slash band and dark-red splatter blobs. The unsafe caption
U keeps the scene words and adds words from a small fixed vocabulary of
violent or explicit adjectives. Only words and abstract marks: no real
harmful content.

Everything is a pure function of (seed, split, index), so the set is
reproducible and examples can be drawn in any order. Drawing is vectorised
NumPy over signed distance fields (anti-aliased edges), about 0.1 ms per
32-px image.
"""

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hysac_jax.data import schema

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "blue": (40, 90, 220),
    "green": (40, 170, 60),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 30),
}
BACKGROUNDS = {
    "white": (235, 235, 235),
    "gray": (120, 120, 120),
    "beige": (215, 195, 150),
}
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Fixed unsafe vocabulary, per ViSU-like category tag.
UNSAFE_WORDS = {
    "violence": ("bloody", "violent", "gory", "brutal", "stabbed", "murdered"),
    "sexual": ("naked", "nude", "explicit", "obscene", "lewd", "pornographic"),
}
SAFE_TEMPLATES = (
    "a photo of {n} {size} {colour} {shapes} on a {bg} background",
    "{n} {size} {colour} {shapes} on a {bg} background",
    "an image with {n} {size} {colour} {shapes} and a {bg} backdrop",
)
UNSAFE_TEMPLATES = (
    "a {w1} photo of {n} {size} {colour} {shapes} on a {bg} background",
    "{n} {w1} {w2} {colour} {shapes} on a {bg} background",
    "a {w1} and {w2} scene of {n} {size} {colour} {shapes} with a {bg} "
    "backdrop",
)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_MOTIF_RED = np.array([200, 10, 10], np.float32) / 255
_MOTIF_BLACK = np.array([10, 10, 10], np.float32) / 255
_SPLATTER = np.array([120, 0, 0], np.float32) / 255


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a caption talks about; `draw_scene` turns it into pixels."""
  shape: str
  colour: str
  background: str
  size: str
  count: int
  tag: str


def sample_scene(rng):
  """Draws scene attributes uniformly."""
  return Scene(
      shape=SHAPES[rng.integers(len(SHAPES))],
      colour=list(COLOURS)[rng.integers(len(COLOURS))],
      background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
      size=SIZES[rng.integers(len(SIZES))],
      count=int(rng.integers(1, 4)),
      tag=list(UNSAFE_WORDS)[rng.integers(len(UNSAFE_WORDS))])


def _words(scene):
  return dict(n=COUNT_WORDS[scene.count], size=scene.size, colour=scene.colour,
              shapes=scene.shape + ("s" if scene.count > 1 else ""),
              bg=scene.background)


def safe_caption(scene, rng):
  """A template caption naming count, size, colour, shape and background."""
  return SAFE_TEMPLATES[rng.integers(len(SAFE_TEMPLATES))].format(
      **_words(scene))


def unsafe_caption(scene, rng):
  """The unsafe rewrite: the scene words plus two words of the tag's list."""
  w1, w2 = rng.choice(UNSAFE_WORDS[scene.tag], size=2, replace=False)
  return UNSAFE_TEMPLATES[rng.integers(len(UNSAFE_TEMPLATES))].format(
      w1=w1, w2=w2, **_words(scene))


def _grid(size):
  """Pixel-centre coordinates, each (size, size)."""
  c = np.arange(size, dtype=np.float32) + 0.5
  return np.meshgrid(c, c, indexing="xy")  # xs varies along columns


def _shape_sdf(shape, xs, ys, cx, cy, r):
  """Signed distance (pixels, < 0 inside) to a shape of radius r."""
  dx, dy = np.abs(xs - cx), ys - cy
  if shape == "circle":
    return np.sqrt(dx**2 + dy**2) - r
  if shape == "square":
    return np.maximum(dx, np.abs(dy)) - 0.8 * r
  if shape == "diamond":
    return (dx + np.abs(dy) - r) / np.sqrt(2)
  if shape == "triangle":  # apex up, base at cy + 0.8 r
    base = dy - 0.8 * r
    # Sides through the apex (cx, cy - r) and the base corners (cx ± r, ...).
    n = np.array([1.8, -1.0]) / np.hypot(1.8, 1.0)
    side = n[0] * dx + n[1] * (dy + r)
    return np.maximum(base, side)
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _paint(canvas, sdf, colour):
  alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
  canvas *= 1 - alpha
  canvas += alpha * colour


def draw_scene(scene, rng, image_size, unsafe=False):
  """Draws a scene on a random layout.

  Objects sit in distinct cells of a 2x2 grid, jittered but never touching
  (radius <= 0.38 cell, jitter <= 0.04 image), so counts stay countable; `unsafe` adds the slash band and splatter on top.

  Returns:
    uint8 (image_size, image_size, 3).
  """
  s = float(image_size)
  xs, ys = _grid(image_size)
  canvas = np.empty((image_size, image_size, 3), np.float32)
  canvas[:] = np.array(BACKGROUNDS[scene.background], np.float32) / 255
  cell = s / 2
  radius = cell * (0.38 if scene.size == "large" else 0.22)
  colour = np.array(COLOURS[scene.colour], np.float32) / 255
  for c in rng.permutation(4)[:scene.count]:
    jitter = rng.uniform(-0.04, 0.04, size=2) * s
    cx = (c % 2 + 0.5) * cell + jitter[0]
    cy = (c // 2 + 0.5) * cell + jitter[1]
    _paint(canvas, _shape_sdf(scene.shape, xs, ys, cx, cy, radius), colour)
  if unsafe:
    _draw_motif(canvas, rng, xs, ys, s)
  canvas += rng.normal(0.0, 0.015, canvas.shape).astype(np.float32)
  return (np.clip(canvas, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _draw_motif(canvas, rng, xs, ys, s):
  """Striped red/black diagonal band plus dark-red blobs."""
  flip = rng.integers(2)
  u = (xs if flip else s - xs)
  offset = rng.uniform(-0.15, 0.15) * s
  dist = np.abs(u - ys - offset) / np.sqrt(2)  # distance to the diagonal
  band = dist - 0.08 * s
  stripes = ((u + ys) / (0.12 * s)).astype(np.int32) % 2 == 0
  alpha = np.clip(0.5 - band, 0.0, 1.0)[..., None]
  motif = np.where(stripes[..., None], _MOTIF_RED, _MOTIF_BLACK)
  canvas *= 1 - alpha
  canvas += alpha * motif
  for _ in range(int(rng.integers(3, 6))):
    cx, cy = rng.uniform(0.05, 0.95, size=2) * s
    r = rng.uniform(0.04, 0.07) * s
    _paint(canvas, np.hypot(xs - cx, ys - cy) - r, _SPLATTER)


def make_quadruple(seed, split, index, image_size):
  """The example (split, index) of the set drawn from `seed`.

  Returns:
    dict with uint8 (image_size, image_size, 3) "safe_image" and
    "unsafe_image", str "safe_caption", "unsafe_caption", "tag", and the
    `Scene` under "scene".
  """
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  scene = sample_scene(rng)
  return {
      "scene": scene,
      "safe_image": draw_scene(scene, rng, image_size),
      "unsafe_image": draw_scene(scene, rng, image_size, unsafe=True),
      "safe_caption": safe_caption(scene, rng),
      "unsafe_caption": unsafe_caption(scene, rng),
      "tag": scene.tag,
  }


def encode_png(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


@dataclasses.dataclass(eq=False)
class SyntheticVisuConfig(tfds.core.BuilderConfig):
  """Size and seed of a synthetic set (each choice gets its own directory)."""
  image_size: int = 32
  num_train: int = 4096
  num_validation: int = 512
  num_test: int = 1024
  seed: int = 0


def synthetic_config(image_size=32, num_train=4096, num_validation=512,
                     num_test=1024, seed=0):
  """A config named after its parameters, e.g. `px32_n4096-512-1024_seed0`."""
  name = (f"px{image_size}_n{num_train}-{num_validation}-{num_test}"
          f"_seed{seed}")
  return SyntheticVisuConfig(
      name=name, image_size=image_size, num_train=num_train,
      num_validation=num_validation, num_test=num_test, seed=seed,
      description="procedurally drawn safe/unsafe quadruples")


class SyntheticVisu(tfds.core.GeneratorBasedBuilder):
  """Procedurally drawn (V, G, S, U) quadruples; see the module docstring.

  Pick sizes with `config=synthetic_config(image_size=..., num_train=...)`.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [synthetic_config()]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=schema.quadruple_features(), homepage="")

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation,
             "test": c.num_test}
    return {split: self._generate_examples(split, n)
            for split, n in sizes.items()}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    for i in range(num_examples):
      ex = make_quadruple(c.seed, split, i, c.image_size)
      key = f"{split}-{i:07d}"
      yield key, {
          "id": key,
          "safe_image": encode_png(ex["safe_image"]),
          "unsafe_image": encode_png(ex["unsafe_image"]),
          "safe_caption": ex["safe_caption"],
          "unsafe_caption": ex["unsafe_caption"],
          "tag": ex["tag"],
      }


# --------------------------------------------------------------------------
# Classification view: the safe images labelled by shape or by colour.

CLASS_ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS)}


def classification_view(attribute, split, num, seed=0, image_size=32):
  """Safe images V of a split, labelled by their shape or their colour.

  The images are those of `make_quadruple(seed, split, i, image_size)`, the
  same as the TFDS builder's for that seed.

  Args:
    attribute: "shape" (4 classes) or "colour" (5 classes).
    split: "train", "validation" or "test".
    num: number of examples (indices 0..num-1).

  Returns:
    (images uint8 (num, S, S, 3), labels int64 (num,), class names).
  """
  if attribute not in CLASS_ATTRIBUTES:
    raise ValueError(f"unknown synthetic attribute {attribute!r}; expected "
                     f"one of {tuple(CLASS_ATTRIBUTES)}")
  classes = CLASS_ATTRIBUTES[attribute]
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  labels = np.empty(num, np.int64)
  for i in range(num):
    ex = make_quadruple(seed, split, i, image_size)
    images[i] = ex["safe_image"]
    labels[i] = classes.index(getattr(ex["scene"], attribute))
  return images, labels, list(classes)


def class_prompts(attribute):
  """{class: captions}: safe captions naming the class, over every value of
  the other scene words, as zero-shot prompts.

  Each class gets the first safe template filled in with every count, size,
  background and the other attribute (shape or colour), so all classes have
  the same number of prompts (90 per shape, 72 per colour).
  """
  if attribute not in CLASS_ATTRIBUTES:
    raise ValueError(f"unknown synthetic attribute {attribute!r}; expected "
                     f"one of {tuple(CLASS_ATTRIBUTES)}")
  prompts = {}
  for value in CLASS_ATTRIBUTES[attribute]:
    others = (SHAPES if attribute == "colour" else tuple(COLOURS))
    captions = []
    for other in others:
      shape, colour = ((value, other) if attribute == "shape"
                       else (other, value))
      for count in COUNT_WORDS:
        for size in SIZES:
          for background in BACKGROUNDS:
            scene = Scene(shape, colour, background, size, count, "")
            captions.append(SAFE_TEMPLATES[0].format(**_words(scene)))
    prompts[value] = captions
  return prompts
