"""CLIP image preprocessing: decode, resize, crop, normalise.

`clip_preprocess` reproduces the slow (PIL) `transformers.CLIPImageProcessor`:
convert to RGB, resize the shorter side to `image_size` with PIL bicubic
(longer side `int(image_size * long / short)`), centre crop with offset
`(size - crop) // 2`, scale to [0, 1], normalise with the OpenAI CLIP mean and
std. `random_resized_crop` is the optional training augmentation (off by
default, as in the HySAC release).

`jpeg_draft=True` (config `data.jpeg_draft`, off by default) lets libjpeg
decode a JPEG at 1/2, 1/4 or 1/8 scale (PIL's `Image.draft`), the largest
reduction that keeps both sides >= `image_size`, before the same bicubic
resize and crop. It only acts on JPEGs at least twice the output size (a
640x480 COCO image decodes at 320x240, a 1024 px one at 256), and it is
faster but not pixel-identical to the full decode: libjpeg's DCT-domain
downscale is a box-like filter, so edges come out slightly softer and the
result moves away from `CLIPImageProcessor` by a few 1/255 on average
(BENCHMARKS.md, "Decode + preprocess per core").
"""

import io
import math
import warnings

import numpy as np
from PIL import Image

# OpenAI CLIP's image normalisation, exactly as published (OpenCLIP's
# OPENAI_DATASET_MEAN/STD), and as the float32 arrays the pipeline applies.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN = np.array(OPENAI_MEAN, np.float32)
CLIP_STD = np.array(OPENAI_STD, np.float32)


def decode_image(data, draft_size=None):
  """Decodes JPEG/PNG bytes into an RGB PIL image (fully loaded).

  Args:
    data: encoded bytes.
    draft_size: if set, a JPEG at least twice this size on both sides is
      decoded at a reduced scale (1/2, 1/4 or 1/8) whose sides all stay
      >= draft_size (see the module docstring); other formats are unchanged.

  Raises:
    OSError / PIL.UnidentifiedImageError: unreadable or truncated bytes.
  """
  img = Image.open(io.BytesIO(data))
  if draft_size:
    img.draft(None, (draft_size, draft_size))  # no-op unless a JPEG
  img.load()  # Forces the full decode, so truncated files fail here.
  return to_rgb8(img)


# PIL modes of more than 8 bits per sample, and how each is brought to 8.
_WIDE_MODES = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit",
               "I;16N": "16-bit", "I": "16-bit", "F": "float"}


def to_rgb8(img):
  """A PIL image as 8-bit RGB, scaling 16-bit and float samples.

  `convert("RGB")` clips 16-bit samples at 255 (a 16-bit PNG came out 99.5 %
  white) and floats likewise. Here 16-bit (and 32-bit integer, as PIL opens
  16-bit PNGs) samples are divided by 257 (65535 -> 255), and float ('F',
  e.g. a float TIFF) samples are taken as [0, 1], clipped and times 255; a
  warning notes the conversion.
  """
  kind = _WIDE_MODES.get(img.mode)
  if kind is None:
    return img.convert("RGB") if img.mode != "RGB" else img
  x = np.asarray(img, np.float64)
  if kind == "float":
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0
  else:
    x = np.clip(x, 0, 65535) / 257.0
  warnings.warn(f"{kind} image ({img.mode}) scaled to 8 bits"
                + (" (samples taken as [0, 1])" if kind == "float" else ""),
                stacklevel=2)
  return Image.fromarray(np.rint(x).astype(np.uint8), "L").convert("RGB")


def _to_pil(image, draft_size=None):
  if isinstance(image, (bytes, bytearray)):
    return decode_image(bytes(image), draft_size)
  if isinstance(image, np.ndarray):
    return Image.fromarray(np.asarray(image, np.uint8))
  return to_rgb8(image)


def normalise(pixels_uint8):
  """uint8 (..., 3) -> float32 (..., 3) in CLIP-normalised units."""
  x = pixels_uint8.astype(np.float32) * np.float32(1 / 255)
  return (x - CLIP_MEAN) / CLIP_STD


def resize_shorter_side(img, size):
  """Bicubic resize so that the shorter side is `size` (HF's rounding)."""
  w, h = img.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def resize_crop(image, image_size, jpeg_draft=False):
  """Shorter-side bicubic resize then centre crop, still uint8.

  Args:
    image: encoded bytes, a PIL image, or a uint8 (H, W, 3) array.
    image_size: output side length.
    jpeg_draft: decode JPEG bytes at a reduced scale first (module
      docstring); no effect on PIL images, arrays or other formats.

  Returns:
    uint8 (image_size, image_size, 3).
  """
  img = resize_shorter_side(
      _to_pil(image, image_size if jpeg_draft else None), image_size)
  pixels = np.asarray(img, np.uint8)
  h, w = pixels.shape[:2]
  top, left = (h - image_size) // 2, (w - image_size) // 2
  return pixels[top:top + image_size, left:left + image_size]


def clip_preprocess(image, image_size, jpeg_draft=False):
  """The CLIP evaluation transform: `normalise(resize_crop(...))`.

  Returns:
    float32 (image_size, image_size, 3), NHWC channel order, normalised.
  """
  return normalise(resize_crop(image, image_size, jpeg_draft))


def random_resized_crop(image, image_size, rng, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)):
  """`random_resized_crop_uint8`, normalised: float32 (S, S, 3)."""
  return normalise(random_resized_crop_uint8(image, image_size, rng, scale,
                                             ratio))


def random_resized_crop_uint8(image, image_size, rng, scale=(0.5, 1.0),
                              ratio=(3 / 4, 4 / 3)):
  """Random-resized-crop augmentation (torchvision's sampling rule).

  A box covering `scale` of the area with aspect ratio in `ratio` (sampled in
  log space) is cut out and resized bicubically to the output size; after 10
  failed draws it falls back to the centre crop. MERU uses scale (0.5, 1).

  Args:
    image: encoded bytes, a PIL image, or a uint8 (H, W, 3) array.
    image_size: output side length.
    rng: a `np.random.Generator`; the crop is a pure function of its state.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).

  Returns:
    uint8 (image_size, image_size, 3).
  """
  img = _to_pil(image)
  w, h = img.size
  area = w * h
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      left = int(rng.integers(0, w - cw + 1))
      top = int(rng.integers(0, h - ch + 1))
      box = (left, top, left + cw, top + ch)
      out = img.resize((image_size, image_size),
                       resample=Image.Resampling.BICUBIC, box=box)
      return np.asarray(out, np.uint8)
  return resize_crop(img, image_size)


def denormalise(pixels):
  """Inverse of the normalisation: float (..., 3) -> values in [0, 1]."""
  return np.clip(np.asarray(pixels) * CLIP_STD + CLIP_MEAN, 0.0, 1.0)
