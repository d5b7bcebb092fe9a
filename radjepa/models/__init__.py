"""Encoder and predictor networks (timm-based ViTs with fixed sin-cos positions)."""

from radjepa.models.encoder import VisionEncoder, build_encoder
from radjepa.models.predictor import Predictor, build_predictor

__all__ = ["VisionEncoder", "build_encoder", "Predictor", "build_predictor"]
