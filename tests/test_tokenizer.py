"""The offline CLIP tokenizer against known OpenAI CLIP ids."""

import numpy as np
import pytest

from hysac_jax.data import tokenizer as tok_lib

BOS, EOS = 49406, 49407


def test_known_ids_for_a_photo_of_a_cat():
  ids = tok_lib.tokenize("a photo of a cat")
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  np.testing.assert_array_equal(ids[0, :7],
                                [49406, 320, 1125, 539, 320, 2368, 49407])


def test_vocabulary_has_openai_size_and_specials():
  tok = tok_lib.load_tokenizer()
  assert len(tok) == 49408
  assert tok.convert_tokens_to_ids("<|startoftext|>") == BOS
  assert tok.convert_tokens_to_ids("<|endoftext|>") == EOS


def test_padding_is_max_length_with_end_of_text():
  ids = tok_lib.tokenize(["a photo of a cat", "dog"])
  assert ids.shape == (2, 77)
  # The release pads with the pad token of openai/clip-*, i.e. <|endoftext|>.
  assert (ids[0, 7:] == EOS).all()
  np.testing.assert_array_equal(ids[1, :3], [BOS, 1929, EOS])


def test_long_caption_is_truncated_keeping_end_of_text_last():
  caption = " ".join(["photo"] * 200)
  ids = tok_lib.tokenize([caption])[0]
  assert ids[0] == BOS and ids[-1] == EOS
  # 75 content tokens fit between the two specials.
  assert (ids[1:-1] == 1125).all()


def test_lowercases_and_splits_punctuation_like_clip():
  a = tok_lib.tokenize("A Photo, of a CAT!")[0]
  b = tok_lib.tokenize("a photo , of a cat !")[0]
  np.testing.assert_array_equal(a, b)


def test_roundtrip_through_a_saved_directory(tmp_path):
  tok = tok_lib.load_tokenizer()
  tok.save_pretrained(tmp_path)
  loaded = tok_lib.load_tokenizer(str(tmp_path))
  texts = ["a photo of a cat", "two dogs on a red sofa, at night"]
  np.testing.assert_array_equal(tok_lib.tokenize(texts, tokenizer=loaded),
                                tok_lib.tokenize(texts))


def test_unknown_hub_id_offline_gives_a_clear_error():
  with pytest.raises(OSError, match="could not load a CLIP tokenizer"):
    tok_lib.load_tokenizer("no-such-org/no-such-tokenizer")


def test_a_long_caption_gives_no_false_indexing_errors_warning(capfd,
                                                               caplog):
  # We truncate (tokenize) or only count (predict's "truncated"), so
  # transformers' "will result in indexing errors" would be false.
  text = " ".join(["cat"] * 10000)
  assert len(tok_lib.load_tokenizer()(text)["input_ids"]) > 77
  assert tok_lib.tokenize(text).shape == (1, 77)
  assert "indexing errors" not in capfd.readouterr().err + caplog.text


def test_a_long_caption_is_cut_to_its_leading_words_before_tokenizing():
  # Work per caption is bounded by the context length, not the caption's
  # size (a 40 MB caption file took 107 s and 3.2 GB), and the ids are
  # those of the whole caption, truncated.
  tok = tok_lib.load_tokenizer()
  seen = []

  def recording(texts, **kwargs):
    seen.extend(texts)
    return tok(texts, **kwargs)

  text = "A dog,  on a\nbeach. " * 2500
  ids = tok_lib.tokenize([text, "a cat"], tokenizer=recording)
  assert max(len(t.split()) for t in seen) <= 77
  whole = tok([text, "a cat"], padding="max_length", truncation=True,
              max_length=77)["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(whole, np.int32))
