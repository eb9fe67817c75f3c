"""mxmask: Mask R-CNN and Keypoint R-CNN with FPN for MXNet/Gluon."""
__version__ = "0.1.0"

from .config import get_config, load_yaml, dump_yaml, ConfigError  # noqa: F401
