"""Tests for hysac_jax/input_file.py: regular files only, bounded reads."""

import os
import socket

import pytest

from hysac_jax import input_file
from hysac_jax import predict
from hysac_jax.data import bad_input
from hysac_jax.data import labelled_images


def test_a_regular_file_is_read_whole(tmp_path):
  path = tmp_path / "a.jpg"
  path.write_bytes(b"x" * 1000)
  assert input_file.read_bytes(path, 1000, "image") == b"x" * 1000


def test_a_fifo_is_refused_at_once_naming_it(tmp_path):
  fifo = tmp_path / "fifo.jpg"
  os.mkfifo(fifo)
  # Opening a FIFO for reading without O_NONBLOCK would block here forever.
  with pytest.raises(input_file.NotRegularFileError,
                     match=f"image {fifo} is a FIFO, not a regular file"):
    input_file.read_bytes(fifo, input_file.MAX_IMAGE_BYTES, "image")


def test_a_socket_and_a_device_are_refused(tmp_path):
  path = tmp_path / "s.jpg"
  sock = socket.socket(socket.AF_UNIX)
  sock.bind(str(path))
  try:
    with pytest.raises(OSError, match="is a socket"):
      input_file.read_bytes(path, 10, "image")
  finally:
    sock.close()
  with pytest.raises(input_file.NotRegularFileError,
                     match="/dev/zero is a character device"):
    input_file.read_bytes("/dev/zero", 10, "image")


def test_a_file_over_the_cap_is_refused_naming_it_and_the_cap(tmp_path):
  path = tmp_path / "big.json"
  path.write_bytes(b"x" * (2 * input_file.MIB + 1))
  with pytest.raises(input_file.FileTooLargeError,
                     match=f"caption file {path} is over the cap of 2 MiB"):
    input_file.read_bytes(path, 2 * input_file.MIB, "caption file")


def test_every_image_reader_refuses_a_fifo_without_blocking(tmp_path):
  fifo = tmp_path / "fifo.jpg"
  os.mkfifo(fifo)
  with pytest.raises(predict.InputError, match="is a FIFO"):
    predict.read_image(str(fifo), 32)
  with pytest.raises(labelled_images.UnreadableImage,
                     match=f"unreadable image {fifo}: .*is a FIFO"):
    labelled_images.read_file(str(fifo))
  data, reason = bad_input.read_image_bytes(fifo)
  assert data is None and "is a FIFO" in reason


def test_a_fifo_in_a_class_folder_is_an_unreadable_image(tmp_path):
  (tmp_path / "cat").mkdir()
  os.mkfifo(tmp_path / "cat" / "fifo.jpg")
  image_set = labelled_images.from_folder(tmp_path)
  with pytest.raises(labelled_images.UnreadableImage, match="is a FIFO"):
    image_set.load(0, 32)
