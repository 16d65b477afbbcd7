"""The CLIP tokenizer, offline by default.

With no argument, `load_tokenizer` builds the OpenAI CLIP byte-pair tokenizer
from the vocabulary shipped in `hysac_jax/data/assets` (MIT, see
LICENSE-CLIP-BPE there), so nothing is downloaded. A local directory or a hub
id is handed to `transformers.CLIPTokenizer.from_pretrained`.
"""

import functools
import gzip
import os
import re

import importlib_resources
import numpy as np

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The OpenAI vocabulary keeps the first 49152 - 256 - 2 merges of the file.
_NUM_MERGES = 49152 - 256 - 2


def _byte_alphabet():
  """The byte -> printable character table of GPT-2 style BPE, in vocab order.

  Printable Latin-1 bytes map to themselves and come first; the other bytes
  follow, shifted past 255 so that every byte has a visible character.
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + i) for i, b in enumerate(others)})
  return table


def _vocab_and_merges():
  """Builds the 49408-entry vocabulary and the merge list from the BPE file."""
  path = importlib_resources.files("hysac_jax.data") / "assets" / BPE_FILE
  with importlib_resources.as_file(path) as p, gzip.open(p, "rt",
                                                         encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
  chars = list(_byte_alphabet().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  tokens += [BOS, EOS]
  return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path=None):
  """Returns a `transformers.CLIPTokenizer`.

  Args:
    name_or_path: None for the bundled OpenAI CLIP vocabulary (offline), or a
      local tokenizer directory, or a Hugging Face hub id.
  """
  # transformers takes seconds to import: only when a tokenizer is built.
  from transformers import CLIPTokenizer
  if name_or_path is None:
    vocab, merges = _vocab_and_merges()
    # `vocab=`/`merges=`: the `vocab_file=` route silently builds a broken
    # tokenizer in transformers 5.
    return _quiet(CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS,
                                bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                model_max_length=CONTEXT_LENGTH))
  where = ("local directory" if os.path.isdir(name_or_path)
           else "hub id (or missing local path)")
  try:
    tok = CLIPTokenizer.from_pretrained(name_or_path)
  except OSError as e:
    raise OSError(f"could not load a CLIP tokenizer from {where} "
                  f"{name_or_path!r}: {e}") from e
  # transformers 5 returns a near-empty tokenizer instead of failing when the
  # vocabulary files are missing; refuse it rather than emit garbage ids.
  if len(tok) < 1000 or tok.eos_token_id is None:
    raise OSError(
        f"could not load a CLIP tokenizer from {where} {name_or_path!r}: "
        f"it has {len(tok)} tokens (no vocab.json/merges.txt or "
        "tokenizer.json found). Pass None for the bundled offline vocabulary.")
  return _quiet(tok)


# transformers' key for its one-time "Token indices sequence length is longer
# than the specified maximum ... will result in indexing errors" warning.
_TOO_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def _quiet(tok):
  """Marks the too-long warning as already given: it is false here, since
  `tokenize` truncates and a bare call only counts tokens (predict's
  "truncated")."""
  tok.deprecation_warnings[_TOO_LONG_WARNING] = True
  return tok


_WORD = re.compile(r"\S+")


def _leading_words(text, max_len):
  """`text` cut after its first `max_len` whitespace-separated words.

  Every word gives at least one token, and the tokenizer splits at
  whitespace before BPE, so the first `max_len` tokens are unchanged; a
  10,000-word caption is no longer tokenised whole before the truncation
  (time and memory grew with the caption file's size, not its count).
  """
  for i, match in enumerate(_WORD.finditer(text)):
    if i == max_len:
      return text[:match.start()]
  return text


def tokenize(texts, max_len=CONTEXT_LENGTH, tokenizer=None):
  """Token ids as the release makes them (padding='max_length').

  Args:
    texts: a string or a sequence of strings.
    max_len: context length; longer captions are truncated so that the
      end-of-text token stays last.
    tokenizer: a tokenizer from `load_tokenizer`; the bundled one if None.

  Returns:
    int32 array (N, max_len), padded with the tokenizer's pad id.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = [_leading_words(t, max_len) for t in texts]
  tok = tokenizer if tokenizer is not None else load_tokenizer()
  out = tok(texts, padding="max_length", truncation=True, max_length=max_len,
            return_attention_mask=False)
  ids = np.asarray(out["input_ids"], dtype=np.int32).reshape(len(texts),
                                                             max_len)
  return ids
