"""The SPM training loop (docs/training.md): one trainer for every denoiser family (SD 1.x, 2.x, XL,
SD3, Flux); what differs between families is asked of `DenoiserFamily` (`families/`).

One iteration, for a concept drawn at random:
1. draw `k` in [1, T); denoise fresh noise for `k` steps of the family's schedule with the membrane
   on (CFG on the target; Flux-dev: its guidance embedding), giving `x_t`; the loss timestep is
   where those steps leave it (`schedules.py`);
2. without the membrane: `pred(x_t, positive)`, `pred(x_t, neutral)` and, with Latent Anchoring,
   `pred(x_t, anchor)` for each anchor;
3. with the membrane: `pred'(x_t, target)` and `pred'(x_t, anchor)`; losses in `losses.py`, in
   epsilon space for diffusion models and velocity space for flow-matching ones.

With `batch_unet_calls` the calls of step 2 share one forward and those of step 3 another, with
one backward, and conditional-only rows (the reference runs each guidance-1 call as a CFG pair and
keeps the conditional half). Without it, the reference's calls run one by one, in its order.
Every random draw comes from one generator whose state is checkpointed, so both forms and a
resumed run see the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..controller import MembraneController, architecture_of
from ..families import denoiser_of, family_of
from ..layers import bank_of, layer_shape
from ..membrane import LowRankPair, Membrane
from ..transport import TransportConfig
from ..utils import flatten, torch_dtype
from .anchors import sample_anchor_embeddings
from .conditioning import TEMPLATES, Conditioning, PromptEncoder, sdxl_time_ids
from .config import ConceptConfig, TrainingConfig, bucket_step
from .losses import spm_losses
from .schedules import schedule_for

logger = logging.getLogger(__name__)

ADAPTER = "spm_training"
Callback = Callable[[int, dict[str, float]], None]


@dataclass
class Plan:
    """Everything random about one iteration, drawn before any denoiser call."""

    concept: int
    steps: int  # k: steps of the partial denoising
    latents: torch.Tensor
    target: Conditioning
    time_ids: torch.Tensor | None
    anchors: Conditioning | None
    positive: Conditioning | None = None  # None: the concept's own (no `templates`)
    neutral: Conditioning | None = None


class MembraneTrainer:
    """Trains one membrane on `concepts` with the denoiser of `pipe` (left as it was by `close`)."""

    def __init__(self, config: TrainingConfig, pipe: DiffusionPipeline, concepts: list[ConceptConfig],
                 device: torch.device) -> None:
        config.check_base(pipe)
        self.config, self.pipe, self.concepts, self.device = config, pipe, concepts, device
        self.dtype = torch_dtype(config.train.precision)
        self.denoiser = denoiser_of(pipe)
        self.family = family_of(self.denoiser)
        self.size_conditioned = self.family.size_conditioned(self.denoiser)
        self.guidance_embedded = self.family.guidance_embedded(self.denoiser)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.step_count = 0
        self._pending: list[tuple[Plan, torch.Tensor]] = []  # denoised ahead (`train.denoise_batch`)

        offload = config.train.offload_text_encoders
        self.text_encoders = [module for name, module in pipe.components.items()
                              if name.startswith("text_encoder") and module is not None]
        for module in [self.denoiser, *self.text_encoders]:
            placed = module.to("cpu" if offload and module is not self.denoiser else device)
            placed.requires_grad_(False).eval()
            if module.dtype != self.dtype:
                module.to(self.dtype)
        self._checkpointing = config.train.gradient_checkpointing and not self.denoiser.is_gradient_checkpointing
        if self._checkpointing:
            self.denoiser.enable_gradient_checkpointing()

        self.controller = self._attach_membrane()
        self.params = [p for _, bank in self.controller.banks() for p in (bank.down, bank.up)]
        for param in self.params:
            param.requires_grad_(True)
        self.optimizer = self._optimizer()
        # fp16's range: the loss's gradients through an fp16 denoiser underflow to zero on whole layers
        # (15 of the tiny UNet's 72 in 6 steps), so fp16 runs scale the loss as mixed precision does.
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.lr_scheduler = get_scheduler(
            config.train.lr_scheduler, self.optimizer, num_warmup_steps=config.train.lr_warmup_steps,
            num_training_steps=config.train.iterations, num_cycles=config.train.lr_scheduler_num_cycles,
            power=config.train.lr_scheduler_power,
        )
        # The average that `save` writes (`train.ema_decay`), kept beside the weights on the training device.
        self.ema = EMAModel(self.params, decay=config.train.ema_decay) if config.train.ema_decay else None

        self.prediction_type = "v_prediction" if config.pretrained_model.v_pred else self.family.prediction_type(pipe)
        self.schedule = schedule_for(pipe, self.family, self.denoiser, self.prediction_type,
                                     config.train.max_denoising_steps, device)
        self.scheduler = self.schedule.scheduler
        rescale = config.train.denoise_guidance_rescale
        self.guidance_rescale = (0.7 if self.size_conditioned else 0.0) if rescale is None else rescale

        self.encode = PromptEncoder(pipe, self.family, device, config.pretrained_model.clip_skip,
                                    torch.device("cpu") if offload else device)
        for prompt in self._prompts():
            self.encode(prompt)

    # ------------------------------------------------------------------ setup
    def _prompts(self) -> list[str]:
        """Every prompt the run can encode: they are fixed, so all are encoded once, at the start."""
        prompts: dict[str, None] = {}
        for concept in self.concepts:
            targets = [t.format(concept.target) for t in TEMPLATES] if concept.use_template else [concept.target]
            in_context = [in_template(t, text) for t in concept.templates
                          for text in (concept.target, concept.positive, concept.neutral)]
            prompts.update(dict.fromkeys([*targets, *in_context, concept.positive, concept.neutral, concept.unconditional]))
        return list(prompts)

    def _attach_membrane(self) -> MembraneController:
        controller = MembraneController.of(self.denoiser, create=True)
        if controller.adapters:
            raise ValueError(
                f"The denoiser already carries membranes {controller.names}; unload them (`pipe.unload_spm()`) "
                "before training, or they would act during training."
            )
        controller.set_transport(TransportConfig(enabled=False))
        controller.set_enabled(True)
        rank, alpha = self.config.network.rank, self.config.network.alpha
        modules = {}
        for name, (_, base) in controller.targets.items():
            shape = layer_shape(base)
            down, up = torch.empty(shape.down(rank)), torch.zeros(shape.up(rank))
            # As kohya/the reference: Kaiming-uniform down, zero up, so training starts at the base model.
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=self.generator)
            modules[name] = LowRankPair(down=down, up=up, alpha=alpha)
        neutrals = {c.neutral for c in self.concepts}
        membrane = Membrane(
            modules=modules, concepts=[c.target for c in self.concepts],
            surrogate=neutrals.pop() if len(neutrals) == 1 and "" not in neutrals else None,
            base_model=model_name(self.pipe.name_or_path or self.config.pretrained_model.name_or_path),
            architecture=architecture_of(self.denoiser), family=self.family.name,
            training_config=self.config.model_copy(update={"concepts": self.concepts}).model_dump(mode="json"),
        )
        try:
            controller.add(ADAPTER, membrane, dtype=torch.float32)
        except BaseException:
            controller.detach()
            raise
        return controller

    def _optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        if train.optimizer_type == "AdamW8bit":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(self.params, lr=train.lr, **train.optimizer_args)
            except ImportError:
                logger.warning("AdamW8bit needs bitsandbytes (`pip install diffusers-spm[train]`); using AdamW.")
        return torch.optim.AdamW(self.params, lr=train.lr, **train.optimizer_args)

    # ------------------------------------------------------------------ membrane switch
    def membrane_enabled(self, on: bool) -> contextlib.AbstractContextManager[None]:
        """The membrane switched on (or off) for a block: the denoiser calls with and without it."""
        return self.controller.switched(on)

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the training device for a block (sampling images), offloaded or not."""
        if not self.config.train.offload_text_encoders:
            yield
            return
        for module in self.text_encoders:
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.text_encoders:
                module.to("cpu")

    # ------------------------------------------------------------------ one iteration
    def plan(self) -> Plan:
        """Draw the iteration's concept, depth, size, noise and anchors (the only random numbers)."""
        gen = self.generator
        index = int(torch.randint(0, len(self.concepts), (), generator=gen))
        concept = self.concepts[index]
        steps = int(torch.randint(1, self.config.train.max_denoising_steps, (), generator=gen))
        height = width = concept.resolution
        if concept.dynamic_resolution:
            height, width = _bucket(concept.resolution, gen), _bucket(concept.resolution, gen)
        shape = self.family.latent_shape(self.pipe, height, width)
        noise = torch.randn(concept.batch_size, *shape, generator=gen)
        latents = (noise * self.schedule.init_noise_sigma).to(self.device, self.dtype)
        time_ids = sdxl_time_ids(height, width, concept.dynamic_crops, gen) if self.size_conditioned else None
        prompt, positive, neutral = concept.target, None, None
        if concept.use_template:
            prompt = TEMPLATES[int(torch.randint(0, len(TEMPLATES), (), generator=gen))].format(concept.target)
        elif concept.templates:
            template = concept.templates[int(torch.randint(0, len(concept.templates), (), generator=gen))]
            prompt, positive, neutral = (in_template(template, text)
                                         for text in (concept.target, concept.positive, concept.neutral))
            positive, neutral = self.encode(positive), self.encode(neutral)
        target = self.encode(prompt)
        anchors = self._anchors(concept, target) if concept.action == "erase_with_la" else None
        if time_ids is not None:
            time_ids = time_ids.to(self.device, self.dtype)
        return Plan(index, steps, latents, target, time_ids, anchors, positive, neutral)

    def _anchors(self, concept: ConceptConfig, target: Conditioning) -> Conditioning:
        """The rows Latent Anchoring holds: `sampling_batch_size` random embeddings, or, with
        `anchor_unconditional`, the reference's effective rows. The reference puts the unconditional
        prompt before each anchor, `[∅, a1, ∅, a2, ..., ∅, aS]`, and its guidance-1 call keeps the second
        half of that batch, so it anchors `[∅, a3, ∅, a4]` for S = 4: the unconditional prompt twice."""
        count, gen = concept.sampling_batch_size, self.generator
        pooled = None if target.pooled is None else sample_anchor_embeddings(target.pooled, count, gen)
        anchors = Conditioning(sample_anchor_embeddings(target.text, count, gen), pooled)
        if not concept.anchor_unconditional:
            return anchors
        unconditional = self.encode(concept.unconditional)
        interleaved = Conditioning.cat([row for i in range(count) for row in (unconditional, anchors[i])])
        return interleaved[count:]

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                time_ids: torch.Tensor | None, guidance: float = 1.0) -> torch.Tensor:
        """One denoiser forward on rows `cond` (through the family); `guidance` reaches guidance-distilled
        denoisers only. Predictions at the loss timestep use 1, the reference's guidance-1 calls."""
        cond = cond.with_time_ids(time_ids)
        return self.family.predict(self.denoiser, latents, timestep, cond.text, cond.pooled, cond.time_ids, guidance)

    @torch.no_grad()
    def denoise(self, plans: Sequence[Plan]) -> list[torch.Tensor]:
        """Each plan's `k` steps with the membrane on and CFG on its target, giving its `x_t`.

        The membrane is merged into the weights for the loop (it does not change within it). Plans
        whose latents share a size run as one batch, each leaving it after its own `k` steps.
        """
        results: list[torch.Tensor | None] = [None] * len(plans)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, plan in enumerate(plans):
            groups.setdefault(tuple(plan.latents.shape[1:]), []).append(index)
        with self.membrane_enabled(True), self.controller.call_scope():
            for members in groups.values():
                for index, latents in zip(members, self._denoise_together([plans[i] for i in members])):
                    results[index] = latents
        return results

    def _denoise_together(self, plans: list[Plan]) -> list[torch.Tensor]:
        rows = [plan.latents.shape[0] for plan in plans]
        owner = torch.repeat_interleave(torch.arange(len(plans)), torch.tensor(rows))
        steps = torch.tensor([plan.steps for plan in plans])[owner]
        uncond, text = [], []
        for plan in plans:
            concept, batch = self.concepts[plan.concept], plan.latents.shape[0]
            uncond.append(self.encode(concept.unconditional).repeat(batch).with_time_ids(plan.time_ids))
            text.append(plan.target.repeat(batch).with_time_ids(plan.time_ids))
        uncond, text = Conditioning.cat(uncond), Conditioning.cat(text)
        latents = torch.cat([plan.latents for plan in plans])
        scale = self.config.train.denoise_guidance_scale
        timesteps = self.schedule.timesteps(latents.shape[1:])
        for index, timestep in enumerate(timesteps[: int(steps.max())]):
            active = (steps > index).nonzero().squeeze(1)
            current = latents[active]
            if self.guidance_embedded:  # Flux-dev: the guidance scale is an input, no CFG pair
                guided = self.predict(current, timestep, text[active], None, guidance=scale)
            else:
                cond = Conditioning.cat([uncond[active], text[active]])
                pred_uncond, pred_text = self.predict(torch.cat([current, current]), timestep, cond, None).chunk(2)
                guided = pred_uncond + scale * (pred_text - pred_uncond)
                if self.guidance_rescale > 0:
                    guided = rescale_noise_cfg(guided, pred_text, guidance_rescale=self.guidance_rescale)
            latents[active] = self.scheduler.step(guided, timestep, current).prev_sample
        return list(latents.split(rows))

    def forward_backward(self, plan: Plan, latents: torch.Tensor, backward: bool = True) -> dict[str, torch.Tensor]:
        """Steps 2-3: the denoiser calls at the loss timestep, the losses and (unless `backward=False`) their
        backward pass, which leaves the gradients in the membrane's parameters."""
        concept = self.concepts[plan.concept]
        timestep = self.schedule.loss_timestep(plan.steps, latents.shape[1:]).to(self.device)
        batch = concept.batch_size
        positive = (self.encode(concept.positive) if plan.positive is None else plan.positive).repeat(batch)
        neutral = (self.encode(concept.neutral) if plan.neutral is None else plan.neutral).repeat(batch)
        target = plan.target.repeat(batch)
        anchored = plan.anchors is not None
        anchor_latents = latents.repeat(concept.sampling_batch_size // batch, 1, 1, 1)

        def pred(rows_latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            """The prediction in the loss space: epsilon (diffusion) or velocity (flow matching)."""
            output = self.predict(rows_latents, timestep, cond, plan.time_ids)
            return self.schedule.to_loss_space(output, rows_latents, timestep)

        if self.config.train.batch_unet_calls:
            off_rows = [positive, neutral] + ([plan.anchors] if anchored else [])
            off_latents = [latents, latents] + ([anchor_latents] if anchored else [])
            with torch.no_grad(), self.membrane_enabled(False):
                off = pred(torch.cat(off_latents), Conditioning.cat(off_rows)).split([len(r) for r in off_rows])
            on_rows = [target] + ([plan.anchors] if anchored else [])
            with self.membrane_enabled(True):
                on = pred(torch.cat([latents] + ([anchor_latents] if anchored else [])), Conditioning.cat(on_rows))
            on = on.split([len(r) for r in on_rows])
            outputs = (on[0], off[0], off[1], on[1] if anchored else None, off[2] if anchored else None)
        else:
            uncond = self.encode(concept.unconditional)

            def reference_call(rows_latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
                """The reference's `predict_noise(..., guidance_scale=1)`: a CFG pair, guided at 1."""
                pair = Conditioning.cat([uncond.repeat(len(cond)), cond])
                pred_uncond, pred_text = pred(torch.cat([rows_latents, rows_latents]), pair).chunk(2)
                return pred_uncond + 1.0 * (pred_text - pred_uncond)

            with torch.no_grad(), self.membrane_enabled(False):
                pred_positive = reference_call(latents, positive)
                pred_neutral = reference_call(latents, neutral)
            with self.membrane_enabled(True):
                pred_target = reference_call(latents, target)
                anchor_with = reference_call(anchor_latents, plan.anchors) if anchored else None
            anchor_without = None
            if anchored:
                with torch.no_grad(), self.membrane_enabled(False):
                    anchor_without = reference_call(anchor_latents, plan.anchors)
            outputs = (pred_target, pred_positive, pred_neutral, anchor_with, anchor_without)

        eta = concept.guidance_scale if self.config.train.eta is None else self.config.train.eta
        losses = spm_losses(*outputs[:3], eta=eta, anchor_with=outputs[3], anchor_without=outputs[4],
                            la_strength=concept.la_strength)
        if backward:
            with self.membrane_enabled(True):  # gradient checkpointing recomputes the forward during backward
                self.grad_scaler.scale(losses["loss"]).backward()
        return losses

    def next_plan(self) -> tuple[Plan, torch.Tensor]:
        """The next iteration's plan and its `x_t`. With `train.denoise_batch` B > 1, the latents of B
        iterations are denoised together with the membrane of the first of them (stale by up to B - 1
        steps); the random draws are the same whatever B is."""
        if not self._pending:
            plans = [self.plan() for _ in range(self.config.train.denoise_batch)]
            self._pending = list(zip(plans, self.denoise(plans)))
        return self._pending.pop(0)

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss terms and the learning rate."""
        plan, latents = self.next_plan()
        losses = self.forward_backward(plan, latents)
        self.grad_scaler.unscale_(self.optimizer)
        if self.config.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        self.grad_scaler.step(self.optimizer)  # skipped, and the scale lowered, on an overflow
        self.grad_scaler.update()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.controller.weights_changed()
        self.step_count += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["lr"] = self.lr_scheduler.get_last_lr()[0]
        return values

    # ------------------------------------------------------------------ state
    def membrane_weights(self) -> Membrane:
        """The membrane as it would be saved now: its moving average with `train.ema_decay`, else its
        weights. Training goes on from the weights either way."""
        if self.ema is None:
            return self.controller.membrane(ADAPTER)
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            return self.controller.membrane(ADAPTER)
        finally:
            self.ema.restore(self.params)

    def save(self, path: Path, dtype: torch.dtype) -> Membrane:
        """Write the membrane in its family's file layout (UNets: the reference's; transformers: diffusers')."""
        membrane = self.membrane_weights()
        self.family.save(membrane, path, self.denoiser, dtype=dtype)
        return membrane

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "membrane": {name: (bank.down.detach().clone(), bank.up.detach().clone())
                         for name, (_, base) in self.controller.targets.items()
                         if (bank := bank_of(base)) is not None},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "generator": self.generator.get_state(),
            "config": self.config.model_dump_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" not in state:
            raise ValueError("The checkpoint was written without train.ema_decay, so it holds no moving average "
                             "to resume; resume it without ema_decay, or start the run afresh.")
        if state["config"] != self.config.model_dump_json():
            logger.warning("Resuming with a config that differs from the checkpoint's; the run will not match "
                           "an uninterrupted one.")
        with torch.no_grad():
            for name, (_, base) in self.controller.targets.items():
                bank = bank_of(base)
                if bank is not None:
                    down, up = state["membrane"][name]
                    bank.down.copy_(down)
                    bank.up.copy_(up)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "grad_scaler" in state:  # checkpoints written before fp16 runs scaled their loss have none
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])
        self.controller.weights_changed()

    def close(self) -> None:
        """Take the membrane out of the denoiser and undo what training set up."""
        for param in self.params:
            param.requires_grad_(False)
        self.controller.remove(ADAPTER)
        if not self.controller.adapters:
            self.controller.detach()
        if self._checkpointing:
            self.denoiser.disable_gradient_checkpointing()


def in_template(template: str, text: str) -> str:
    """`text` in `template`'s slot, spaces collapsed (an empty neutral leaves no double space)."""
    return " ".join(template.format(text).split())


def model_name(name_or_path: str) -> str:
    """The base model as metadata can name it on any machine: a Hub id or short name as it is, a
    local folder by its own name (never the path of the machine that trained)."""
    path = Path(name_or_path)
    return path.name if path.is_absolute() or path.exists() else name_or_path


def _bucket(resolution: int, generator: torch.Generator) -> int:
    """The reference's dynamic resolution: a multiple of 64 in [resolution/2, resolution) (of 8 when
    the resolution is too small for 64)."""
    step = bucket_step(resolution)
    low, high = (resolution // 2) // step, resolution // step
    return int(torch.randint(low, max(high, low + 1), (), generator=generator)) * step


# ---------------------------------------------------------------------- runs
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "concept"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_path(config: TrainingConfig, run_name: str) -> Path:
    return Path(config.save.path) / f"{run_name}.checkpoint.pt"


def load_pipeline(config: TrainingConfig) -> DiffusionPipeline:
    """The base model as a diffusers pipeline (any family's, from a folder or the Hub)."""
    from ..bases import from_pretrained

    return from_pretrained(config.pretrained_model.name_or_path, torch_dtype=torch_dtype(config.train.precision))


class _Tracker:
    """accelerate's trackers (tensorboard, wandb) when asked for; a no-op otherwise."""

    def __init__(self, config: TrainingConfig, run_name: str, main: bool) -> None:
        self.accelerator = None
        if config.logging.tracker == "none" or not main:
            return
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[config.logging.tracker]
        if not available():
            raise ImportError(f"logging.tracker={config.logging.tracker!r} needs the {config.logging.tracker} package "
                              "(`pip install diffusers-spm[train]`), or set logging.tracker=none.")
        self.accelerator = Accelerator(log_with=config.logging.tracker, project_dir=config.save.path)
        self.accelerator.init_trackers(config.logging.run_name or run_name, config=_tracker_values(config.model_dump(mode="json")))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.accelerator is not None:
            self.accelerator.log(values, step=step)

    def log_images(self, images: dict[str, list], step: int) -> None:
        if self.accelerator is None:
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            tracker.log_images({k: np.stack([np.asarray(i) for i in v]) for k, v in images.items()}, step=step)

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()


def _tracker_values(tree: dict[str, Any]) -> dict[str, Any]:
    """The config as trackers take it: one level, numbers and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(tree).items()}


def _samples(trainer: MembraneTrainer, config: TrainingConfig, run_name: str, step: int, tracker: _Tracker) -> None:
    """Images of `logging.prompts` with the membrane on, saved as PNGs and sent to the tracker."""
    log = config.logging
    out = Path(config.save.path) / "samples" / run_name
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    with trainer.membrane_enabled(True), trainer.text_encoders_on_device():
        for index, prompt in enumerate(log.prompts):
            generator = torch.Generator(trainer.device).manual_seed(log.seed) if log.seed is not None else None
            result = trainer.pipe(prompt, negative_prompt=log.negative_prompt or None, width=log.width,
                                  height=log.height, num_inference_steps=log.num_inference_steps,
                                  guidance_scale=log.guidance_scale, num_images_per_prompt=log.generate_num,
                                  generator=generator).images
            for j, image in enumerate(result):
                image.save(out / f"step{step:06d}_{index:02d}_{j}.png")
            images[f"sample/{_slug(prompt) or 'empty'}"] = result
    tracker.log_images(images, step)


def train_one(config: TrainingConfig, pipe: DiffusionPipeline, concepts: list[ConceptConfig], run_name: str,
              device: torch.device, resume: bool = False, callback: Callback | None = None,
              main_process: bool = True) -> Membrane:
    """Train, checkpoint and save one membrane; returns it (also written as `<run_name>_last.safetensors`)."""
    save_dir = Path(config.save.path)
    save_dtype = torch_dtype(config.save.precision)
    with contextlib.ExitStack() as cleanup:
        tracker = _Tracker(config, run_name, main_process)
        cleanup.callback(tracker.close)
        trainer = MembraneTrainer(config, pipe, concepts, device)
        cleanup.callback(trainer.close)
        ckpt = checkpoint_path(config, run_name)
        if resume and ckpt.is_file():
            trainer.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            logger.info("Resumed %s from step %d.", run_name, trainer.step_count)
        elif resume:
            logger.warning("No checkpoint at %s; starting from step 0.", ckpt)
        iterations = config.train.iterations
        bar = tqdm(total=iterations, initial=trainer.step_count, desc=run_name, disable=not main_process)
        cleanup.callback(bar.close)
        while trainer.step_count < iterations:
            values = trainer.step()
            step = trainer.step_count
            bar.update(1)
            bar.set_postfix({k: f"{v:.3e}" for k, v in values.items()})
            tracker.log(values, step)
            if callback is not None:
                callback(step, values)
            if step % config.save.per_steps == 0 and step < iterations:
                trainer.save(save_dir / f"{run_name}_{step}steps.safetensors", save_dtype)
                _atomic_torch_save(trainer.state_dict(), ckpt)
            if config.logging.interval and config.logging.prompts and (step % config.logging.interval == 0
                                                                       or step == iterations):
                _samples(trainer, config, run_name, step, tracker)
        return trainer.save(save_dir / f"{run_name}_last.safetensors", save_dtype)


def train_membrane(config: TrainingConfig, pipeline: DiffusionPipeline | None = None, resume: bool = False,
                   callback: Callback | None = None) -> Membrane | list[Membrane]:
    """Train what `config` asks for: one membrane for all concepts, or (`save.per_concept`) one per
    concept, split across processes under `accelerate launch`. Returns the membrane(s) this process made."""
    from accelerate import PartialState

    state = PartialState()
    device = torch.device(config.train.device) if config.train.device else state.device
    pipe = pipeline if pipeline is not None else load_pipeline(config)
    if not config.save.per_concept:
        if state.num_processes > 1 and not state.is_main_process:
            logger.info("One membrane for all concepts: process %d has nothing to train.", state.process_index)
            return []
        return train_one(config, pipe, list(config.concepts), config.save.name, device, resume, callback)
    mine = list(enumerate(config.concepts))[state.process_index :: state.num_processes]
    return [
        train_one(config, pipe, [concept], f"{config.save.name}_{index:02d}_{_slug(concept.target)}", device, resume,
                  callback, main_process=state.is_main_process)
        for index, concept in mine
    ]
