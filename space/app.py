"""The diffusers-spm web app as a Hugging Face Space (sdk: gradio): upload this folder as it is.

It serves the embedded concept world on the Space's CPU; set the Space variable SPM_BASE to a diffusers
model id (e.g. CompVis/stable-diffusion-v1-4 on a GPU Space, with SPM_DEVICE=cuda) for a real model.
"""

import os

from diffusers_spm.app.cli import launch_app

if __name__ == "__main__":
    launch_app(base=os.environ.get("SPM_BASE", "concept-world"), device=os.environ.get("SPM_DEVICE", "cpu"),
               host="0.0.0.0", port=int(os.environ.get("PORT", 7860)))
