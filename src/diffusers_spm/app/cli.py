"""`diffusers-spm app`: the web app on the embedded concept world (default) or any `--base`."""

from __future__ import annotations

import argparse
import logging

from ..bases import BASE_HELP, CONCEPT_WORLD
from ..utils import DTYPES

logger = logging.getLogger(__name__)


def launch_app(base: str = CONCEPT_WORLD, device: str = "cpu", dtype: str = "fp32", steps: int | None = None,
               host: str = "127.0.0.1", port: int | None = None, share: bool = False) -> None:
    """Build the session and serve the page until interrupted (a Space's app.py calls this too)."""
    try:
        from .ui import build_app
    except ImportError as exc:
        raise ImportError(f"The app needs gradio ({exc}); install it with `pip install 'diffusers-spm[app]'`.") from exc
    from .session import MembraneSession

    app = build_app(MembraneSession(base, device=device, dtype=dtype, num_inference_steps=steps))
    app.queue().launch(server_name=host, server_port=port, share=share)


def _app(args: argparse.Namespace) -> int:
    launch_app(args.base, args.device, args.dtype, args.steps, args.host, args.port, args.share)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("app", help="a local web app: load membranes, see rates and images (needs [app])")
    parser.add_argument("--base", default=CONCEPT_WORLD, help=f"{BASE_HELP}; default: {CONCEPT_WORLD}, offline on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 10 on the concept world, else 30)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, help="default: gradio's (7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="a temporary public gradio.live link")
    parser.set_defaults(handler=_app)
