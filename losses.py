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
The terms are computed for all sets at once, on dense tensors (every query of every set, with a mask of the
matched ones): a few dozen operators however many sets and images, and the same shapes every step,
which a compiled training step needs (appendix/static_shapes.py hands `Criterion` its compiled forms).
Differs from official DINO: no logging-only terms (class_error, cardinality). With the same predictions,
every term equals the official criterion's (to 4e-16 in float64).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, sigmoid_focal_loss

from config import Config, make_config
from denoising import PaddedTargets, pad_targets
from matcher import hungarian_assign, matching_costs

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def giou_loss(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - GIoU of each box of boxes1_xyxy (..., 4) with the same box of boxes2_xyxy (..., 4) -> (...); GIoU
    as official DINO: eps in both denominators, IoU = I / (U + eps), GIoU = IoU - (E - U) / (E + eps), E
    the enclosing box's area. Box by box, not the diagonal of an (N, N) matrix; and not torchvision's
    generalized_box_iou_loss, which computes this formula but indexes with a boolean mask: a wait for
    the GPU in every call."""
    def area(wh):
        return wh[..., 0] * wh[..., 1]
    inter = area((torch.min(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
                  - torch.max(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])).clamp(min=0))
    union = area(boxes1_xyxy[..., 2:] - boxes1_xyxy[..., :2]) + area(boxes2_xyxy[..., 2:] - boxes2_xyxy[..., :2]) - inter
    iou = inter / (union + eps)
    enclosing = area((torch.max(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
                      - torch.min(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])).clamp(min=0))
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def set_losses(logits: Tensor, boxes_cxcywh: Tensor, targets: PaddedTargets, assigned: Tensor,
               num_boxes: Tensor, trained: Tensor | None = None, alpha: float = Config.focal_alpha,
               gamma: float = Config.focal_gamma) -> Tensor:
    """The unweighted terms of S sets of predictions of the same images.

    logits (S, B, Q, K), boxes_cxcywh (S, B, Q, 4); targets: labels (B, G), boxes (B, G, 4); assigned
    (S, B, Q) int64, the object slot of each query or -1; num_boxes () the normaliser; trained (Q,)
    bool, the queries the class term reads (None: all). Returns (S, 3): loss_ce, loss_bbox, loss_giou
    of each set, in float32 at least.
    """
    # sums of many terms: in float32 at least (bf16 and fp16 predictions under --amp), float64 kept
    logits, boxes_cxcywh = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (logits, boxes_cxcywh))
    S, B, Q, K = logits.shape
    matched = assigned >= 0  # (S, B, Q)
    slot = assigned.clamp(min=0)
    labels = targets.labels[None].expand(S, -1, -1).gather(2, slot)  # (S, B, Q)
    onehot = F.one_hot(labels, K).to(logits.dtype) * matched[..., None]  # "no object" for the unmatched
    focal = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma)  # (S, B, Q, K)
    if trained is not None:
        focal = focal * trained[:, None]
    target_boxes = targets.boxes.to(boxes_cxcywh.dtype)[None].expand(S, -1, -1, -1).gather(
        2, slot[..., None].expand(-1, -1, -1, 4))  # (S, B, Q, 4)
    l1 = torch.where(matched[..., None], (boxes_cxcywh - target_boxes).abs(), 0.0)
    giou = torch.where(matched, giou_loss(box_convert(boxes_cxcywh, "cxcywh", "xyxy"),
                                          box_convert(target_boxes, "cxcywh", "xyxy")), 0.0)
    return torch.stack([focal.sum((1, 2, 3)), l1.sum((1, 2, 3)), giou.sum((1, 2))], -1) / num_boxes


def matched_sets(outputs: dict) -> list[tuple[str, dict]]:
    """(suffix, predictions) of every set supervised through Hungarian matching."""
    return ([("", outputs), ("_interm", outputs["interm_outputs"])]
            + [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])])


def predictions(sets: list[tuple[str, dict]]) -> tuple[list[Tensor], list[Tensor]]:
    """[(B, Q, K)] * S logits and [(B, Q, 4)] * S boxes of S sets of predictions."""
    return [out["pred_logits"] for _, out in sets], [out["pred_boxes"] for _, out in sets]


def stacked_costs(logits: list[Tensor], boxes_cxcywh: list[Tensor], *args) -> Tensor:
    """matching_costs of S sets of predictions given as lists (stacked here, inside a compiled criterion's program
    rather than before it)."""
    return matching_costs(torch.stack(logits).detach(), torch.stack(boxes_cxcywh).detach(), *args)


def stacked_losses(logits: list[Tensor], boxes_cxcywh: list[Tensor], *args) -> Tensor:
    """set_losses of S sets of predictions given as lists."""
    return set_losses(torch.stack(logits), torch.stack(boxes_cxcywh), *args)


class Criterion:
    """DINO's loss on the model's whole output: `set_losses` on the last decoder layer, each earlier layer and
    the encoder's selected proposals, each matched by Hungarian matching (one matching per set), and on
    the denoising queries of every layer with their known assignment. Weights and matching costs come
    from cfg (Config: *_loss_coef, set_cost_*, focal_alpha, focal_gamma); `fast`, if given, wraps the two
    functions that compute the costs and the terms (a compiled training step passes torch.compile's).

    criterion(outputs, targets) with outputs from DINO.forward and targets [{"labels": (G_b,) int64,
    "boxes": (G_b, 4) cxcywh in [0, 1]}] * B returns a dict of every unweighted term, named loss_{ce,
    bbox,giou} plus a suffix ("" last layer, "_0".. earlier layers, "_interm", "_dn", "_dn_0"..), and
    "loss", their weighted sum, the one to backpropagate.
    """

    def __init__(self, cfg: Config, fast=None):
        self.cfg = cfg
        self.weights = (cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef)  # in TERMS' order
        fast = fast or (lambda function: function)
        self.costs, self.losses = fast(stacked_costs), fast(stacked_losses)

    def __call__(self, outputs: dict, targets: list[dict], padded: PaddedTargets | None = None) -> dict[str, Tensor]:
        """outputs from DINO.forward; targets[b] = {"labels": (G_b,) int64, "boxes": (G_b, 4) cxcywh}, and
        `padded`, the same as pad_targets makes them (to more slots for a compiled step), if the caller has them.
        Returns every unweighted term plus "loss", their weighted sum."""
        c = self.cfg
        counts = [len(t["labels"]) for t in targets]
        if padded is None:
            padded = pad_targets(targets)
        num_boxes = padded.valid.sum().to(torch.float32)  # on the device: never read by the host
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        num_boxes = num_boxes.clamp(min=1)

        sets = matched_sets(outputs)
        logits, boxes = predictions(sets)
        costs = self.costs(logits, boxes, padded.labels, padded.boxes, c.set_cost_class,
                           c.set_cost_bbox, c.set_cost_giou, c.focal_alpha, c.focal_gamma)
        assigned = hungarian_assign(costs, counts)  # (S, B, Q): the step's one wait for the device
        values = [self.losses(logits, boxes, padded, assigned, num_boxes, None, c.focal_alpha, c.focal_gamma)]
        suffixes = [suffix for suffix, _ in sets]
        if "dn_outputs" in outputs:
            dn, dn_out = outputs["dn_queries"], outputs["dn_outputs"]
            dn_sets = [("_dn", dn_out)] + [(f"_dn_{i}", aux) for i, aux in enumerate(dn_out["aux_outputs"])]
            logits, boxes = predictions(dn_sets)
            known = dn.target_index[None].expand(len(dn_sets), -1, -1)
            values.append(self.losses(logits, boxes, padded, known, num_boxes * dn.num_groups, dn.trained,
                                      c.focal_alpha, c.focal_gamma))
            suffixes += [suffix for suffix, _ in dn_sets]
        values = torch.cat(values)  # (S, 3)
        terms = {name + suffix: value for suffix, row in zip(suffixes, values) for name, value in zip(TERMS, row)}
        terms["loss"] = sum(weight * term for weight, term in zip(self.weights, values.sum(0)))
        return terms


def build_criterion(**overrides) -> Criterion:
    """overrides: Config fields (set_cost_*, *_loss_coef, focal_alpha, focal_gamma)."""
    return Criterion(make_config(**overrides))
