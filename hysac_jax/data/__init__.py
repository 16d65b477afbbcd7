"""Datasets, preprocessing and the input pipeline.

- `build`: `build_dataset(name, data_dir, manual_dir, **kwargs)` for the TFDS
  builders `synthetic_visu` (`synthetic`), `visu` (`visu`), `visu_text`
  (`visu_text`); bad records handled by `bad_input`; features in `schema`.
- `preprocess`: CLIP image preprocessing (matches the slow HF processor).
- `pipeline`: grain batches, `make_dataset(config.data, split, image_size)`.
- `tokenizer`: the offline CLIP tokenizer.
"""
