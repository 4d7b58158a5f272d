"""Training SPM membranes: data-free concept erasing with Latent Anchoring (docs/training.md)."""

from .config import ConceptConfig, TrainingConfig
from .trainer import MembraneTrainer, train_membrane

__all__ = ["ConceptConfig", "MembraneTrainer", "TrainingConfig", "train_membrane"]
