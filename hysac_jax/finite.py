"""Fail closed on numbers: the one check of a read scalar, and strict JSON.

A safety verdict compares a distance with a threshold b'; a NaN on either
side makes `distance > b'` False, that is "safe". So every threshold, alpha,
margin, curvature, learning rate and scale read from a flag, a config, a
head file, a bounds file or a checkpoint goes through `check_number` where
it is read, and a bad one stops with one line naming its source and field.

Everything we write as JSON goes through `dumps` / `dump`: strict JSON
(`allow_nan=False`), with a legitimately undefined value (an AUROC of one
class, say) written as null (`to_json_safe`), never a `NaN` literal.
"""

import json
import math

import numpy as np


class NonFiniteError(ValueError):
  """A number that is not finite or out of its range (names where from)."""


def check_number(value, source, field, *, positive=False, low=None,
                 high=None):
  """Returns `value` as a float if it is a finite number in range.

  Args:
    value: the number read (int, float, NumPy scalar or 0-d array).
    source: where it was read, e.g. "--traversal-alpha", "config",
      "runs/x/export/hf/hysac_head.json".
    field: its name there, e.g. "traversal_alpha", "model.curv_init".
    positive: require value > 0.
    low, high: inclusive bounds, when given.

  Raises:
    NonFiniteError: "SOURCE: FIELD=VALUE: expected a finite number ...".
  """
  where = f"{source}: {field}" if source else field
  try:
    if isinstance(value, (bool, str)) or value is None:
      raise TypeError
    number = float(np.asarray(value).reshape(()))
  except (TypeError, ValueError):
    raise NonFiniteError(f"{where}={value!r}: expected a number") from None
  if not math.isfinite(number):
    raise NonFiniteError(f"{where}={number!r}: expected a finite number "
                         "(a NaN or infinite setting would make the unsafe "
                         "classifier fail open)")
  if positive and not number > 0:
    raise NonFiniteError(f"{where}={number!r}: expected a positive number")
  if low is not None and number < low:
    raise NonFiniteError(f"{where}={number!r}: expected at least {low}")
  if high is not None and number > high:
    raise NonFiniteError(f"{where}={number!r}: expected at most {high}")
  return number


def check_finite_array(array, source, name):
  """Raises `NonFiniteError` naming tensor `name` of `source` when `array`
  holds a NaN or an infinity (checked on float arrays only)."""
  array = np.asarray(array)
  if np.issubdtype(array.dtype, np.floating) and not np.all(
      np.isfinite(array)):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    raise NonFiniteError(f"{source}: tensor {name} holds {bad} non-finite "
                         f"value(s) (NaN or infinity) of {np.size(array)}: "
                         "refusing weights that would make every verdict "
                         "meaningless")


def to_json_safe(obj):
  """`obj` with every non-finite float replaced by None (JSON null), NumPy
  scalars and arrays made plain; dicts, lists and tuples walked."""
  if isinstance(obj, dict):
    return {k: to_json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json_safe(obj.tolist())
  if isinstance(obj, (np.floating, float)) and not isinstance(obj, bool):
    value = float(obj)
    return value if math.isfinite(value) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def non_finite_paths(obj, prefix=""):
  """The dotted paths of the non-finite floats in `obj` (what `to_json_safe`
  writes as null), e.g. ["classification.text.auroc"]."""
  if isinstance(obj, dict):
    return [p for k, v in obj.items()
            for p in non_finite_paths(v, f"{prefix}{k}.")]
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [p for i, v in enumerate(list(obj))
            for p in non_finite_paths(v, f"{prefix}{i}.")]
  if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
    return [prefix.rstrip(".")]
  return []


def dumps(obj, **kwargs):
  """`json.dumps` of `to_json_safe(obj)`, strict (no NaN / Infinity)."""
  return json.dumps(to_json_safe(obj), allow_nan=False, **kwargs)


def dump(obj, f, **kwargs):
  """`json.dump` of `to_json_safe(obj)` to the open file `f`, strict."""
  json.dump(to_json_safe(obj), f, allow_nan=False, **kwargs)
