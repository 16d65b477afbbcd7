"""Reading an input file: regular files only, with a size cap.

Every image, caption or prompt file a tool reads goes through `read_bytes`
(or `read_text`), so a FIFO, socket or device named like an image never
blocks a run (opening a FIFO for reading waits for a writer), and a huge
file is refused before it is read into memory.

The file is opened with O_NONBLOCK and checked with `fstat` on the open
descriptor, so the check and the read see the same file.
"""

import os
import stat

MIB = 1 << 20
# An image file over this is refused: PIL's decompression-bomb limit (about
# 179 M pixels) already bounds what a smaller file may decode to.
MAX_IMAGE_BYTES = 256 * MIB
# A caption, prompt or pool file over this is refused (COCO's
# captions_train2017.json is 91 MB, Karpathy's dataset_coco.json 140 MB).
MAX_TEXT_BYTES = 1024 * MIB


class NotRegularFileError(OSError):
  """A FIFO, socket, device (or directory) where a file is expected."""


class FileTooLargeError(OSError):
  """A file over its cap."""


def _kind(mode):
  for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device")):
    if test(mode):
      return name
  return "not a regular file"


def _check_mode(mode, path, what):
  if stat.S_ISDIR(mode):
    raise IsADirectoryError(f"{what} {path} is a directory")
  if not stat.S_ISREG(mode):
    raise NotRegularFileError(
        f"{what} {path} is {_kind(mode)}, not a regular file")


def read_bytes(path, max_bytes, what="file") -> bytes:
  """The bytes of a regular file of at most `max_bytes`.

  Args:
    path: the file.
    max_bytes: the cap.
    what: what the file is ("image", "caption file"), for messages.

  Raises:
    FileNotFoundError: a missing file; IsADirectoryError: a directory;
    NotRegularFileError: a FIFO, socket or device; FileTooLargeError: a file
    over the cap. Each message names the file.
  """
  path = os.fspath(path)
  # Checked before the open too: opening a socket fails with a bare ENXIO.
  _check_mode(os.stat(path).st_mode, path, what)
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  try:
    _check_mode(os.fstat(fd).st_mode, path, what)
    chunks, size = [], 0
    # Read up to one byte past the cap, so a file growing meanwhile is
    # caught too.
    while size <= max_bytes:
      chunk = os.read(fd, min(max_bytes + 1 - size, 16 * MIB))
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
    if size > max_bytes:
      raise FileTooLargeError(
          f"{what} {path} is over the cap of {max_bytes / MIB:g} MiB")
    return b"".join(chunks)
  finally:
    os.close(fd)


def read_text(path, max_bytes=MAX_TEXT_BYTES, what="file") -> str:
  """`read_bytes` decoded as UTF-8 (ValueError naming the file if not)."""
  data = read_bytes(path, max_bytes, what)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{what} {os.fspath(path)} is not UTF-8 text: "
                     f"{e}") from None
