"""The run config schema (hysac_jax/config.py): saved configs, resume rules."""

import pytest

from hysac_jax import config as config_lib
from hysac_jax.formats import run_dir


def _config(**fields):
  c = config_lib.base_config()
  for field, value in fields.items():
    group, _, name = field.rpartition(".")
    target = c
    for part in filter(None, group.split(".")):
      target = target[part]
    target[name] = value
  return c


@pytest.mark.parametrize("field,value", [
    ("seed", 1), ("model.mode", "euc"), ("model.clip", "other/clip"),
    ("model.lora.rank", 8), ("model.lora.targets", ("k_proj",)),
    ("loss.local_negatives", True), ("optim.lr", 3e-4),
    ("data.name", "synthetic_visu"), ("data.synthetic_sizes", (8, 8, 8)),
    ("data.augment", True)])
def test_fields_that_define_the_run_conflict_on_resume(field, value):
  conflicts = config_lib.resume_conflicts(_config(), _config(**{field: value}))
  assert len(conflicts) == 1 and conflicts[0].startswith(f"{field} "), \
      conflicts
  assert conflicts[0].endswith(f"(now {value!r})")


@pytest.mark.parametrize("field,value", [
    ("train.epochs", 80), ("train.patience", 9), ("train.keep_last", 5),
    ("eval.traversal_alpha", 2.0), ("data.data_dir", "/elsewhere"),
    ("data.num_workers", 2), ("data.batch_size_per_device", 256),
    ("model.dtype", "float32"), ("model.remat", "full"),
    ("model.attention", "einsum")])
def test_how_a_run_runs_may_change_on_resume(field, value):
  assert config_lib.resume_conflicts(_config(),
                                     _config(**{field: value})) == []


def test_epochs_are_fixed_when_the_schedule_depends_on_them():
  cosine = {"optim.schedule": "warmup_cosine", "optim.warmup_steps": 10}
  conflicts = config_lib.resume_conflicts(
      _config(**cosine), _config(**cosine, **{"train.epochs": 80}))
  assert conflicts == ["train.epochs 50 (now 80)"]


def test_a_saved_config_compares_equal_to_the_config_it_came_from(tmp_path):
  c = _config(**{"model.lora.targets": ("k_proj", "v_proj")})
  config_lib.save_config(c, tmp_path)  # tuples come back from JSON lists
  assert config_lib.resume_conflicts(config_lib.load_run_config(tmp_path),
                                     c) == []


def test_the_run_dir_writes_and_reads_its_config_file(tmp_path):
  c = _config(**{"optim.lr": 3e-4})
  run_dir.write_config(tmp_path / "run", c)
  saved, path = run_dir.read_config(tmp_path / "run")
  assert path == str(tmp_path / "run" / run_dir.CONFIG_FILE)
  assert saved["optim"]["lr"] == 3e-4 and saved["model"]["mode"] == "hyp"
  with pytest.raises(FileNotFoundError, match="a training run directory"):
    run_dir.read_config(tmp_path)
  (tmp_path / run_dir.CONFIG_FILE).write_text('{"model": {')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    config_lib.load_run_config(tmp_path)
  assert config_lib.CONFIG_FILE == run_dir.CONFIG_FILE


@pytest.mark.parametrize("value", [-1, 78, True, "32", 32.0])
def test_a_bad_context_length_is_named(value):
  c = _config(**{"model.clip": "", "model.size": "tiny",
                 "data.name": "synthetic_visu"})
  with c.ignore_type():
    c.model.context_length = value
  with pytest.raises(ValueError, match="model.context_length"):
    config_lib.check_config(c)


def test_a_pretrained_clip_keeps_its_own_context_length(tmp_path):
  """A pretrained tower has learned exactly its positions: another length
  is refused by name, its own (or 0) is taken."""
  from hysac_jax import pretrained
  import tiny_runs
  source = tiny_runs.save_converted(tmp_path / "clip", seed=0,
                                    lora_b_scale=0.0, curv=1.0, alpha=0.5)
  c = _config(**{"model.clip": str(source), "model.size": "tiny"})
  own = pretrained.model_from_config(c).clip.text.max_position_embeddings
  c.model.context_length = own - 1
  with pytest.raises(ValueError, match=rf"model.context_length={own - 1}.* "
                                       rf"{own} text positions"):
    pretrained.model_from_config(c)
  c.model.context_length = own
  assert pretrained.model_from_config(
      c).clip.text.max_position_embeddings == own


def test_context_length_sets_the_text_positions_of_a_random_tower():
  from hysac_jax import pretrained
  for length, want in ((0, 77), (77, 77), (32, 32)):
    c = _config(**{"model.clip": "", "model.size": "tiny",
                   "model.context_length": length,
                   "data.name": "synthetic_visu"})
    config_lib.check_config(c)
    text = pretrained.model_from_config(c).clip.text
    assert text.max_position_embeddings == want


def test_context_length_defines_the_run():
  conflicts = config_lib.resume_conflicts(
      _config(), _config(**{"model.context_length": 32}))
  assert len(conflicts) == 1 and "model.context_length" in conflicts[0]
