"""CLIP preprocessing against transformers' slow (PIL) CLIPImageProcessor."""

import io

import numpy as np
import pytest
from PIL import Image

from hysac_jax.data import preprocess


def _encoded(rng, h, w, fmt="JPEG", mode="RGB"):
  pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(pixels).convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope="module")
def slow_processor():
  transformers = pytest.importorskip("transformers")
  del transformers
  from transformers.models.clip import image_processing_pil_clip

  def make(size):
    return image_processing_pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size})
  return make


@pytest.mark.parametrize("h,w,size,fmt,mode", [
    (100, 150, 64, "JPEG", "RGB"),   # landscape, downscale
    (151, 97, 64, "JPEG", "RGB"),    # portrait, odd sizes
    (64, 64, 64, "PNG", "RGB"),      # already the right size
    (40, 70, 64, "PNG", "RGBA"),     # upscale, alpha dropped
    (120, 90, 32, "JPEG", "L"),      # greyscale -> RGB
    (333, 500, 224, "JPEG", "RGB"),  # a COCO-like image at CLIP size
])
def test_clip_preprocess_matches_slow_hf_processor(slow_processor, h, w, size,
                                                   fmt, mode):
  data = _encoded(np.random.default_rng(h * w), h, w, fmt, mode)
  ref = slow_processor(size)(images=Image.open(io.BytesIO(data)),
                             return_tensors="np")["pixel_values"][0]
  ref = ref.transpose(1, 2, 0)  # CHW -> HWC
  ours = preprocess.clip_preprocess(data, size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  # Compare in [0, 1] pixel units: within 1/255 per pixel.
  err = np.abs(ours - ref) * preprocess.CLIP_STD
  assert err.max() <= 1 / 255


def test_clip_preprocess_accepts_arrays_and_pil_alike():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)
  a = preprocess.clip_preprocess(pixels, 32)
  b = preprocess.clip_preprocess(Image.fromarray(pixels), 32)
  np.testing.assert_array_equal(a, b)


def test_normalisation_is_clip_mean_std_in_float64():
  pixels = np.full((8, 8, 3), 200, np.uint8)
  out = preprocess.clip_preprocess(pixels, 8)
  want = (200 / 255 - np.array([0.48145466, 0.4578275, 0.40821073],
                               np.float64)) / np.array(
                                   [0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(out[0, 0], want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(preprocess.denormalise(out), 200 / 255,
                             atol=1e-6)


def test_random_resized_crop_is_a_pure_function_of_the_rng():
  data = _encoded(np.random.default_rng(1), 80, 120)
  a = preprocess.random_resized_crop(data, 32, np.random.default_rng(5))
  b = preprocess.random_resized_crop(data, 32, np.random.default_rng(5))
  c = preprocess.random_resized_crop(data, 32, np.random.default_rng(6))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, preprocess.clip_preprocess(data, 32))


def test_random_resized_crop_full_square_box_is_a_plain_resize():
  pixels = np.random.default_rng(2).integers(0, 256, (48, 48, 3), np.uint8)
  out = preprocess.random_resized_crop(pixels, 24, np.random.default_rng(0),
                                       scale=(1.0, 1.0), ratio=(1.0, 1.0))
  ref = np.asarray(Image.fromarray(pixels).resize(
      (24, 24), Image.Resampling.BICUBIC), np.float32) / 255
  np.testing.assert_allclose(preprocess.denormalise(out), ref, atol=1e-6)


def test_decode_image_rejects_truncated_bytes():
  data = _encoded(np.random.default_rng(3), 64, 64)
  with pytest.raises(OSError):
    preprocess.decode_image(data[:len(data) // 2])


# ------------------------------------------------------ JPEG draft mode ---


def test_jpeg_draft_decodes_at_the_largest_reduction_that_keeps_the_size():
  data = _encoded(np.random.default_rng(4), 192, 256)  # h, w
  assert preprocess.decode_image(data).size == (256, 192)
  # min(256 // 32, 192 // 32) = 6 -> scale 1/4 (1/8 would give 24 < 32).
  assert preprocess.decode_image(data, draft_size=32).size == (64, 48)
  assert preprocess.decode_image(data, draft_size=96).size == (128, 96)
  # Less than twice the size on one side: a full decode.
  assert preprocess.decode_image(data, draft_size=100).size == (256, 192)


@pytest.mark.parametrize("h,w,size,fmt", [
    (100, 150, 64, "JPEG"),   # < 2x the output: nothing to reduce
    (192, 256, 32, "PNG"),    # not a JPEG
])
def test_jpeg_draft_changes_nothing_it_cannot_reduce(h, w, size, fmt):
  data = _encoded(np.random.default_rng(h + w), h, w, fmt)
  np.testing.assert_array_equal(
      preprocess.clip_preprocess(data, size, jpeg_draft=True),
      preprocess.clip_preprocess(data, size))


def test_jpeg_draft_stays_close_on_smooth_content():
  # Error model: the full path (bicubic antialiased resize of the full
  # decode) and the draft path (libjpeg's 1/4 DCT downscale, then bicubic)
  # both reproduce a linear ramp; a sinusoid of wavelength 128 source px
  # and amplitude 60 is attenuated by about (2 pi / 128)^2 * var / 2 * 60
  # < 0.5 levels for either filter (variance under 16 px^2). With one
  # JPEG quantisation error per path (quality 95, about 1 level) and the
  # uint8 rounding of each output, the paths differ by at most 4 levels;
  # on full-band noise they do differ (draft is not a full decode).
  y, x = np.mgrid[0:384, 0:512].astype(np.float64)
  smooth = np.stack([128 + 60 * np.sin(2 * np.pi * x / 128) + 0.1 * y,
                     128 + 60 * np.cos(2 * np.pi * y / 128),
                     100 + 0.2 * x], -1)
  noise = np.random.default_rng(5).integers(0, 256, (384, 512, 3))
  for pixels, close in ((smooth, True), (noise, False)):
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=95)
    full = preprocess.resize_crop(buf.getvalue(), 64).astype(np.float64)
    draft = preprocess.resize_crop(buf.getvalue(), 64, jpeg_draft=True)
    diff = np.abs(full - draft)
    if close:
      assert diff.max() <= 4 and diff.mean() <= 1
    else:
      assert diff.mean() > 1


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped():
  wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
  buf = io.BytesIO()
  Image.fromarray(wide).save(buf, "PNG")
  with pytest.warns(UserWarning, match="16-bit image .* scaled to 8 bits"):
    img = preprocess.decode_image(buf.getvalue())
  x = np.asarray(img)
  assert x.shape == (64, 64, 3) and x.dtype == np.uint8
  # convert("RGB") made 99.5 % of such pixels 255; divided by 257 they
  # are within half a step of the true value.
  np.testing.assert_array_less(np.abs(x[..., 0] - wide / 257.0), 0.5 + 1e-9)
  assert (x == 255).mean() < 0.01


def test_a_float_tiff_is_taken_as_zero_to_one_and_clipped():
  f = np.linspace(-0.5, 1.5, 64 * 64, dtype=np.float32).reshape(64, 64)
  buf = io.BytesIO()
  Image.fromarray(f).save(buf, "TIFF")
  with pytest.warns(UserWarning, match="float image"):
    x = np.asarray(preprocess.decode_image(buf.getvalue()))
  np.testing.assert_array_less(
      np.abs(x[..., 0] - np.clip(f, 0, 1) * 255), 0.5 + 1e-4)
