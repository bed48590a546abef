"""Cloud and edge nets of the AFLKD paper, as ordered lists of named layers."""
from .checkpoint import load_weights, save_atomic
from .vgg import NET_NAMES, build_net, cloud_net, edge_net, randomize_batchnorm
from .zoo import build_model, check_model_name

__all__ = ["NET_NAMES", "build_net", "build_model", "check_model_name", "cloud_net", "edge_net", "randomize_batchnorm", "load_weights", "save_atomic"]
