"""`visu_text`: the public text-only ViSU release (S, U pairs with a tag).

Read from a local export the user points to, one file per split, in JSON
(a list of rows, a dict id -> row, or `{"data": ...}`), JSON Lines, CSV or
Parquet. Each row has `safe`, `nsfw` and `tag` (an `id` column is used when
present, else the row number). By default `manual_dir` is searched for
`<split>.{parquet,jsonl,json,csv}`; `text_files={split: path}` names files
explicitly (absolute, or relative to `manual_dir`). Used for text-only
evaluation (S <-> U retrieval).
"""

import csv
import json
import os

import tensorflow_datasets as tfds

from hysac_jax.data import bad_input
from hysac_jax.data import schema

SPLITS = ("train", "validation", "test")
FORMATS = ("parquet", "jsonl", "json", "csv")


def read_rows(path):
  """Rows of a text export as (row_id, dict), in file order.

  Raises:
    ValueError: unknown extension or a file that does not parse; the message
      names the file (and line, for JSON Lines).
  """
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  if ext == "parquet":
    import pyarrow.parquet as pq  # Heavy, and needed for Parquet only.
    try:
      rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types.
      raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
  elif ext == "csv":
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  elif ext == "jsonl":
    rows = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          # One bad line is a malformed record, not a broken file.
          rows.append(_Malformed(f"line {n} is not valid JSON ({e})"))
  elif ext == "json":
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and "data" in data and set(data) <= {
        "info", "data"}:
      data = data["data"]
    if isinstance(data, dict):
      return [(str(k), v) for k, v in data.items()]
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a list or dict of rows")
    rows = data
  else:
    raise ValueError(f"{path}: unsupported extension {ext!r}; expected one "
                     f"of {FORMATS}")
  out = []
  for i, row in enumerate(rows):
    row_id = row.get("id") if isinstance(row, dict) else None
    out.append((str(row_id if row_id not in (None, "") else i), row))
  return out


class _Malformed:
  """A row that could not be parsed, carrying the reason."""

  def __init__(self, reason):
    self.reason = reason


def parse_row(row):
  """Returns (fields, None) or (None, reason) for one text row."""
  if isinstance(row, _Malformed):
    return None, f"malformed record: {row.reason}"
  if not isinstance(row, dict):
    return None, f"malformed record: expected an object, got {row!r:.80}"
  missing = [k for k in ("safe", "nsfw") if k not in row]
  if missing:
    return None, f"malformed record: missing field(s) {missing}"
  fields = {}
  for key in ("safe", "nsfw"):
    value = row[key]
    if value is None or not isinstance(value, str) or not value.strip():
      return None, f"empty caption field {key!r}"
    fields[key] = value.strip()
  fields["tag"] = str(row.get("tag") or "")
  return fields, None


def find_text_files(manual_dir, text_files=None):
  """{split: path} of the export files to read."""
  if text_files:
    files = {s: os.path.join(manual_dir, p) for s, p in text_files.items()}
    for split, path in files.items():
      if not os.path.exists(path):
        raise FileNotFoundError(f"visu_text {split} file missing: {path}")
    return files
  files = {}
  for split in SPLITS:
    for ext in FORMATS:
      path = os.path.join(manual_dir, f"{split}.{ext}")
      if os.path.exists(path):
        files[split] = path
        break
  if not files:
    raise FileNotFoundError(
        f"no ViSU text export in {manual_dir}: expected <split>.<ext> for "
        f"split in {SPLITS}, ext in {FORMATS}, or pass text_files=")
  return files


class VisuText(tfds.core.GeneratorBasedBuilder):
  """ViSU text pairs from a local export; see the module docstring.

  Args (besides the TFDS ones):
    text_files: {split: path}; default: search manual_dir.
    skip_invalid: skip bad rows (listed in skipped-<split>.json).
  """

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def __init__(self, *, text_files=None, skip_invalid=False, **kwargs):
    self.text_files = dict(text_files) if text_files else None
    self.skip_invalid = skip_invalid
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=schema.text_features(),
        homepage="")

  def _split_generators(self, dl_manager):
    files = find_text_files(os.fspath(dl_manager.manual_dir), self.text_files)
    return {split: self._generate_examples(split, path)
            for split, path in files.items()}

  def _generate_examples(self, split, path):
    log = bad_input.SkipLog(split, self.skip_invalid)
    for row_id, row in read_rows(path):
      fields, reason = parse_row(row)
      if reason:
        log.bad(row_id, f"{reason} (in {os.path.basename(path)})")
        continue
      yield row_id, {"id": row_id, "safe_caption": fields["safe"],
                     "unsafe_caption": fields["nsfw"], "tag": fields["tag"]}
    log.write(self.data_path)
