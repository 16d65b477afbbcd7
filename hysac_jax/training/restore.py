"""A run's train state from its checkpoints: the model is built here, above
the store.

`hysac_jax.checkpoint` stores and returns pytrees; this module builds the
run's model and state from its config (`pretrained`, `training.step`) and
puts the restored trainable params into it. `restore_run` is the
restore-for-eval of `serving.load_model`, `export` and `eval.py`.
"""

import os

import jax

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import config as config_lib
from hysac_jax import pretrained
from hysac_jax.training import step as step_lib


def state_tree(state, rng):
  """What a checkpoint stores of a TrainState: the trainable part (frozen
  weights are rebuilt from the config), optimizer state, step and RNG key."""
  # The key is placed like the (replicated) step: on several processes
  # Orbax writes only global arrays, not a host-local one.
  rng_data = jax.device_put(jax.random.key_data(rng), state.step.sharding)
  return {"trainable": state.trainable(),
          "opt_state": state.opt_state, "step": state.step,
          "rng": rng_data}


def apply_state_tree(state, tree):
  """`state` with the trainable params, optimizer state and step of `tree`."""
  params = step_lib.merge_params(state.params, tree["trainable"])
  return state.replace(params=params, opt_state=tree["opt_state"],
                       step=tree["step"])


def restore_run(workdir, kind=ckpt_lib.BEST_RECALL, config=None):
  """(config, state) of a training run's `kind` checkpoint, read-only.

  Falls back to the latest checkpoint when the run has no `kind` one. The
  frozen weights are rebuilt as the run built them (`initial_params`), the
  trainable ones restored.

  Args:
    workdir: the run directory.
    kind: BEST_RECALL, BEST_LOSS or LAST (`checkpoint.KINDS`).
    config: the run's config; default its saved config.json.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if config is None:
    config = config_lib.load_run_config(workdir)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  # A restored run is evaluated or exported, never stepped: its schedule's
  # length shapes no state leaf, but a warm-up-cosine schedule needs one
  # longer than its warm-up to be built at all.
  state = step_lib.create_train_state(
      config, init_key, pretrained.initial_params(config),
      total_steps=int(config.optim.warmup_steps) + 1)
  # Read-only: evaluating or exporting a run creates nothing in it.
  checkpoints = ckpt_lib.RunCheckpoints(workdir, config.train.keep_last,
                                        read_only=True)
  try:
    restored = restore_into(checkpoints, state, step_key, kind)
  finally:
    checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir} (looked in "
                            f"{kind}/ and {ckpt_lib.LAST}/)")
  return config, restored


def restore_into(checkpoints, state, step_key, kind=ckpt_lib.BEST_RECALL):
  """`state` with the trainable params (and optimizer state) of the newest
  `kind` checkpoint of `checkpoints`, else of the latest one; None when the
  run has neither."""
  if checkpoints.latest_step(kind) is None:
    kind = ckpt_lib.LAST
  restored = checkpoints.restore(state_tree(state, step_key), kind=kind)
  return None if restored is None else apply_state_tree(state, restored[0])
