"""``detection``: a small CNN finds squares, circles and triangles in synthetic images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb

from .. import views
from .base import RunConfig, Task

SIZE, GRID, CLASSES, MAX_OBJECTS, SHOWN = 32, 4, 3, 3, 4
THRESHOLD = 0.5


@dataclass(frozen=True)
class Scenes:
    images: torch.Tensor  # [B, 1, SIZE, SIZE]
    present: torch.Tensor  # [B, MAX_OBJECTS] bool
    boxes: torch.Tensor  # [B, MAX_OBJECTS, 4] cx, cy, w, h fractions
    classes: torch.Tensor  # [B, MAX_OBJECTS] int64
    cells: torch.Tensor  # [B, MAX_OBJECTS] int64 grid cell index (row * GRID + col)


def make_scenes(count: int, gen: torch.Generator) -> Scenes:
    """Images with 1-3 shapes, at most one centred in each grid cell, plus noise."""
    cells = torch.rand(count, GRID * GRID, generator=gen).argsort(1)[:, :MAX_OBJECTS]
    present = torch.arange(MAX_OBJECTS).unsqueeze(0) < torch.randint(1, MAX_OBJECTS + 1, (count, 1), generator=gen)
    row, col = cells // GRID, cells % GRID
    cx = (col + 0.2 + torch.rand(count, MAX_OBJECTS, generator=gen) * 0.6) / GRID
    cy = (row + 0.2 + torch.rand(count, MAX_OBJECTS, generator=gen) * 0.6) / GRID
    half = (torch.rand(count, MAX_OBJECTS, generator=gen) * 3 + 3) / SIZE  # 3..6 px
    classes = torch.randint(0, CLASSES, (count, MAX_OBJECTS), generator=gen)
    axis = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dx = xx.view(1, 1, SIZE, SIZE) - cx.view(count, MAX_OBJECTS, 1, 1)
    dy = yy.view(1, 1, SIZE, SIZE) - cy.view(count, MAX_OBJECTS, 1, 1)
    h = half.view(count, MAX_OBJECTS, 1, 1)
    square = (dx.abs() <= h) & (dy.abs() <= h)
    circle = dx * dx + dy * dy <= h * h
    triangle = (dy.abs() <= h) & (dx.abs() <= (dy + h) / 2)
    k = classes.view(count, MAX_OBJECTS, 1, 1)
    mask = torch.where(k == 0, square, torch.where(k == 1, circle, triangle))
    mask = mask & present.view(count, MAX_OBJECTS, 1, 1)
    images = mask.any(1).float().unsqueeze(1) * 0.8 + 0.1
    images = (images + torch.randn(images.shape, generator=gen) * 0.08).clamp(0, 1)
    boxes = torch.stack([cx, cy, 2 * half, 2 * half], 2)
    return Scenes(images, present, boxes, classes, cells)


class DetectionTask(Task):
    name = "detection"
    title = "Shape detection"
    description = "A small CNN finds squares, circles and triangles and boxes them."
    model_kind = "detection"
    views = ("boxes",)
    metrics = ("loss", "recall")
    defaults = {"learning_rate": 0.003, "batch_size": 32}

    def make_data(self, config: RunConfig, seed: int) -> Scenes:
        return make_scenes(SHOWN, torch.Generator().manual_seed(seed))

    def sample_batch(self, data: Scenes, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        s = make_scenes(config.batch_size, gen)
        n = s.images.shape[0]
        obj = torch.zeros(n, GRID * GRID)
        box = torch.zeros(n, GRID * GRID, 4)
        cls = torch.zeros(n, GRID * GRID, dtype=torch.long)
        rows = torch.arange(n).unsqueeze(1).expand_as(s.cells)[s.present]
        cells = s.cells[s.present]
        obj[rows, cells] = 1.0
        box[rows, cells] = s.boxes[s.present]
        cls[rows, cells] = s.classes[s.present]
        return s.images, obj.view(n, GRID, GRID), box.view(n, GRID, GRID, 4), cls.view(n, GRID, GRID)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, obj, box, cls = batch
        p_obj, p_box, p_cls = model(images)
        mask = obj > 0.5
        loss = F.binary_cross_entropy_with_logits(p_obj, obj, pos_weight=torch.tensor(4.0, device=p_obj.device))
        if mask.any():
            loss = loss + F.l1_loss(p_box[mask], box[mask]) * 5 + F.cross_entropy(p_cls[mask], cls[mask])
            recall = ((p_obj[mask] > 0) & (p_cls[mask].argmax(-1) == cls[mask])).float().mean()
        else:
            recall = torch.tensor(1.0, device=p_obj.device)
        return loss, {"recall": recall}

    def build_view(self, model: nn.Module, data: Scenes, config: RunConfig) -> cpb.View:
        with torch.no_grad():
            p_obj, p_box, p_cls = model(data.images)
        score = torch.sigmoid(p_obj)  # [I, G, G]
        idx = (score > THRESHOLD).nonzero()
        pred = torch.cat(
            [idx[:, :1].float(), p_cls[idx[:, 0], idx[:, 1], idx[:, 2]].argmax(-1, keepdim=True).float(),
             p_box[idx[:, 0], idx[:, 1], idx[:, 2]], score[idx[:, 0], idx[:, 1], idx[:, 2]].unsqueeze(1)], 1,
        )
        img_idx = torch.arange(SHOWN).unsqueeze(1).expand_as(data.classes)[data.present]
        true = torch.cat(
            [img_idx.unsqueeze(1).float(), data.classes[data.present].unsqueeze(1).float(),
             data.boxes[data.present]], 1,
        )
        return views.boxes(
            data.images[:, 0].numpy(), true.numpy(), pred.numpy().astype(np.float32),
            threshold=THRESHOLD, classes=CLASSES,
        )
