"""The DINO training objective: DINO (arXiv 2203.03605v4) Sec. 3.3 and 4.1, on DETR's set loss
(arXiv 2005.12872v3 Sec. 3.1, Eq. 2).

For a set of predictions and an assignment of predictions to objects:
    L = 1.0 * focal(classes) + 5.0 * L1(boxes) + 2.0 * (1 - GIoU(boxes)),
each term summed and divided by the number of objects (averaged over processes in distributed
training). The focal loss (alpha 0.25, gamma 2) sees every query: matched ones learn their object's
class, all others learn "no object" (all K sigmoids towards 0).

The same L is applied to
- the last decoder layer and every earlier one ("_0" ... "_4"), assigned by Hungarian matching;
- the encoder's selected proposals ("_interm"), matched the same way;
- the denoising queries of every layer ("_dn", "_dn_0", ...), with their known assignment: a positive
  query reconstructs its object; negatives and padding queries get no object and so learn "no
  object" through the class term alone (Sec. 3.3). Normalised by the number of objects times groups.
Differs from official DINO: no logging-only terms (class_error, cardinality), and the DN terms are
present only when denoising queries were built. With the same predictions, every term equals the
official criterion's (to 4e-16 in float64).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, box_convert, sigmoid_focal_loss

from config import Config, make_config
from matcher import hungarian_match_sets
from precision import at_least_float32


def giou_loss(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU of each row of boxes1_xyxy (N, 4) with the same row of boxes2_xyxy (N, 4) -> (N,); GIoU as
    official DINO: eps in both denominators, IoU = I / (U + eps), GIoU = IoU - (E - U) / (E + eps), E the
    enclosing box's area. Row by row, not the diagonal of an (N, N) matrix; and not torchvision's
    generalized_box_iou_loss, which computes this formula but indexes with a boolean mask: a wait for
    the GPU in every call, 14 per training step."""
    lt, rb = torch.max(boxes1_xyxy[:, :2], boxes2_xyxy[:, :2]), torch.min(boxes1_xyxy[:, 2:], boxes2_xyxy[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1_xyxy) + box_area(boxes2_xyxy) - inter
    iou = inter / (union + eps)
    wh = (torch.max(boxes1_xyxy[:, 2:], boxes2_xyxy[:, 2:]) - torch.min(boxes1_xyxy[:, :2], boxes2_xyxy[:, :2])).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def set_loss(logits: Tensor, boxes_cxcywh: Tensor, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
             num_boxes: float | Tensor, alpha: float = Config.focal_alpha,
             gamma: float = Config.focal_gamma) -> dict[str, Tensor]:
    """logits (B, Q, K), boxes_cxcywh (B, Q, 4); indices per image (query_idx, target_idx).
    Returns the unweighted terms {"loss_ce", "loss_bbox", "loss_giou"}, computed in float32 at least."""
    logits, boxes_cxcywh = at_least_float32(logits), at_least_float32(boxes_cxcywh)  # precision.py
    batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    target_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
    onehot = torch.zeros_like(logits)
    onehot[batch, query, target_classes] = 1.0
    loss_ce = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes

    src = boxes_cxcywh[batch, query]  # (N, 4)
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
    loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    loss_giou = giou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")).sum() / num_boxes
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


class Criterion:
    """DINO's loss on the model's whole output: `set_loss` on the last decoder layer, each earlier layer and
    the encoder's selected proposals, each matched by Hungarian matching (one matching per set), and on
    the denoising queries of every layer with their known assignment. Weights and matching costs come
    from cfg (Config: *_loss_coef, set_cost_*, focal_alpha, focal_gamma).

    criterion(outputs, targets) with outputs from DINO.forward and targets [{"labels": (G_b,) int64,
    "boxes": (G_b, 4) cxcywh in [0, 1]}] * B returns a dict of every unweighted term, named loss_{ce,
    bbox,giou} plus a suffix ("" last layer, "_0".. earlier layers, "_interm", "_dn", "_dn_0"..), and
    "loss", their weighted sum, the one to backpropagate.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}

    def __call__(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """outputs from DINO.forward; targets[b] = {"labels": (G_b,) int64, "boxes": (G_b, 4) cxcywh}.
        Returns every unweighted term plus "loss", their weighted sum."""
        c = self.cfg
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if dist.is_available() and dist.is_initialized():  # a tensor from here on: reading it would wait for the GPU
            num_boxes = torch.tensor(num_boxes, device=outputs["pred_logits"].device)
            dist.all_reduce(num_boxes)
            num_boxes = (num_boxes / dist.get_world_size()).clamp(min=1)
        else:
            num_boxes = max(num_boxes, 1.0)

        # (suffix, predictions, assignment, normaliser) for every set of predictions that is supervised
        matched = [("", outputs), ("_interm", outputs["interm_outputs"])]
        matched += [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
        assignments = hungarian_match_sets([(out["pred_logits"], out["pred_boxes"]) for _, out in matched], targets,
                                           c.set_cost_class, c.set_cost_bbox, c.set_cost_giou, c.focal_alpha,
                                           c.focal_gamma)
        sets = [(suffix, out, indices, num_boxes) for (suffix, out), indices in zip(matched, assignments)]
        if "dn_outputs" in outputs:
            dn = outputs["dn_queries"]
            known = dn.positive_indices([len(t["labels"]) for t in targets])
            dn_out, dn_boxes = outputs["dn_outputs"], num_boxes * dn.num_groups
            sets.append(("_dn", dn_out, known, dn_boxes))
            sets += [(f"_dn_{i}", aux, known, dn_boxes) for i, aux in enumerate(dn_out["aux_outputs"])]
        terms, total = {}, 0.0
        for suffix, out, indices, normaliser in sets:
            loss = set_loss(out["pred_logits"], out["pred_boxes"], targets, indices, normaliser,
                            c.focal_alpha, c.focal_gamma)
            total = total + sum(self.weights[name] * value for name, value in loss.items())
            terms.update({name + suffix: value for name, value in loss.items()})
        terms["loss"] = total
        return terms


def build_criterion(**overrides) -> Criterion:
    """overrides: Config fields (set_cost_*, *_loss_coef, focal_alpha, focal_gamma)."""
    return Criterion(make_config(**overrides))
