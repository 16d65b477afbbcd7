"""HySAC on ViSU with CLIP ViT-L/14: the paper recipe (SPEC.md §2-3).

  python train.py --config configs/vitl14.py --workdir runs/vitl14 \
      --config.data.manual_dir=/data/visu

Every field, its default and its meaning are declared once, in
`hysac_jax.config.base_config`, whose values are this recipe.
"""

from hysac_jax import config as config_lib


def get_config():
  return config_lib.base_config()
