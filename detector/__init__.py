"""RT-DETRv4 detector: model, configs, checkpoints, losses, DSI and GAM."""
from .config import SIZES, DetectorConfig, get_config
from .model import RTDETRv4, build_detector

__all__ = ["SIZES", "DetectorConfig", "get_config", "RTDETRv4", "build_detector"]
