"""diffusers-spm: Concept Semi-Permeable Membranes (SPM, CVPR 2024) for diffusers pipelines."""

from .layers import MembraneBank, MembraneLayerHook
from .membrane import Membrane, MembraneFormatError, MembraneModule
from .model import MembraneController, membrane_targets
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
from .transport import TransportConfig, TransportRate

__version__ = "0.1.0"

__all__ = [
    "Membrane",
    "MembraneBank",
    "MembraneController",
    "MembraneFormatError",
    "MembraneLayerHook",
    "MembraneModule",
    "FluxImg2ImgSPMPipeline",
    "FluxInpaintSPMPipeline",
    "FluxSPMPipeline",
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
    "TransportRate",
    "add_spm_support",
    "membrane_targets",
]
