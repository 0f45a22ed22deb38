"""Contrastive denoising (CDN) queries: DINO (arXiv 2203.03605v4) Sec. 3.3, Fig. 3.

During training, every ground-truth box yields a *positive* query, its box jittered by less than
lambda_1 = `dn_box_noise_scale` of its half size, which the decoder must reconstruct, and a
*negative* query, jittered by between lambda_1 and 2 * lambda_1, which it must call "no object".
Labels are flipped to a random class with probability `dn_label_noise_ratio` / 2 and enter the
decoder through a label embedding. The positives and negatives of all objects of an image form a
group; groups are repeated with fresh noise, and no group may see another, nor may the matching
queries see any of them (the attention mask below).

Dynamic groups: the number of groups is `dn_number // G_max`, at least 1, where G_max is the
largest object count in the batch: sparse images get many groups, crowded ones few. Images with
fewer than G_max objects fill their free slots with padding queries (zero content, the centred box
(0.5, 0.5, 0.5, 0.5)), which are trained as "no object" like the negatives.

Fixed shapes (for a compiled step, appendix/static_shapes.py): there are always Q_dn = 2 * max(dn_number,
G) DN queries, G the targets' padded width (>= G_max, `PaddedTargets`), and the group structure is
computed on the device from the targets' mask, so a batch's object counts change values, never shapes,
and are never read by the host. The slots after the last group are unused: padding queries that no
other query sees (they form groups of their own) and that no loss term reads (`DNQueries.trained`). A
batch without objects has no group at all.

Differs from official DINO: the group count is spelled out as max(1, dn_number // G_max) for any
dn_number (official DINO only adapts it when dn_number >= 50); the noise is drawn from torch's
generator on the model's device, for every slot; the unused tail of slots.
"""
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert



class PaddedTargets(NamedTuple):
    """A batch's targets as tensors, G slots per image: what the denoising queries, the matching and the
    losses take (the first G_b slots of image b hold its objects)."""
    labels: Tensor  # (B, G) int64 class ids; 0 in padding slots
    boxes: Tensor   # (B, G, 4) cxcywh in [0, 1]; (0.5, 0.5, 1, 1) in padding slots, a box with an area
    valid: Tensor   # (B, G) bool, True on the image's objects


def pad_targets(targets: list[dict], slots: int | None = None) -> PaddedTargets:
    """targets [{"labels": (G_b,), "boxes": (G_b, 4)}] * B, on one device -> PaddedTargets of G = `slots`
    (default: the batch's largest G_b, at least 1; a compiled step asks for more, appendix/static_shapes.py)."""
    slots = slots or max(1, *(len(t["labels"]) for t in targets))
    device, dtype, B = targets[0]["labels"].device, targets[0]["boxes"].dtype, len(targets)
    labels = torch.zeros(B, slots, dtype=torch.int64, device=device)
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=dtype, device=device).repeat(B, slots, 1)
    valid = torch.zeros(B, slots, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :n], boxes[b, :n], valid[b, :n] = t["labels"], t["boxes"], True
    return PaddedTargets(labels, boxes, valid)


class DNQueries(NamedTuple):
    content: Tensor       # (B, Q_dn, C) label embeddings; zero in padding and unused slots
    boxes: Tensor         # (B, Q_dn, 4) noised boxes (cx, cy, w, h) in [0, 1]; padding and unused slots 0.5
    attn_mask: Tensor     # (Q_dn + Q, Q_dn + Q) bool, True where a query (row) may not attend to a key (column)
    target_index: Tensor  # (B, Q_dn) int64: the object a positive query reconstructs; -1 for all others
    trained: Tensor       # (Q_dn,) bool: the slots of the groups, the ones the loss reads
    num_groups: Tensor    # () int64
    labels: Tensor        # (B, Q_dn) int64: the class each query carries, after the label noise (its content's row)


def jitter_boxes(boxes_cxcywh: Tensor, negative: Tensor, noise_scale: float) -> Tensor:
    """Move each corner of each box by a random amount along each axis (Sec. 3.3, Fig. 3).

    boxes_cxcywh (..., 4); negative (...) bool. A positive's corners move by less than noise_scale
    times the half width / half height, a negative's by [1, 2) times that. Returns (..., 4) x1y1x2y2,
    not yet clipped to the image.
    """
    half_wh = torch.cat([boxes_cxcywh[..., 2:]] * 2, -1) / 2  # (..., 4): w/2, h/2, w/2, h/2
    magnitude = torch.rand_like(boxes_cxcywh) + negative[..., None].to(boxes_cxcywh.dtype)
    sign = torch.randint_like(boxes_cxcywh, 0, 2) * 2 - 1
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") + sign * magnitude * half_wh * noise_scale


def group_layout(valid: Tensor, dn_number: int, num_dn: int) -> tuple[Tensor, ...]:
    """Which object each of the num_dn slots copies, as tensors on the device (nothing read by the host).

    valid (B, G) bool. Slots are ordered (group, polarity, object): slot = group * 2 G_max + negative *
    G_max + object. Returns num_groups (), group (Q_dn,), object (Q_dn,), negative (Q_dn,) bool, trained
    (Q_dn,) bool (within the groups) and real (B, Q_dn) bool (a copy of one of the image's objects)."""
    counts = valid.sum(1)  # (B,)
    g_max = counts.max()
    step = g_max.clamp(min=1)
    num_groups = (dn_number // step).clamp(min=1)
    slot = torch.arange(num_dn, device=valid.device)
    group, within = slot // (2 * step), slot % (2 * step)
    negative, obj = within >= step, within % step
    trained = (group < num_groups) & (g_max > 0)
    real = trained & (obj[None] < counts[:, None])
    return num_groups, group, obj, negative, trained, real


def build_cdn_queries(targets: PaddedTargets, label_embed: nn.Embedding, num_classes: int, num_queries: int,
                      dn_number: int, box_noise_scale: float, label_noise_ratio: float) -> DNQueries | None:
    """targets: PaddedTargets, labels (B, G), normalised cxcywh boxes (B, G, 4), valid (B, G).
    None if dn_number is 0."""
    if dn_number <= 0:
        return None
    labels, boxes, valid = targets
    B, G = labels.shape
    num_dn = 2 * max(dn_number, G)  # Q_dn: at most num_groups * 2 * G_max are used
    num_groups, group, obj, negative, trained, real = group_layout(valid, dn_number, num_dn)
    source = obj[None].expand(B, -1)  # (B, Q_dn)
    labels = labels.gather(1, source)
    boxes = boxes.to(label_embed.weight.dtype).gather(1, source[..., None].expand(-1, -1, 4))

    flip = torch.rand(labels.shape, device=labels.device) < label_noise_ratio * 0.5
    labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    noised = box_convert(jitter_boxes(boxes, negative.expand(B, -1), box_noise_scale).clamp(0.0, 1.0), "xyxy", "cxcywh")
    content = torch.where(real[..., None], label_embed(labels), 0.0)  # padding slots: zero content, centred box
    noised = torch.where(real[..., None], noised, 0.5)

    attn_mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool, device=labels.device)
    attn_mask[:num_dn, :num_dn] = group[:, None] != group[None, :]  # groups never see each other
    attn_mask[num_dn:, :num_dn] = True  # matching queries never see DN queries (they would see the answers)
    target_index = torch.where(real & ~negative, obj, -1)
    return DNQueries(content, noised, attn_mask, target_index, trained, num_groups, labels)
