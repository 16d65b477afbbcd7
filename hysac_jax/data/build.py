"""Building and opening the datasets: one entry point for all builders.

  builder = build_dataset("synthetic_visu", data_dir="~/tensorflow_datasets")
  builder = build_dataset("visu", data_dir=..., manual_dir="/data/visu")
  builder = build_dataset("visu_text", data_dir=..., manual_dir="/data/visu",
                          text_files={"test": "visu_test.parquet"})

TFDS writes a dataset into `<name>/<config>/<version>` only by renaming a
finished `incomplete.*` directory, so a half-written dataset is never taken
for a complete one. A build that raises removes its temporary directory; one
killed outright leaves it behind, and the next `build_dataset` deletes such
leftovers of the same version before starting afresh.

Builds of one dataset version are serialised by an `fcntl` lock on
`<data_dir>/<name>/<config>/.<version>.build.lock`: a second process (or
thread) that asks for a dataset being built waits, then opens the finished
one instead of building it again (two concurrent TFDS builds would race on
the final rename). The lock dies with its process, so a killed build never
leaves it held. `fcntl` locks work on local disks; on a network file system
without lock support, build once before starting concurrent jobs.
"""

import contextlib
import fcntl
import logging
import os
import shutil
import sys

import tensorflow_datasets as tfds

BUILDERS = ("visu", "visu_text", "synthetic_visu")
INCOMPLETE_PREFIX = "incomplete."


def _builder_class(name):
  # Imported here: each module registers its builder with TFDS on import.
  if name == "synthetic_visu":
    from hysac_jax.data import synthetic
    return synthetic.SyntheticVisu
  if name == "visu":
    from hysac_jax.data import visu
    return visu.Visu
  if name == "visu_text":
    from hysac_jax.data import visu_text
    return visu_text.VisuText
  raise ValueError(f"unknown dataset {name!r}; expected one of {BUILDERS}")


class _QuietTFDS(logging.Filter):
  """Drops two TFDS warnings that say nothing to act on:

  - "Using custom data configuration ...": logged at every builder made from
    a config object (each validation of a run, over the progress bar);
  - "Variant folder ... has no dataset_info.json": logged while a first
    build is under way (the folder is complete once the build ends).
  """

  def filter(self, record):
    try:
      msg = record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format
      msg = str(record.msg)
    return not (msg.startswith("Using custom data configuration") or (
        msg.startswith("Variant folder") and "has no dataset_info.json" in msg))


def _quiet_tfds():
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietTFDS) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietTFDS())


def get_builder(name, data_dir, **builder_kwargs):
  """Instantiates a builder (array_record files) without building it.

  Args:
    name: one of `BUILDERS`.
    data_dir: the TFDS data directory (`~` is expanded).
    **builder_kwargs: builder options, e.g. `skip_invalid=True`,
      `split_files={...}` (visu), `text_files={...}` (visu_text),
      `config=synthetic.synthetic_config(...)` (synthetic_visu).
  """
  _quiet_tfds()
  data_dir = os.path.expanduser(os.fspath(data_dir))
  cls = _builder_class(name)
  config = builder_kwargs.get("config")
  if isinstance(config, tfds.core.BuilderConfig) and config.name in {
      c.name for c in cls.BUILDER_CONFIGS}:
    # TFDS refuses a config object named like a registered one; the names
    # encode every parameter, so the registered one is the same config.
    builder_kwargs["config"] = config.name
  return cls(data_dir=data_dir, file_format="array_record", **builder_kwargs)


def remove_stale_incomplete(builder):
  """Deletes `incomplete.*` directories a killed build of this version left.

  Returns:
    The removed paths.
  """
  final = os.fspath(builder.data_path)
  parent, version = os.path.split(final)
  removed = []
  if not os.path.isdir(parent):
    return removed
  for entry in os.listdir(parent):
    # TFDS names them `incomplete.<random>_<version>`.
    if entry.startswith(INCOMPLETE_PREFIX) and entry.endswith("_" + version):
      path = os.path.join(parent, entry)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


@contextlib.contextmanager
def build_lock(builder):
  """Holds the build lock of `builder`'s dataset version (blocking)."""
  final = os.fspath(builder.data_path)
  parent, version = os.path.split(final)
  os.makedirs(parent, exist_ok=True)
  path = os.path.join(parent, f".{version}.build.lock")
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another build of {final} to finish (lock {path})",
            file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield path
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_manual_dir(name, manual_dir):
  """A builder that reads the user's files needs an existing manual_dir.

  Checked before TFDS runs: TFDS would first create `downloads/` and the
  dataset directory, then fail with an AssertionError.
  """
  if not getattr(_builder_class(name), "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    return
  if not manual_dir:
    raise FileNotFoundError(f"dataset {name!r} needs manual_dir "
                            "(config.data.manual_dir): the directory of the "
                            "user's files")
  path = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(path):
    what = "is a file" if os.path.exists(path) else "does not exist"
    raise FileNotFoundError(f"manual_dir {path} {what} (config.data."
                            f"manual_dir of dataset {name!r})")


def check_buildable(name, data_dir, manual_dir=None, **builder_kwargs):
  """Raises what `build_dataset` would raise for a missing manual_dir, in
  milliseconds and without creating anything: for early checks."""
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if os.path.isdir(os.path.join(data_dir, name)):  # else TFDS logs warnings
    if get_builder(name, data_dir, **builder_kwargs).is_prepared():
      return
  _check_manual_dir(name, manual_dir)


def build_dataset(name, data_dir, manual_dir=None, **builder_kwargs):
  """Builds the dataset if it is not complete yet; returns the builder.

  Call it from one process (e.g. `jax.process_index() == 0`) before the
  others open the data.

  Args:
    name: "visu", "visu_text" or "synthetic_visu".
    data_dir: where the TFDS dataset lives or will be written.
    manual_dir: the user's files (visu, visu_text); unused by synthetic_visu.
    **builder_kwargs: passed to `get_builder`.

  Returns:
    The prepared `tfds.core.DatasetBuilder`; read it with
    `builder.as_data_source()` or `hysac_jax.data.pipeline`.
  """
  builder = get_builder(name, data_dir, **builder_kwargs)
  if builder.is_prepared():
    return builder
  _check_manual_dir(name, manual_dir)
  with build_lock(builder):
    # Another build may have finished while this one waited for the lock.
    builder = get_builder(name, data_dir, **builder_kwargs)
    if builder.is_prepared():
      return builder
    # Under the lock, an `incomplete.*` directory is no live build's.
    for path in remove_stale_incomplete(builder):
      print(f"removed the leftovers of an interrupted build: {path}")
    config = None
    if manual_dir:
      config = tfds.download.DownloadConfig(
          manual_dir=os.path.expanduser(os.fspath(manual_dir)))
    builder.download_and_prepare(download_config=config,
                                 file_format="array_record")
  return builder
