"""RT-DETRv4 detector: model, configs, checkpoints, deploy/export, losses, DSI and GAM."""
from .checkpoint import LoadReport, detector_from_checkpoint, load_checkpoint, save_checkpoint
from .config import SIZES, DetectorConfig, get_config
from .model import RTDETRv4, build_detector

__all__ = ["SIZES", "DetectorConfig", "get_config", "RTDETRv4", "build_detector", "load_checkpoint",
           "save_checkpoint", "LoadReport", "detector_from_checkpoint"]
