"""Moved: the OpenCLIP format's reader is `hysac_jax.formats.openclip`.

Kept so that `from hysac_jax import openclip_import` keeps working.
"""

from hysac_jax.formats.openclip import (  # pylint: disable=unused-import
    HUB_CONFIG_FILE, OPENAI_MEAN, OPENAI_STD, OpenCLIPConfigError,
    OpenCLIPModel, bundled_config_path, config_from_openclip,
    convert_openclip, key_map, load_state, params_from_openclip_state,
    read_config)
