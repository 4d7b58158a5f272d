"""The gradio page over a `MembraneSession`: widgets in, the session's data out, errors as messages."""

from __future__ import annotations

import functools
from typing import Any, Callable

import gradio as gr
import pandas as pd

from ..hub import registry
from ..transport import METRICS
from .session import DEFAULT_METRIC, DEFAULT_POWER, MembraneSession, MembraneSetting, split_prompts

TABLE_HEADERS = ["membrane", "on", "scale"]
INTRO = """# Concept Semi-Permeable Membranes
Load membranes, switch them on, and type prompts (one per line). **Facilitated Transport** decides per
prompt how much each membrane acts: the chart shows each prompt's rate, the images the same seed without
and with the membranes."""


def user_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input becomes a message in the page (gr.Error) and the app keeps running."""
    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except (ValueError, OSError, TypeError) as exc:
            raise gr.Error(" ".join(str(exc).split()) or type(exc).__name__) from exc
    return wrapped


def build_app(session: MembraneSession) -> gr.Blocks:
    choices = [*session.shipped, *registry()]

    def table() -> list[list[Any]]:
        return [[s.name, s.enabled, s.scale] for s in session.settings.values()]

    @user_errors
    def load(source: str | None, upload: str | None) -> tuple[list[list[Any]], str]:
        names = [session.load(item) for item in (upload, source) if item]
        if not names:
            raise ValueError("Pick or type a membrane name, or upload a .safetensors file.")
        return table(), f"Loaded {', '.join(names)}."

    @user_errors
    def generate(prompts_text: str, rows: list[list[Any]], metric: str, power: float, seed: float,
                 progress: gr.Progress = gr.Progress()) -> tuple[pd.DataFrame, str, list[tuple[Any, str]], str]:
        prompts = split_prompts(prompts_text)
        session.configure([MembraneSetting(str(name), bool(on), float(scale)) for name, on, scale in rows or []
                           if name], metric, power)
        results = session.compare(prompts, seed=int(seed), on_step=lambda done, total: progress(
            done / total, desc=f"denoising step {done} of {total}"))
        bars = pd.DataFrame([{"prompt": r.prompt, "membrane": n, "rate": rate}
                             for r in results for n, rate in r.rates.items()])
        lines = ["| prompt | " + " | ".join(results[0].rates) + " |", "|---|" + "---:|" * len(results[0].rates)]
        lines += [f"| {r.prompt} | " + " | ".join(f"{v:.3f}" for v in r.rates.values()) + " |" for r in results]
        gallery = [item for r in results for item in ((r.without, f"{r.prompt} | without membranes"),
                                                      (r.with_membranes, f"{r.prompt} | {session.describe()}"))]
        return bars, "\n".join(lines), gallery, f"Generated {len(prompts)} prompt(s) {session.describe()}."

    with gr.Blocks(title="diffusers-spm") as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Dropdown(choices, value=None, allow_custom_value=True, elem_id="membrane-source",
                                     label="Membrane: shipped or registry name, or a Hub repo id")
                upload = gr.File(label="... or upload a .safetensors membrane", file_types=[".safetensors"],
                                 type="filepath")
                load_button = gr.Button("Load membrane", elem_id="load")
                membranes = gr.Dataframe(table(), headers=TABLE_HEADERS, datatype=["str", "bool", "number"],
                                         type="array", interactive=True, elem_id="membranes",
                                         label="Loaded membranes (switch on/off, set the scale)")
                metric = gr.Dropdown(list(METRICS), value=DEFAULT_METRIC, label="Transport rate")
                power = gr.Slider(0.5, 8.0, value=DEFAULT_POWER, step=0.5, label="Transport power (gate = rate ** power)")
            with gr.Column(scale=2):
                prompts = gr.Textbox(lines=3, elem_id="prompts", label="Prompts, one per line",
                                     placeholder="a red circle\na blue square")
                seed = gr.Number(0, precision=0, label="Seed")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                rates_chart = gr.BarPlot(x="prompt", y="rate", color="membrane", y_lim=[0, 1],
                                         label="Transport rate per prompt and membrane")
                rates_table = gr.Markdown(elem_id="rates")
                images = gr.Gallery(label="Same seed, without and with the membranes", columns=2,
                                    elem_id="images", object_fit="contain")
        load_button.click(load, [source, upload], [membranes, status])
        generate_button.click(generate, [prompts, membranes, metric, power, seed],
                              [rates_chart, rates_table, images, status])
    return app
