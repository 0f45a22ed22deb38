"""Hungarian matching of queries to objects: DETR (arXiv 2005.12872v3) Sec. 3.1, Eq. 1, with the
focal-loss class cost of Deformable DETR / DINO (arXiv 2203.03605v4 Sec. 4.1: costs 2 / 5 / 2).

The cost of assigning query i to object j is
    cost_class * (focal(p_ij, 1) - focal(p_ij, 0)) + cost_bbox * |b_i - b_j|_1 - cost_giou * GIoU(b_i, b_j),
p_ij the query's sigmoid score for the object's class: the class term is how much the focal loss
drops when the query takes the object rather than "no object". scipy's linear_sum_assignment finds
the cheapest one-to-one assignment per image, on the CPU.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from config import Config
from precision import at_least_float32


def matching_cost(logits: Tensor, boxes_cxcywh: Tensor, target_labels: Tensor, target_boxes_cxcywh: Tensor,
                  cost_class: float = Config.set_cost_class, cost_bbox: float = Config.set_cost_bbox,
                  cost_giou: float = Config.set_cost_giou, alpha: float = Config.focal_alpha,
                  gamma: float = Config.focal_gamma) -> Tensor:
    """logits (Q, K), boxes_cxcywh (Q, 4); target_labels (G,), target_boxes_cxcywh (G, 4). Returns (Q, G)."""
    logits, boxes_cxcywh = at_least_float32(logits), at_least_float32(boxes_cxcywh)  # precision.py
    probs = logits.sigmoid()[:, target_labels]  # (Q, G)
    eps = 1e-8  # as official DINO, keeps the logs finite
    positive = alpha * (1 - probs) ** gamma * -(probs + eps).log()
    negative = (1 - alpha) * probs ** gamma * -(1 - probs + eps).log()
    l1 = torch.cdist(boxes_cxcywh, target_boxes_cxcywh.to(boxes_cxcywh.dtype), p=1)
    giou = generalized_box_iou(box_convert(boxes_cxcywh, "cxcywh", "xyxy"),
                               box_convert(target_boxes_cxcywh.to(boxes_cxcywh.dtype), "cxcywh", "xyxy"))
    return cost_class * (positive - negative) + cost_bbox * l1 - cost_giou * giou


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes_cxcywh: Tensor, targets: list[dict],
                    cost_class: float = Config.set_cost_class, cost_bbox: float = Config.set_cost_bbox,
                    cost_giou: float = Config.set_cost_giou, alpha: float = Config.focal_alpha,
                    gamma: float = Config.focal_gamma) -> list[tuple[Tensor, Tensor]]:
    """logits (B, Q, K), boxes_cxcywh (B, Q, 4); targets[b]["labels"] (G_b,), ["boxes"] (G_b, 4).

    Returns per image (query_idx, target_idx), int64, min(Q, G_b) pairs, sorted by query, on logits.device.
    """
    return hungarian_match_sets([(logits, boxes_cxcywh)], targets, cost_class, cost_bbox, cost_giou, alpha, gamma)[0]


@torch.no_grad()
def hungarian_match_sets(predictions: list[tuple[Tensor, Tensor]], targets: list[dict],
                         cost_class: float = Config.set_cost_class, cost_bbox: float = Config.set_cost_bbox,
                         cost_giou: float = Config.set_cost_giou, alpha: float = Config.focal_alpha,
                         gamma: float = Config.focal_gamma) -> list[list[tuple[Tensor, Tensor]]]:
    """hungarian_match for several sets of predictions of the same images (every decoder layer's, the
    encoder's proposals): predictions[s] = (logits (B, Q_s, K), boxes_cxcywh (B, Q_s, 4)); returns
    hungarian_match's result for each set. The costs go to the CPU in one transfer and the
    assignments come back in one, two waits for the GPU per training step instead of two per set and image.
    """
    costs = [matching_cost(l, b, t["labels"], t["boxes"], cost_class, cost_bbox, cost_giou, alpha, gamma)
             for logits, boxes in predictions for l, b, t in zip(logits, boxes, targets)]
    flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()  # as computed (float32); scipy widens it
    if not np.isfinite(flat).all():
        raise FloatingPointError("matching cost is not finite: the model's predictions hold NaN or inf")
    ends = np.cumsum([c.numel() for c in costs])
    pairs = [linear_sum_assignment(chunk.reshape(cost.shape)) for cost, chunk in zip(costs, np.split(flat, ends[:-1]))]
    lengths = [len(rows) for rows, _ in pairs]
    rows_cols = torch.as_tensor(np.concatenate([np.concatenate([rows, cols]) for rows, cols in pairs]), dtype=torch.int64)
    rows_cols = rows_cols.to(predictions[0][0].device, non_blocking=True).split([2 * n for n in lengths])
    indices = [(both[:n], both[n:]) for both, n in zip(rows_cols, lengths)]
    B = len(targets)
    return [indices[i:i + B] for i in range(0, len(indices), B)]
