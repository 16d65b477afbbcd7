"""On-disk formats: one module per format, each with its reader and writer.

A format module knows the files of one format (names, layouts, tags) and
turns them into NumPy params and configs and back. It holds no CLI and
imports nothing above it: only `hysac_jax.models`, the geometry
(`hysac_jax.lorentz`), generic IO (`finite`, `outdir`, `input_file`) and
other format modules. Serving, training, evaluation and the tools
(`convert`, `export`) import the formats, never the other way round.

- `torch_state`: PyTorch state dicts: key names, the layout transforms both
  ways, the one `.pt` / `.bin` reader, a key preview for errors.
- `hf_clip`: the Hugging Face `CLIPModel` directory (its writer).
"""
