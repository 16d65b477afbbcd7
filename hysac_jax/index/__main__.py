"""Build and search a gallery index from the command line.

    python -m hysac_jax.index build --model M --images DIR_OR_TFDS --out IDX
        [--captions FILE instead of --images] [--split test] [--bounds F]
        [--traversal-alpha A] [--shard-size 2048] [--approx auto|hnsw|ivf|none]
        [--overwrite]
    python -m hysac_jax.index search --index IDX [--model M]
        --text "..." | --image a.jpg  [--top-k 5]
        [--traversal none|release|geodesic] [--safe-only]
        [--backend exact|approx]

`build` embeds the gallery on every local device under a progress bar and
writes shards as it goes: rerun the same command after an interruption and
it resumes. `search` prints one JSON line per query in the format of
`python -m hysac_jax.predict` (it runs predict with `--index`); `--model`,
`--bounds` and `--traversal-alpha` default to those the index was built
with, and a query model other than that one is refused.

Exit codes (`hysac_jax.cli`): 0 done; 1 an expected failure (a missing or
corrupt index or shard, a model other than the index's, an empty or
missing gallery, a partial build of another model): one line
`PROG: error: ...`; 2 bad flags; 3 (search) some queries answered with an
error record; 130 interrupted (a build resumes when rerun).
"""

import argparse
import os
import sys

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import finite
from hysac_jax import outdir
from hysac_jax import predict
from hysac_jax import serving
from hysac_jax.formats import gallery
from hysac_jax.index import backends
from hysac_jax.index import build as build_lib

PROG = "python -m hysac_jax.index"
BUILD_PROG = f"{PROG} build"
SEARCH_PROG = f"{PROG} search"


def _build_parser():
  parser = argparse.ArgumentParser(
      prog=BUILD_PROG,
      description="Embed a gallery (images or captions) into a resumable "
                  "Lorentz-distance index with unsafe flags.")
  parser.add_argument("--model", required=True,
                      help="export, training run or converted directory")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="a directory of images (searched "
                      "recursively), or a TFDS dataset name or directory")
  source.add_argument("--captions", help="a caption file, one a line")
  parser.add_argument("--split", default="test",
                      help="the split of a TFDS --images (default test)")
  parser.add_argument("--out", required=True, help="the index directory")
  parser.add_argument("--bounds", default=None,
                      help="bounds JSON (default: the model's own)")
  parser.add_argument("--traversal-alpha", type=float, default=None,
                      help="alpha of b' (default: the model's own)")
  parser.add_argument("--checkpoint", default=ckpt_lib.BEST_RECALL,
                      choices=ckpt_lib.KINDS,
                      help="which checkpoint of a training run")
  parser.add_argument("--shard-size", type=int,
                      default=build_lib.SHARD_SIZE,
                      help="source items per shard (default %(default)s)")
  parser.add_argument("--approx", default="auto",
                      choices=backends.APPROX_KINDS,
                      help="the FAISS structure: auto (HNSW up to "
                           f"{backends.HNSW_MAX} items, else IVF), hnsw, ivf "
                           "or none")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing index at --out")
  parser.add_argument("--quiet", action="store_true",
                      help="no progress bar")
  return parser


def _load_model(args):
  try:
    return serving.load_model(args.model, bounds_path=args.bounds,
                              checkpoint=args.checkpoint,
                              traversal_alpha=args.traversal_alpha)
  except predict.MODEL_ERRORS as e:
    raise cli.CLIError(str(e)) from None


def run_build(argv):
  """`build`: returns the exit code."""
  parser = _build_parser()
  args = parser.parse_args(argv)
  if args.shard_size < 1:
    parser.error("--shard-size must be at least 1")
  predict.check_alpha_flag(parser, args.traversal_alpha)
  # Before the model loads: a bad --out fails in a second.
  outdir.check(args.out, args.overwrite, "--out")
  model = _load_model(args)
  try:
    manifest = build_lib.build(
        model, args.out, images=args.images, captions=args.captions,
        split=args.split, shard_size=args.shard_size, approx=args.approx,
        overwrite=args.overwrite, progress_bar=not args.quiet,
        build_args={"model": os.path.abspath(args.model),
                    "bounds": args.bounds and os.path.abspath(args.bounds),
                    "traversal_alpha": args.traversal_alpha,
                    "checkpoint": args.checkpoint})
  except KeyboardInterrupt:
    work = gallery.building_dir(args.out)
    done = len(gallery.done_shards(work)) if os.path.isdir(work) else 0
    raise cli.CLIError(f"interrupted: {done} shard(s) kept in {work}; rerun "
                       "the same command to resume", cli.EXIT_INTERRUPTED
                       ) from None
  print(finite.dumps({"index": args.out, "count": manifest["count"],
                      "modality": manifest["modality"],
                      "skipped": len(manifest["skipped"]),
                      "approx": manifest["approx"]}))
  return cli.EXIT_OK


def run_search(argv):
  """`search`: predict with --index, the model defaulting to the index's."""
  peek = argparse.ArgumentParser(prog=SEARCH_PROG, add_help=False)
  for flag in ("--index", "--model", "--bounds", "--traversal-alpha"):
    peek.add_argument(flag, default=None)
  known, _ = peek.parse_known_args(argv)
  if known.index is None:
    if any(a in ("-h", "--help") for a in argv):
      return predict.main(list(argv), prog=SEARCH_PROG)
    return cli.fail(SEARCH_PROG, "the following arguments are required: "
                    "--index", cli.EXIT_USAGE)
  argv = list(argv)
  if known.model is None:
    made = gallery.read_manifest(known.index).get("build_args") or {}
    if not made.get("model"):
      raise cli.CLIError(f"index {known.index} does not say which model "
                         "built it: pass --model")
    argv += ["--model", made["model"], "--checkpoint",
             made.get("checkpoint") or ckpt_lib.BEST_RECALL]
    if known.bounds is None and made.get("bounds"):
      argv += ["--bounds", made["bounds"]]
    if known.traversal_alpha is None and made.get("traversal_alpha") is not (
        None):
      argv += ["--traversal-alpha", str(made["traversal_alpha"])]
  return predict.main(argv, prog=SEARCH_PROG)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  commands = {"build": (BUILD_PROG, run_build),
              "search": (SEARCH_PROG, run_search)}
  if not argv or argv[0] not in commands:
    if argv and argv[0] in ("-h", "--help"):
      print(__doc__)
      return cli.EXIT_OK
    return cli.fail(PROG, "expected a command: build or search (--help "
                    "for both)", cli.EXIT_USAGE)
  prog, command = commands[argv[0]]
  return cli.run_guarded(
      prog, command, argv[1:],
      expected=(build_lib.BuildError, gallery.GalleryError,
                outdir.OutputExistsError, finite.NonFiniteError, OSError))


if __name__ == "__main__":
  sys.exit(main())
