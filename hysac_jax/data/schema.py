"""The example schemas the builders share (TFDS features, no TensorFlow).

Images are kept encoded: a bytes value given to `tfds.features.Image` is
stored as is (JPEG or PNG), and the pipeline reads it back undecoded through
`tfds.decode.SkipDecoding`, decoding and preprocessing in grain workers.
"""

import tensorflow_datasets as tfds

IMAGE_KEYS = ("safe_image", "unsafe_image")
CAPTION_KEYS = ("safe_caption", "unsafe_caption")


def quadruple_features():
  """(V, G, S, U) plus an id and a category tag."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "safe_image": tfds.features.Image(shape=(None, None, 3)),
      "unsafe_image": tfds.features.Image(shape=(None, None, 3)),
      "safe_caption": tfds.features.Text(),
      "unsafe_caption": tfds.features.Text(),
      "tag": tfds.features.Text(),
  })


def text_features():
  """(S, U) pairs of the text-only release."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "safe_caption": tfds.features.Text(),
      "unsafe_caption": tfds.features.Text(),
      "tag": tfds.features.Text(),
  })


def skip_image_decoding():
  """Decoders for `as_data_source`: keep both images as encoded bytes."""
  return {k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS}
