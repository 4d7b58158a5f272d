"""The judge: a small CNN that reads shape, colour and texture off a 32x32 image.

It plays the role CLIP and NudeNet play for real models: an independent classifier that says
whether a generated image shows a concept. It is trained on renders only, with light noise and
blur so that it also reads the slightly soft images a diffusion model draws.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .world import KINDS, ConceptWorld

logger = logging.getLogger(__name__)

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge_config.json"


@dataclass
class JudgeConfig:
    """What the judge's heads mean: the concept names of each kind, in label order."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    textures: tuple[str, ...]
    width: int = 16

    @classmethod
    def for_world(cls, world: ConceptWorld, width: int = 16) -> "JudgeConfig":
        return cls(world.shapes, world.colours, world.textures, width)

    def names(self, kind: str) -> tuple[str, ...]:
        return {"shape": self.shapes, "colour": self.colours, "texture": self.textures}[kind]


class Judge(nn.Module):
    """Three-headed CNN classifier; input (N, 3, 32, 32) in [0, 1]."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(config.names(k))) for k in KINDS})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per kind."""
        h = self.features(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted concept names per kind for (N, H, W, 3) images in [0, 1] (numpy or torch)."""
        self.eval()
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        device = next(self.parameters()).device
        preds: dict[str, list[str]] = {k: [] for k in KINDS}
        for start in range(0, len(x), batch_size):
            logits = self(x[start : start + batch_size].to(device))
            for k in KINDS:
                names = self.config.names(k)
                preds[k].extend(names[i] for i in logits[k].argmax(-1).tolist())
        return preds

    def save(self, directory: str | Path) -> None:
        """Write the weights (safetensors) and the label config (json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, directory / JUDGE_WEIGHTS)
        (directory / JUDGE_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "Judge":
        """Load a judge written by :meth:`save`."""
        directory = Path(directory)
        raw = json.loads((directory / JUDGE_CONFIG).read_text())
        config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        judge = cls(config)
        judge.load_state_dict(load_file(directory / JUDGE_WEIGHTS))
        return judge.to(device or "cpu").eval()


def make_batch(world: ConceptWorld, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random renders with their labels per kind."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = world.render_batch(scenes)
    labels = {k: np.array([world.label(k, getattr(s, k)) for s in scenes]) for k in KINDS}
    return images, labels


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, colour gain and noise: generated images are softer and noisier than renders."""
    n = x.shape[0]
    blur3 = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur5 = F.avg_pool2d(F.pad(blur3, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a, b = torch.rand(2, n, 1, 1, 1, generator=gen)
    x = (1 - a) * x + a * ((1 - b) * blur3 + b * blur5)
    x = x * (1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5))
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.06
    return x.clamp(0, 1)


def train_judge(
    world: ConceptWorld,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
    pool: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
) -> Judge:
    """Train a judge on fresh renders, or on a pre-rendered ``pool`` (images, labels) to save time."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = Judge(JudgeConfig.for_world(world, width))
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    judge.train()
    for _ in tqdm(range(steps), desc="judge", mininterval=5):
        if pool is None:
            images, labels = make_batch(world, batch_size, rng)
        else:
            idx = rng.integers(len(pool[0]), size=batch_size)
            images, labels = pool[0][idx], {k: v[idx] for k, v in pool[1].items()}
        x = _augment(torch.from_numpy(images).permute(0, 3, 1, 2), gen)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(labels[k])) for k in KINDS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    logger.info("judge trained: %d steps, last loss %.4f", steps, loss.item())
    return judge.eval()


def judge_accuracy(judge: Judge, images: np.ndarray, targets: Sequence[dict[str, str]]) -> dict[str, float]:
    """Accuracy per kind over the targets that name it, and joint accuracy over all named kinds."""
    preds = judge.classify(images)
    correct = {k: [] for k in KINDS}
    joint = []
    for i, target in enumerate(targets):
        hits = [preds[k][i] == v for k, v in target.items()]
        for k, v in target.items():
            correct[k].append(preds[k][i] == v)
        joint.append(all(hits))
    out = {k: float(np.mean(v)) for k, v in correct.items() if v}
    out["joint"] = float(np.mean(joint)) if joint else float("nan")
    return out
