"""diffusers-spm: Concept Semi-Permeable Membranes (SPM, CVPR 2024) for diffusers pipelines."""

from .layers import MembraneBank, MembraneLayerHook
from .membrane import LowRankPair, Membrane, MembraneFormatError
from .controller import MembraneController, membrane_targets
from .pipeline import (
    FluxImg2ImgSPMPipeline,
    FluxInpaintSPMPipeline,
    FluxSPMPipeline,
    SPMPipelineMixin,
    StableDiffusion3Img2ImgSPMPipeline,
    StableDiffusion3InpaintSPMPipeline,
    StableDiffusion3SPMPipeline,
    StableDiffusionImg2ImgSPMPipeline,
    StableDiffusionInpaintSPMPipeline,
    StableDiffusionSPMPipeline,
    StableDiffusionXLImg2ImgSPMPipeline,
    StableDiffusionXLSPMPipeline,
    add_spm_support,
)
from .transport import TransportConfig, TransportScorer

__version__ = "0.1.0"

__all__ = [
    "FluxImg2ImgSPMPipeline",
    "FluxInpaintSPMPipeline",
    "FluxSPMPipeline",
    "LowRankPair",
    "Membrane",
    "MembraneBank",
    "MembraneController",
    "MembraneFormatError",
    "MembraneLayerHook",
    "SPMPipelineMixin",
    "StableDiffusion3Img2ImgSPMPipeline",
    "StableDiffusion3InpaintSPMPipeline",
    "StableDiffusion3SPMPipeline",
    "StableDiffusionImg2ImgSPMPipeline",
    "StableDiffusionInpaintSPMPipeline",
    "StableDiffusionSPMPipeline",
    "StableDiffusionXLImg2ImgSPMPipeline",
    "StableDiffusionXLSPMPipeline",
    "TransportConfig",
    "TransportScorer",
    "add_spm_support",
    "membrane_targets",
]
