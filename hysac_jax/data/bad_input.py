"""Bad records while building a dataset: a clear error, or a skip report.

Builders check every record (image bytes decodable and complete, captions
non-empty, fields well formed). A bad record raises `InvalidRecordError`
naming the split, the record id and the file; with `skip_invalid=True` the
builder records it in a `SkipLog` instead, and at the end of the split writes
`skipped-<split>.json` beside the dataset files and prints the count.
"""

import json
import os

from PIL import Image

from hysac_jax import input_file
from hysac_jax.data import preprocess


class InvalidRecordError(ValueError):
  """A record that cannot become an example (names split, id and reason)."""

  def __init__(self, split, record_id, reason):
    super().__init__(f"invalid record {record_id!r} in split {split!r}: "
                     f"{reason} (pass skip_invalid=True to skip such records "
                     "and list them in skipped-<split>.json)")
    self.split, self.record_id, self.reason = split, record_id, reason


def read_image_bytes(path):
  """Reads an image file and checks that it decodes completely.

  Returns:
    (bytes, None) on success, or (None, reason) naming the file.
  """
  path = os.fspath(path)
  try:
    data = input_file.read_bytes(path, input_file.MAX_IMAGE_BYTES, "image")
  except (input_file.NotRegularFileError, input_file.FileTooLargeError) as e:
    return None, f"image file unreadable: {e}"
  except FileNotFoundError:
    return None, f"image file missing: {path}"
  except OSError as e:
    return None, f"image file unreadable: {path} ({e})"
  reason = check_image_bytes(data)
  if reason:
    return None, f"{reason}: {path}"
  return data, None


def check_image_bytes(data):
  """None if `data` is a complete image, else a short reason."""
  if not data:
    return "image file empty"
  try:
    preprocess.decode_image(data)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL raises OSError("image file is truncated") for cut-off files and
    # UnidentifiedImageError (an OSError) for non-images.
    return f"image unreadable or truncated ({e})"
  return None


class SkipLog:
  """Handles bad records for one split: raise, or log and skip.

  Usage inside a generator: `if reason: log.bad(record_id, reason); continue`
  then `log.write(directory)` once the split is done.
  """

  def __init__(self, split, skip_invalid):
    self.split = split
    self.skip_invalid = skip_invalid
    self.skipped = []  # [{"id": ..., "reason": ...}]

  def bad(self, record_id, reason):
    """Raises `InvalidRecordError`, unless skipping (then remembers it)."""
    if not self.skip_invalid:
      raise InvalidRecordError(self.split, record_id, reason)
    self.skipped.append({"id": str(record_id), "reason": reason})

  def write(self, directory):
    """Writes `skipped-<split>.json` to `directory` and prints the count.

    Only written when skipping is on, so that the report's presence means
    the build was allowed to drop records.
    """
    if not self.skip_invalid:
      return None
    path = os.path.join(os.fspath(directory), f"skipped-{self.split}.json")
    with open(path, "w") as f:
      json.dump({"split": self.split, "count": len(self.skipped),
                 "skipped": self.skipped}, f, indent=1)
    # TFDS builds in `incomplete.<tag>_<version>` and renames it when done.
    parent, base = os.path.split(os.fspath(directory))
    if base.startswith("incomplete.") and "_" in base:
      base = base.split("_", 1)[1]
    final = os.path.join(parent, base, os.path.basename(path))
    print(f"{self.split}: skipped {len(self.skipped)} invalid record(s); "
          f"report: {final}")
    return path
