"""The evaluation report: results.json / results.csv, a markdown summary (one row per condition), a
PNG grid of the same prompts and seeds under each condition, and a bar chart of the headline metric."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from ..grids import GridBlock, captioned_grid
from .conditions import EvalCondition
from .tasks import Task

logger = logging.getLogger(__name__)

THUMBNAIL = 256


def write_evaluation_report(
    output: Path,
    task: Task,
    conditions: Sequence[EvalCondition],
    results: Mapping[str, Mapping[str, float]],
    folders: Mapping[str, Path],
    grid_prompts: int = 4,
) -> dict[str, Path]:
    """Write every report file into `output`; returns them by kind."""
    output.mkdir(parents=True, exist_ok=True)
    files = {
        "json": write_json(output / "results.json", task, conditions, results),
        "csv": write_csv(output / "results.csv", results),
        "grid": write_condition_grid(output / "grid.png", task, conditions, folders, grid_prompts),
        "chart": write_chart(output / "headline.png", task, results),
    }
    files["summary"] = write_summary(output / "summary.md", task, results, files)
    logger.info("Report written to %s (summary: %s).", output, files["summary"].name)
    return files


def metric_columns(results: Mapping[str, Mapping[str, float]], headline: str) -> list[str]:
    keys = sorted({k for scores in results.values() for k in scores})
    return [headline, *(k for k in keys if k != headline)] if headline in keys else keys


def write_json(path: Path, task: Task, conditions: Sequence[EvalCondition], results: Mapping[str, Mapping[str, float]]) -> Path:
    payload = {
        "task": task.name,
        "headline": task.headline,
        "goal": task.goal,
        "num_images_per_condition": len(task.jobs),
        "settings": dataclasses.asdict(task.settings),
        "notes": task.notes,
        "conditions": [{"name": c.name, **dataclasses.asdict(c)} for c in conditions],
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def write_csv(path: Path, results: Mapping[str, Mapping[str, float]]) -> Path:
    columns = sorted({k for scores in results.values() for k in scores})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition", *columns])
        for condition, scores in results.items():
            writer.writerow([condition, *(scores.get(c, "") for c in columns)])
    return path


def write_summary(path: Path, task: Task, results: Mapping[str, Mapping[str, float]], files: Mapping[str, Path]) -> Path:
    """Markdown that a model card can embed as is."""
    columns = metric_columns(results, task.headline)
    lines = [
        f"### Evaluation: `{task.name}` ({len(task.jobs)} images per condition)",
        "",
        f"Headline: **{task.headline}**, {task.goal}.",
        "",
        "| condition | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for condition, scores in results.items():
        cells = [f"{scores[c]:.4g}" if c in scores else "" for c in columns]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines += ["", f"![{task.headline} per condition]({files['chart'].name})", "",
              f"![same prompts and seeds under each condition]({files['grid'].name})", ""]
    path.write_text("\n".join(lines))
    return path


def write_condition_grid(path: Path, task: Task, conditions: Sequence[EvalCondition], folders: Mapping[str, Path], prompts: int) -> Path:
    """Rows: the first `prompts` jobs, captioned with prompt and seed; columns: the conditions, base first."""
    rows = []
    for job in task.jobs[:prompts]:
        images = []
        for condition in conditions:
            with Image.open(folders[condition.name] / job.file_name) as image:
                images.append(image.convert("RGB"))
        rows.append((f"{job.prompt} (seed {job.seed})", images))
    # one tile size whatever the images' (COCO's differ; a toy model's are tiny)
    captioned_grid([GridBlock([c.name for c in conditions], rows)], THUMBNAIL, path)
    return path


def write_chart(path: Path, task: Task, results: Mapping[str, Mapping[str, float]]) -> Path:
    from matplotlib.figure import Figure

    names = [n for n, scores in results.items() if task.headline in scores]
    figure = Figure(figsize=(max(4.0, 1.2 * len(names)), 3.5), layout="constrained")
    axes = figure.subplots()
    axes.bar(range(len(names)), [results[n][task.headline] for n in names], color="tab:blue")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(task.headline)
    axes.set_title(f"{task.name}: {task.headline}")
    figure.savefig(path, dpi=100)
    return path
