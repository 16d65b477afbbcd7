"""HySAC on ViSU with CLIP ViT-B/16: the paper recipe on a smaller backbone."""

from configs import vitl14


def get_config():
  c = vitl14.get_config()
  c.model.size = "vitb16"
  c.model.clip = "openai/clip-vit-base-patch16"
  return c
