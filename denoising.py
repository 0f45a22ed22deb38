"""Contrastive denoising (CDN) queries: DINO (arXiv 2203.03605v4) Sec. 3.3, Fig. 3.

During training, every ground-truth box yields a *positive* query, its box jittered by less than
lambda_1 = `dn_box_noise_scale` of its half size, which the decoder must reconstruct, and a
*negative* query, jittered by between lambda_1 and 2 * lambda_1, which it must call "no object".
Labels are flipped to a random class with probability `dn_label_noise_ratio` / 2 and enter the
decoder through a label embedding. The positives and negatives of all objects of an image form a
group; groups are repeated with fresh noise, and no group may see another, nor may the matching
queries see any of them (the attention mask below).

Dynamic groups: the number of groups is `dn_number // G_max`, at least 1, where G_max is the
largest object count in the batch, so there are at most 2 * max(dn_number, G_max) DN queries:
sparse images get many groups, crowded ones few. Images with fewer than G_max objects fill their free
slots with padding queries (zero content, the centred box (0.5, 0.5, 0.5, 0.5)), which are
trained as "no object" like the negatives. A batch without objects gets no DN queries at all.

Differs from official DINO: the group count is spelled out as max(1, dn_number // G_max) for any
dn_number (official DINO only adapts it when dn_number >= 50), and the noise is drawn from
torch's generator on the model's device.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


@dataclass
class DNQueries:
    content: Tensor      # (B, Q_dn, C) label embeddings; Q_dn = num_groups * group_size
    boxes: Tensor        # (B, Q_dn, 4) noised boxes (cx, cy, w, h) in [0, 1]; padding slots 0.5
    attn_mask: Tensor    # (Q_dn + Q, Q_dn + Q) bool, True where a query (row) may not attend to a key (column)
    num_groups: int
    group_size: int      # 2 * G_max: G_max positive slots, then G_max negative slots

    def positive_indices(self, num_objects: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Per image (query_idx, target_idx): the positive query of object j in every group."""
        device = self.content.device
        out = []
        for n in num_objects:
            target_idx = torch.arange(n, device=device).repeat(self.num_groups)
            group_start = torch.arange(self.num_groups, device=device).repeat_interleave(n) * self.group_size
            out.append((group_start + target_idx, target_idx))
        return out


def jitter_boxes(boxes_cxcywh: Tensor, negative: Tensor, noise_scale: float) -> Tensor:
    """Move each corner of each box by a random amount along each axis (Sec. 3.3, Fig. 3).

    boxes_cxcywh (N, 4); negative (N,) bool. A positive's corners move by less than noise_scale
    times the half width / half height, a negative's by [1, 2) times that. Returns (N, 4) x1y1x2y2,
    not yet clipped to the image.
    """
    half_wh = boxes_cxcywh[:, 2:].repeat(1, 2) / 2  # (N, 4): w/2, h/2, w/2, h/2
    magnitude = torch.rand_like(boxes_cxcywh) + negative[:, None].to(boxes_cxcywh.dtype)
    sign = torch.randint_like(boxes_cxcywh, 0, 2) * 2 - 1
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") + sign * magnitude * half_wh * noise_scale


def build_cdn_queries(targets: list[dict], label_embed: nn.Embedding, num_classes: int, num_queries: int,
                      dn_number: int, box_noise_scale: float, label_noise_ratio: float) -> DNQueries | None:
    """targets[b]["labels"] (G_b,) int64, ["boxes"] (G_b, 4) normalised cxcywh. None if no image has objects."""
    num_objects = [len(t["labels"]) for t in targets]
    g_max = max(num_objects, default=0)
    if g_max == 0 or dn_number <= 0:
        return None
    B, C = len(targets), label_embed.embedding_dim
    num_groups = max(1, dn_number // g_max)
    group_size = 2 * g_max
    num_dn = num_groups * group_size  # Q_dn
    device = label_embed.weight.device

    labels = torch.cat([t["labels"] for t in targets]).to(device)  # (N,), N = sum_b G_b
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=label_embed.weight.dtype)
    image = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(num_objects)])
    within = torch.cat([torch.arange(n, device=device) for n in num_objects])  # object index in its image
    # every object twice per group (positive, negative): copies ordered (group, polarity, object)
    copies = 2 * num_groups
    labels, boxes = labels.repeat(copies), boxes.repeat(copies, 1)
    negative = torch.arange(copies, device=device).repeat_interleave(len(image)) % 2 == 1
    slot = (torch.arange(copies, device=device).repeat_interleave(len(image)) * g_max + within.repeat(copies))
    image = image.repeat(copies)

    flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
    labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    noised = box_convert(jitter_boxes(boxes, negative, box_noise_scale).clamp(0.0, 1.0), "xyxy", "cxcywh")

    content = label_embed.weight.new_zeros(B, num_dn, C)  # padding slots: zero content, centred box
    padded_boxes = noised.new_full((B, num_dn, 4), 0.5)
    content[image, slot] = label_embed(labels)
    padded_boxes[image, slot] = noised

    group = torch.arange(num_dn, device=device) // group_size
    attn_mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool, device=device)
    attn_mask[:num_dn, :num_dn] = group[:, None] != group[None, :]  # groups never see each other
    attn_mask[num_dn:, :num_dn] = True  # matching queries never see DN queries (they would see the answers)
    return DNQueries(content, padded_boxes, attn_mask, num_groups, group_size)
