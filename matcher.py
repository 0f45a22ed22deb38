"""Hungarian matching of queries to objects: DETR (arXiv 2005.12872v3) Sec. 3.1, Eq. 1, with the
focal-loss class cost of Deformable DETR / DINO (arXiv 2203.03605v4 Sec. 4.1: costs 2 / 5 / 2).

The cost of assigning query i to object j is
    cost_class * (focal(p_ij, 1) - focal(p_ij, 0)) + cost_bbox * |b_i - b_j|_1 - cost_giou * GIoU(b_i, b_j),
p_ij the query's sigmoid score for the object's class: the class term is how much the focal loss
drops when the query takes the object rather than "no object". scipy's linear_sum_assignment finds
the cheapest one-to-one assignment per image, on the CPU: the costs of every set of predictions
(each decoder layer's, the encoder's proposals) and image are computed in one batch on the model's
device and cross to the host in one transfer; the assignments come back in one.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert

from config import Config
from denoising import pad_targets


def pairwise_giou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """GIoU (arXiv 1902.09630v2) of every box of boxes1_xyxy (..., Q, 4) with every box of boxes2_xyxy
    (..., G, 4) -> (..., Q, G); torchvision's generalized_box_iou, batched."""
    a, b = boxes1_xyxy[..., :, None, :], boxes2_xyxy[..., None, :, :]  # (..., Q, 1, 4), (..., 1, G, 4)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    enclosing = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (enclosing - union) / enclosing


def matching_costs(logits: Tensor, boxes_cxcywh: Tensor, target_labels: Tensor, target_boxes_cxcywh: Tensor,
                   cost_class: float = Config.set_cost_class, cost_bbox: float = Config.set_cost_bbox,
                   cost_giou: float = Config.set_cost_giou, alpha: float = Config.focal_alpha,
                   gamma: float = Config.focal_gamma) -> Tensor:
    """logits (..., B, Q, K), boxes_cxcywh (..., B, Q, 4); target_labels (B, G), target_boxes_cxcywh
    (B, G, 4). Returns (..., B, Q, G): the cost of every query of every image for every object slot."""
    # sums of many terms: in float32 at least (bf16 and fp16 predictions under --amp), float64 kept
    logits, boxes_cxcywh = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (logits, boxes_cxcywh))
    G = target_labels.shape[-1]
    probs = logits.sigmoid().gather(-1, target_labels[:, None].expand(*logits.shape[:-1], G))  # (..., B, Q, G)
    eps = 1e-8  # as official DINO, keeps the logs finite
    positive = alpha * (1 - probs) ** gamma * -(probs + eps).log()
    negative = (1 - alpha) * probs ** gamma * -(1 - probs + eps).log()
    targets = target_boxes_cxcywh.to(boxes_cxcywh.dtype)
    l1 = (boxes_cxcywh[..., :, None, :] - targets[:, None]).abs().sum(-1)  # torch.cdist(p=1), batched
    giou = pairwise_giou(box_convert(boxes_cxcywh, "cxcywh", "xyxy"), box_convert(targets, "cxcywh", "xyxy"))
    return cost_class * (positive - negative) + cost_bbox * l1 - cost_giou * giou


@torch.no_grad()
def hungarian_assign(costs: Tensor, counts: list[int]) -> Tensor:
    """costs (S, B, Q, G) from matching_costs for S sets of predictions; counts: the objects of each image
    (slots 0 .. counts[b] - 1 are real). Returns (S, B, Q) int64 on costs.device: the object each query is
    assigned, -1 for none; min(Q, counts[b]) queries of each set and image get one."""
    host = costs.detach().cpu().numpy()  # as computed (float32); scipy widens it
    S, B, Q, _ = host.shape
    assigned = np.full((S, B, Q), -1, dtype=np.int64)
    for b, n in enumerate(counts):
        if not np.isfinite(host[:, b, :, :n]).all():
            raise FloatingPointError("matching cost is not finite: the model's predictions hold NaN or inf")
        for s in range(S):
            rows, cols = linear_sum_assignment(host[s, b, :, :n])
            assigned[s, b, rows] = cols
    return torch.from_numpy(assigned).to(costs.device, non_blocking=True)


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes_cxcywh: Tensor, targets: list[dict],
                    cost_class: float = Config.set_cost_class, cost_bbox: float = Config.set_cost_bbox,
                    cost_giou: float = Config.set_cost_giou, alpha: float = Config.focal_alpha,
                    gamma: float = Config.focal_gamma) -> list[tuple[Tensor, Tensor]]:
    """logits (B, Q, K), boxes_cxcywh (B, Q, 4); targets[b]["labels"] (G_b,), ["boxes"] (G_b, 4).

    Returns per image (query_idx, target_idx), int64, min(Q, G_b) pairs, sorted by query, on logits.device.
    (The criterion uses matching_costs and hungarian_assign on all its sets at once.)
    """
    counts = [len(t["labels"]) for t in targets]
    padded = pad_targets(targets)
    costs = matching_costs(logits, boxes_cxcywh, padded.labels, padded.boxes, cost_class, cost_bbox, cost_giou,
                           alpha, gamma)
    assigned = hungarian_assign(costs[None], counts)[0]
    return [(torch.nonzero(a >= 0)[:, 0], a[a >= 0]) for a in assigned]
