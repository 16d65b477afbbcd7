"""Tests of hysac_jax.losses against float64 NumPy from SPEC.md's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hysac_jax import config as config_lib
from hysac_jax import losses

CURV, SCALE = 1.3, 12.0


def loss_config(**overrides):
  """`config.loss` of the base schema (weights 1, global negatives)."""
  c = config_lib.base_config().loss
  c.update(overrides)
  return c


# ----------------------------------------------------------- references ---


def np_time(x, c):
  return np.sqrt(1 / c + np.sum(x * x, -1))


def np_pairwise_dist(x, y, c):
  inner = x @ y.T - np_time(x, c)[:, None] * np_time(y, c)[None, :]
  return np.arccosh(np.maximum(-c * inner, 1 + 1e-8)) / np.sqrt(c)


def np_entailment_energy(x, y, c, s=1.0, k=0.1, eps=1e-5):
  norm_x = np.linalg.norm(x, axis=-1)
  aperture = np.arcsin(np.clip(2 * k / (np.sqrt(c) * norm_x + eps),
                               -1 + eps, 1 - eps))
  x_t, y_t = np_time(x, c), np_time(y, c)
  ell = c * (np.sum(x * y, -1) - x_t * y_t)
  ratio = (y_t + ell * x_t) / (norm_x * np.sqrt(np.maximum(ell**2 - 1, eps))
                               + eps)
  angle = np.arccos(np.clip(ratio, -1 + eps, 1 - eps))
  return np.maximum(0.0, angle - s * aperture)


def np_log_softmax_ce(logits):
  """Cross-entropy of each row of logits with the diagonal as target."""
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
  return lse - np.diag(logits)


def np_info_nce(logits):
  return 0.5 * (np_log_softmax_ce(logits).mean()
                + np_log_softmax_ce(logits.T).mean())


def np_contrastive(t, v, c, scale):
  return np_info_nce(-scale * np_pairwise_dist(t, v, c))


def np_clip_loss(t, v, scale):
  t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  v = v / np.linalg.norm(v, axis=-1, keepdims=True)
  return np_info_nce(scale * t @ v.T)


def random_points(seed, n=6, d=8, count=4):
  """Space components with norms spread over (0.1, 3): cones both hold and miss."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    x = rng.normal(size=(n, d))
    x *= rng.uniform(0.1, 3.0, size=(n, 1)) / np.linalg.norm(x, axis=-1,
                                                              keepdims=True)
    out.append(x)
  return out


# ---------------------------------------------------------------- tests ---


def test_contrastive_loss_matches_float64_numpy():
  t, v = random_points(0, count=2)
  got = losses.contrastive_loss(jnp.float32(t), jnp.float32(v), CURV, SCALE)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_contrastive(t, v, CURV, SCALE),
                             rtol=2e-5, atol=2e-5)


def test_entailment_loss_matches_float64_numpy():
  x, y = random_points(1, n=32, count=2)
  # Half of the children sit just beyond their parent, inside its cone.
  y[:16] = 1.8 * x[:16] + 0.01 * y[:16]
  energy = np_entailment_energy(x, y, CURV, s=0.7)
  assert 0 < np.count_nonzero(energy) < len(energy)  # both cases covered
  got = losses.entailment_loss(jnp.float32(x), jnp.float32(y), CURV,
                               aperture_scale=0.7)
  np.testing.assert_allclose(got, energy.mean(), rtol=1e-4, atol=1e-5)


def test_hysac_loss_terms_and_release_weighting_match_numpy():
  S, U, V, G = random_points(2)
  lam = 0.5
  total, terms = losses.hysac_loss(
      *map(jnp.float32, (S, U, V, G)), CURV, SCALE,
      loss_config(entail_weight=lam))
  expected = {
      "contrastive_safe": np_contrastive(S, V, CURV, SCALE),
      "contrastive_unsafe": np_contrastive(U, G, CURV, SCALE),
      "contrastive_cross_a": np_contrastive(S, G, CURV, SCALE),
      "contrastive_cross_b": np_contrastive(U, V, CURV, SCALE),
      "entail_safe": np_entailment_energy(S, V, CURV).mean(),
      "entail_unsafe": np_entailment_energy(U, G, CURV).mean(),
      "entail_d": np_entailment_energy(V, U, CURV).mean(),
  }
  assert tuple(terms) == losses.TERM_NAMES
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=1e-4, atol=1e-5,
                               err_msg=name)
  w = np.array([1, 1, 1, 1, lam, lam, lam])
  values = np.array([expected[k] for k in losses.TERM_NAMES])
  np.testing.assert_allclose(total, (w / w.sum()) @ values / 7, rtol=1e-4)


def test_local_negatives_average_per_group_losses():
  S, U, V, G = random_points(3, n=8)
  config = loss_config(local_negatives=True)
  _, terms = losses.hysac_loss(*map(jnp.float32, (S, U, V, G)), CURV, SCALE,
                               config, num_groups=2)
  groups = [slice(0, 4), slice(4, 8)]
  expected = np.mean([np_contrastive(S[g], V[g], CURV, SCALE) for g in groups])
  np.testing.assert_allclose(terms["contrastive_safe"], expected, rtol=2e-5)
  # Entailment is per pair: grouping does not change it.
  np.testing.assert_allclose(terms["entail_d"],
                             np_entailment_energy(V, U, CURV).mean(),
                             rtol=1e-4, atol=1e-5)
  # Without local_negatives, num_groups is ignored (global negatives).
  _, global_terms = losses.hysac_loss(*map(jnp.float32, (S, U, V, G)), CURV,
                                      SCALE, loss_config(), num_groups=2)
  np.testing.assert_allclose(global_terms["contrastive_safe"],
                             np_contrastive(S, V, CURV, SCALE), rtol=2e-5)


def test_masked_rows_are_neither_queries_nor_negatives():
  S, U, V, G = random_points(4, n=8)
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
  garbage = [np.where(mask[:, None], x, 50.0) for x in (S, U, V, G)]
  total, terms = losses.hysac_loss(*map(jnp.float32, garbage), CURV, SCALE,
                                   loss_config(), mask=jnp.asarray(mask))
  ref_total, ref_terms = losses.hysac_loss(
      *(jnp.float32(x[mask]) for x in (S, U, V, G)), CURV, SCALE, loss_config())
  for name in losses.TERM_NAMES:
    np.testing.assert_allclose(terms[name], ref_terms[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def test_euc_mode_is_the_clip_loss():
  S, U, V, G = random_points(5)
  total, terms = losses.hysac_loss(*map(jnp.float32, (S, U, V, G)), None,
                                   SCALE, loss_config(), mode="euc")
  pairs = {"contrastive_safe": (S, V), "contrastive_unsafe": (U, G),
           "contrastive_cross_a": (S, G), "contrastive_cross_b": (U, V)}
  expected = {k: np_clip_loss(t, v, SCALE) for k, (t, v) in pairs.items()}
  for name, value in expected.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-5, err_msg=name)
  for name in losses.TERM_NAMES[4:]:
    assert float(terms[name]) == 0.0
  np.testing.assert_allclose(total, np.mean(list(expected.values())),
                             rtol=2e-5)


def test_unknown_mode_is_rejected_with_the_config_field_named():
  S, U, V, G = map(jnp.float32, random_points(6))
  with pytest.raises(ValueError, match="config.model.mode"):
    losses.hysac_loss(S, U, V, G, CURV, SCALE, loss_config(), mode="sph")


def test_local_negatives_need_equal_groups():
  S, U, V, G = map(jnp.float32, random_points(7, n=6))
  with pytest.raises(ValueError, match="local_negatives"):
    losses.hysac_loss(S, U, V, G, CURV, SCALE,
                      loss_config(local_negatives=True), num_groups=4)


def test_bfloat16_embeddings_give_a_float32_loss():
  S, U, V, G = random_points(8)
  total, _ = losses.hysac_loss(*(jnp.asarray(x, jnp.bfloat16)
                                 for x in (S, U, V, G)), CURV, SCALE,
                               loss_config())
  ref, _ = losses.hysac_loss(*(jnp.asarray(jnp.asarray(x, jnp.bfloat16),
                                           jnp.float32)
                               for x in (S, U, V, G)), CURV, SCALE,
                             loss_config())
  assert total.dtype == jnp.float32
  np.testing.assert_allclose(total, ref, rtol=1e-6)


def test_total_gradient_matches_finite_differences_in_float64():
  """d total / d (S, U, V, G, curv, logit_scale) along random directions."""
  S, U, V, G = random_points(9, n=5, d=6)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x, jnp.float64) for x in (S, U, V, G)) + (
        jnp.float64(CURV), jnp.float64(SCALE))

    @jax.jit
    def total(*a):
      return losses.hysac_loss(*a, config=loss_config(entail_weight=0.8,
                                                aperture_scale=0.9))[0]

    grads = jax.jit(jax.grad(total, argnums=tuple(range(6))))(*args)
    rng = np.random.default_rng(0)
    h = 1e-6
    for _ in range(3):
      direction = [rng.normal(size=np.shape(a)) for a in args]
      plus = [a + h * d for a, d in zip(args, direction)]
      minus = [a - h * d for a, d in zip(args, direction)]
      fd = (float(total(*plus)) - float(total(*minus))) / (2 * h)
      analytic = sum(float(np.sum(np.asarray(g) * d))
                     for g, d in zip(grads, direction))
      np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-8)
    # Each argument's own gradient is checked too, so none can hide.
    for i, (a, g) in enumerate(zip(args, grads)):
      d = rng.normal(size=np.shape(a))
      shifted = list(args)
      shifted[i] = a + h * d
      up = float(total(*shifted))
      shifted[i] = a - h * d
      fd = (up - float(total(*shifted))) / (2 * h)
      np.testing.assert_allclose(float(np.sum(np.asarray(g) * d)), fd,
                                 rtol=1e-5, atol=1e-8, err_msg=f"arg {i}")
