"""Moved: the release format's reader and writer are `hysac_jax.formats.release`.

Kept so that `from hysac_jax import release_format` keeps working.
"""

from hysac_jax.formats.release import (  # pylint: disable=unused-import
    BOUNDS_FILE, CLIP_DIR, HEAD_KEYS, MODEL_FILE, PIXEL_MEAN, PIXEL_STD,
    RELEASE_LORA, ReleaseFormatError, base_clip_params, check_lora,
    check_source, clamped_head, export_release, release_key,
    release_state_dict, with_release_lora)
