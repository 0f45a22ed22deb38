"""DINO: DETR with Improved DeNoising Anchor Boxes (arXiv 2203.03605v4), the detector (Sec. 3, Fig. 2).

images -> backbone (3 maps, strides 8/16/32) + a 4th map (stride 64) -> 6-layer deformable encoder
-> mixed query selection: the top-Q encoder proposals give the anchors, content queries stay learned
(Sec. 3.4) -> 6-layer decoder refining the anchors layer by layer, look forward twice (Sec. 3.5)
-> class and box heads shared by all layers. In training, contrastive denoising queries (Sec. 3.3,
denoising.py) ride along in the decoder.

Shapes, one notation throughout: B batch, Q queries (in training Q_dn denoising queries first, then the
matching ones), L levels, S = sum_l H_l*W_l tokens, M heads, D = C / M channels per head, P points,
C = hidden_dim (256), K classes, G ground-truth boxes.
Boxes are (cx, cy, w, h) in [0, 1] of each image's valid (unpadded) size unless named otherwise.

This model computes what official DINO (IDEA-Research/DINO, DINO-4scale) computes with the same
weights; checkpoints.load_checkpoint maps official names onto ours. Where that meant keeping an official
detail the paper does not describe, the line says "official DINO".
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from backbone import build_backbone, run_layer, sine_position_embedding
from config import Config, TooFewTokens, make_config
from deformable_attn import MSDeformAttn
from denoising import PaddedTargets, build_cdn_queries, pad_targets
from msda_cuda import level_layout

NUM_LEVELS = 4  # DINO-4scale: strides 8, 16, 32 from the backbone plus a stride-64 map
ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu}  # config.ACTIVATIONS names them


# --- helpers: positions, boxes --------------------------------------------------------------------

def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and then the numerator and the denominator each clamped
    to at least eps, as official DINO (eps 1e-3): the result lies in [log(eps), -log(eps)]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: Tensor, num_feats: int) -> Tensor:
    """Sine encoding of anchor boxes for the positional queries (DAB-DETR arXiv 2201.12329v4 Sec. 4.2):
    boxes (B, Q, 4) (cx, cy, w, h) -> (B, Q, 4 * num_feats) ordered (y, x, w, h) as official DINO,
    temperature 10000 (not pe_temperature)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    pos = boxes[..., [1, 0, 2, 3], None] * (2 * math.pi) / dim_t  # (B, Q, 4, F): y, x, w, h at once
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-3)


def unpadded_wh(mask: Tensor) -> Tensor:
    """mask (B, H, W), True on padding -> (B, 2) int64: the unpadded width and height in pixels."""
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)


def valid_ratios(mask: Tensor) -> Tensor:
    """mask (B, H, W) -> (B, 2) float32: the unpadded fraction of the width and the height."""
    _, H, W = mask.shape
    return unpadded_wh(mask).float() / torch.tensor([W, H], dtype=torch.float32, device=mask.device)


def pixel_centres(H: int, W: int, device: torch.device) -> Tensor:
    """(H * W, 2) float32: the (x, y) pixel coordinates of the centres of an H x W map, row by row."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(W, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return torch.stack([xs, ys], -1).reshape(H * W, 2)


def encoder_reference_points(level_shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Each token's pixel centre as a reference point on every level (Deformable DETR Sec. 4.1):
    level_shapes [(H_l, W_l)] * L, ratios (B, L, 2) from valid_ratios -> (B, S, L, 2) (x, y) in [0, 1] of
    each padded map, float32."""
    valid_wh = [ratios[:, None, lvl] * ratios.new_tensor([W, H]) for lvl, (H, W) in enumerate(level_shapes)]
    points = [pixel_centres(H, W, ratios.device)[None] / wh for (H, W), wh in zip(level_shapes, valid_wh)]
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]  # normalised to each level's valid size, then padded


def encoder_proposals(memory: Tensor, padding_mask: Tensor, level_shapes: list[tuple[int, int]]):
    """One proposal box per encoder token, for mixed query selection (Sec. 3.4).

    A token at pixel (i, j) of level l proposes the box centred on it, 0.05 * 2^l wide and high,
    in inverse-sigmoid space. Padding tokens and proposals not within (0.01, 0.99) in all four
    coordinates are invalid: their box becomes +inf and their memory 0. Official DINO still lets
    them compete in the top-Q selection (their score is that of a zero memory); so do we.

    The sizes, 0.05 to 0.4, always are. A centre (k + 1/2) / n (pixel k of n unpadded ones) is tested on
    integers, n < 100 k + 50 < 99 n: the official float32 test on any map under 50,000 pixels wide, without
    the rounding of a division (compiled GPU kernels divide approximately: 49.5 / 50 = 0.99 came out valid).
    memory (B, S, C), padding_mask (B, S), level_shapes [(H_l, W_l)] * L.
    Returns memory (B, S, C), proposals (B, S, 4) float32.
    """
    B = memory.shape[0]
    proposals, inside = [], []
    level_masks = padding_mask.split([H * W for H, W in level_shapes], 1)
    for lvl, ((H, W), mask_l) in enumerate(zip(level_shapes, level_masks)):
        n = unpadded_wh(mask_l.view(B, H, W)).view(B, 1, 2)  # unpadded width and height
        centres = pixel_centres(H, W, memory.device)[None]  # (1, H*W, 2): k + 1/2
        hundredfold = (100 * centres).long()  # 100 k + 50, exact
        inside.append(((n < hundredfold) & (hundredfold < 99 * n)).all(-1))
        centres = centres / n  # (B, H*W, 2)
        proposals.append(torch.cat((centres, torch.full_like(centres, 0.05 * 2.0 ** lvl)), -1))
    proposals = torch.cat(proposals, 1)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = (padding_mask | ~torch.cat(inside, 1))[..., None]
    return memory.masked_fill(invalid, 0.0), proposals.masked_fill(invalid, float("inf"))


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# --- encoder and decoder ------------------------------------------------------------------------------

class FFN(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.linear1 = nn.Linear(cfg.hidden_dim, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = ACTIVATION_FUNCTIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN; post-norm (Deformable DETR Sec. 4.1)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn = MSDeformAttn(cfg.hidden_dim, NUM_LEVELS, cfg.nheads, cfg.enc_n_points)
        self.self_attn_norm = nn.LayerNorm(cfg.hidden_dim)
        self.ffn = FFN(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S). Returns (B, S, C)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.self_attn_norm(src + self.dropout(attn))
        return self.ffn_norm(src + self.ffn(src))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.checkpointing = cfg.encoder_checkpointing

    def forward(self, src: Tensor, pos: Tensor, level_shapes: list[tuple[int, int]], spatial_shapes: Tensor,
                level_start_index: Tensor, ratios: Tensor, padding_mask: Tensor) -> Tensor:
        """level_shapes: the (H_l, W_l) of spatial_shapes as Python ints, so no device-to-host copy is needed."""
        reference_points = encoder_reference_points(level_shapes, ratios)  # (B, S, L, 2)
        for layer in self.layers:
            src = run_layer(layer, self.checkpointing, src, pos, reference_points, spatial_shapes,
                            level_start_index, padding_mask)
        return src  # memory (B, S, C)


class DecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN; post-norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        C = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(C, cfg.nheads, dropout=cfg.dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(C)
        self.cross_attn = MSDeformAttn(C, NUM_LEVELS, cfg.nheads, cfg.dec_n_points)
        self.cross_attn_norm = nn.LayerNorm(C)
        self.ffn = FFN(cfg)
        self.ffn_norm = nn.LayerNorm(C)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, query: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, memory_padding_mask: Tensor,
                self_attn_mask: Tensor | None) -> Tensor:
        """query, query_pos (B, Q, C); reference_boxes (B, Q, L, 4); memory (B, S, C);
        self_attn_mask (Q, Q) bool, True = may not attend. Returns (B, Q, C)."""
        q = k = query + query_pos
        attn = self.self_attn(q, k, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.self_attn_norm(query + self.dropout(attn))
        attn = self.cross_attn(query + query_pos, reference_boxes, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        query = self.cross_attn_norm(query + self.dropout(attn))
        return self.ffn_norm(query + self.ffn(query))


def update_box(box: Tensor, offset: Tensor) -> Tensor:
    """Update(b, db) of Sec. 3.5: box (..., 4) cxcywh in [0, 1] moved by offset (..., 4) in inverse-sigmoid
    space."""
    return (offset + inverse_sigmoid(box)).sigmoid()


class Decoder(nn.Module):
    """The 6-layer decoder of DINO (Sec. 3.1, 3.5): each layer refines every query's anchor box, and the next
    layer reads its queries' positions from the refined boxes (DAB-DETR's anchors as positional queries).
    A shared final LayerNorm gives the hidden states the class and box heads (DINO's, handed in) read."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        # positional query P = MLP(PE(anchor)) (DAB-DETR Sec. 4.2): 4 coordinates of C/2 features each
        self.query_pos_head = MLP(2 * cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2)
        self.checkpointing = cfg.decoder_checkpointing

    def forward(self, query: Tensor, anchors: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, ratios: Tensor, memory_padding_mask: Tensor,
                self_attn_mask: Tensor | None, box_head: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """query (B, Q, C) content queries; anchors (B, Q, 4) boxes in [0, 1], not requiring grad.

        Returns every layer's normed hidden states, [(B, Q, C)] * n_layers, and the boxes its loss supervises,
        [(B, Q, 4)] * n_layers (cx, cy, w, h) in [0, 1]. Look forward twice (Sec. 3.5): layer i reads the box
        b_{i-1} (b_0: the anchors) and its box head predicts an offset db_i, and
            b'_i       = Update(b_{i-1}, db_i)    the refined box, with its gradient
            b_i        = Detach(b'_i)             what layer i + 1 reads (look forward once, Deformable DETR)
            b_i^(pred) = Update(b'_{i-1}, db_i)   the box the loss supervises
        with Update(b, db) = sigmoid(db + inverse_sigmoid(b)). b_i^(pred) refines the previous layer's box with
        its gradient, so the loss of layer i also trains layer i-1's box prediction.
        """
        hidden_states, supervised_boxes = [], []
        box, box_with_grad = anchors, anchors  # b_0 and b'_0: the anchors (no gradient)
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]  # (B, 1, L, 4)
        for i, layer in enumerate(self.layers):
            reference_boxes = box[:, :, None] * ratios4  # (B, Q, L, 4) in each padded map's units
            # official DINO: the positional query encodes the box scaled by level 0's valid ratio
            query_pos = self.query_pos_head(box_sine_embedding(reference_boxes[:, :, 0], query.shape[-1] // 2))
            query = run_layer(layer, self.checkpointing, query, query_pos, reference_boxes, memory, spatial_shapes,
                              level_start_index, memory_padding_mask, self_attn_mask)
            hidden = self.norm(query)
            hidden_states.append(hidden)
            supervised_boxes.append(update_box(box_with_grad, box_head(hidden)))  # b_i^(pred)
            if i + 1 < len(self.layers):  # the last layer's refined box would refine nothing
                # official DINO: b'_i reads the layer's output before the shared final norm (b_i^(pred) reads it
                # after): two readings of the one box head
                box_with_grad = update_box(box, box_head(query))  # b'_i
                box = box_with_grad.detach()  # b_i
        return hidden_states, supervised_boxes


# --- the detector ---------------------------------------------------------------------------------------

class DINO(nn.Module):
    """DINO-4scale (Sec. 3, Fig. 2): backbone, deformable encoder, mixed query selection, decoder with look
    forward twice, and the contrastive denoising queries in training. Build it with `build_dino`.

    Input: images (B, 3, H, W), ImageNet-normalised and zero-padded to the batch's size; mask (B, H, W), True
    on padding (None: no padding); in training, targets [{"labels": (G_b,) int64 class ids,
    "boxes": (G_b, 4) cxcywh in [0, 1] of the unpadded image}] * B for the denoising queries.
    Output (a dict): "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) of the last decoder layer (cxcywh in
    [0, 1] of each unpadded image; sigmoid of the logits = score per class), "aux_outputs" the same for
    the earlier layers, "interm_outputs" the encoder's selected proposals, and in training with targets
    "dn_outputs" (the denoising queries' predictions, same layout) and "dn_queries" (denoising.DNQueries).
    `postprocess` turns the output into detections (x1y1x2y2 in pixels, scores, labels).

    Example:
        >>> model = build_dino("r50", num_classes=91).eval()
        >>> out = model(torch.randn(1, 3, 800, 1216))
        >>> detections = postprocess(out, [(800, 1216)])[0]  # {"scores", "labels", "boxes"}, best first
    """

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        C, K = cfg.hidden_dim, cfg.num_classes
        self.backbone = backbone
        in_channels = list(backbone.num_channels)
        # 1x1 projections of the backbone maps, plus a 3x3 stride-2 conv on the last one for the 4th level
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, C, kernel_size=1), nn.GroupNorm(32, C)) for c in in_channels]
            + [nn.Sequential(nn.Conv2d(in_channels[-1], C, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, C))])
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, C))
        self.encoder = Encoder(cfg)
        # mixed query selection (Sec. 3.4): score and box every encoder token, keep the top Q as anchors
        self.enc_output = nn.Linear(C, C)
        self.enc_output_norm = nn.LayerNorm(C)
        self.enc_class_head = nn.Linear(C, K)
        self.enc_box_head = MLP(C, C, 4, 3)
        self.content_queries = nn.Embedding(cfg.num_queries, C)  # the learned half of mixed query selection
        self.decoder = Decoder(cfg)
        self.class_head = nn.Linear(C, K)  # shared by all decoder layers
        self.box_head = MLP(C, C, 4, 3)    # shared; predicts a refinement in inverse-sigmoid space
        # label book of the denoising queries: K classes + 1 (official DINO's dn_labelbook_size + 1)
        self.dn_label_embed = nn.Embedding(K + 1, C)
        self._reset_parameters()

    def _reset_parameters(self):
        # as official DINO: Xavier for the transformer's matrices, Deformable DETR's init for MSDeformAttn
        for module in (self.encoder, self.decoder, self.enc_output, self.content_queries):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        prior_prob = 0.01  # focal loss bias init (RetinaNet arXiv 1708.02002v2 Sec. 4.1)
        for head in (self.class_head, self.enc_class_head):
            nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
        for head in (self.box_head, self.enc_box_head):  # start from the anchor itself
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def multi_scale_features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) -> L maps (B, C, H_l, W_l) and their masks (B, H_l, W_l)."""
        features = self.backbone(images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        srcs.append(self.input_proj[-1](features[-1]))
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        return srcs, masks

    def mixed_query_selection(self, memory: Tensor, padding_mask: Tensor, level_shapes: list[tuple[int, int]]):
        """memory (B, S, C) -> content queries (B, Q, C), anchors (B, Q, 4) in inverse-sigmoid space,
        detached, and the encoder's outputs for the selected tokens (the "interm" predictions)."""
        B, S, _ = memory.shape
        Q = self.cfg.num_queries
        if S < Q:
            raise TooFewTokens(S, Q)
        memory, proposals = encoder_proposals(memory, padding_mask, level_shapes)
        memory = self.enc_output_norm(self.enc_output(memory))
        logits = self.enc_class_head(memory)  # (B, S, K)
        boxes_unsig = self.enc_box_head(memory) + proposals  # (B, S, 4), refined proposals
        topk = logits.max(-1)[0].topk(Q, dim=1)[1]  # (B, Q) the best tokens by their best class score
        anchors_unsig = boxes_unsig.gather(1, topk[..., None].expand(-1, -1, 4))
        interm = {"pred_logits": logits.gather(1, topk[..., None].expand(-1, -1, logits.shape[-1])),
                  "pred_boxes": anchors_unsig.sigmoid()}
        # the selected boxes are the anchors (detached); the content queries are not taken from the
        # encoder but learned: that is what makes the query selection "mixed" (Sec. 3.4)
        content = self.content_queries.weight[None].expand(B, -1, -1)
        return content, anchors_unsig.detach(), interm

    def forward(self, images: Tensor, mask: Tensor | None = None, targets: list[dict] | PaddedTargets | None = None) -> dict:
        """Fig. 2 from left to right: the backbone's multi-scale features, then the transformer and heads.
        Inputs and outputs as in the class docstring; targets may also be denoising.PaddedTargets."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        srcs, masks = self.multi_scale_features(images, mask)
        return self.detect_from_features(srcs, masks, targets)

    def detect_from_features(self, srcs: list[Tensor], masks: list[Tensor],
                             targets: list[dict] | PaddedTargets | None = None) -> dict:
        """The transformer and the heads on L feature maps srcs[l] (B, C, H_l, W_l), masks[l] (B, H_l, W_l)."""
        C = self.cfg.hidden_dim
        level_shapes = [tuple(s.shape[-2:]) for s in srcs]
        spatial_shapes, level_start_index = level_layout(tuple(level_shapes), srcs[0].device)  # (L, 2), (L,)
        pos = [sine_position_embedding(m, C // 2, self.cfg.pe_temperature).to(s.dtype) for m, s in zip(masks, srcs)]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos)], 1)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (B, L, 2)

        memory = self.encoder(src, pos, level_shapes, spatial_shapes, level_start_index, ratios, padding_mask)
        content, anchors_unsig, interm = self.mixed_query_selection(memory, padding_mask, level_shapes)

        dn = None
        if self.training and targets is not None and self.cfg.dn_number > 0:  # contrastive denoising (Sec. 3.3)
            padded = targets if isinstance(targets, PaddedTargets) else pad_targets(targets)  # or train.py did
            dn = build_cdn_queries(padded, self.dn_label_embed, self.cfg.num_classes, self.cfg.num_queries,
                                   self.cfg.dn_number, self.cfg.dn_box_noise_scale, self.cfg.dn_label_noise_ratio)
        if dn is not None:
            content = torch.cat([dn.content, content], 1)
            anchors_unsig = torch.cat([inverse_sigmoid(dn.boxes), anchors_unsig], 1)
        hidden_states, boxes = self.decoder(
            content, anchors_unsig.sigmoid(), memory, spatial_shapes, level_start_index, ratios, padding_mask,
            dn.attn_mask if dn is not None else None, self.box_head)
        logits = [self.class_head(h) for h in hidden_states]
        num_dn = dn.content.shape[1] if dn is not None else 0  # the DN queries come first
        out = _layer_outputs([l[:, num_dn:] for l in logits], [b[:, num_dn:] for b in boxes])
        out["interm_outputs"] = interm
        if dn is not None:
            out["dn_outputs"] = _layer_outputs([l[:, :num_dn] for l in logits], [b[:, :num_dn] for b in boxes])
            out["dn_queries"] = dn
        return out


def _layer_outputs(logits: list[Tensor], boxes: list[Tensor]) -> dict:
    """Last layer's predictions plus the earlier layers' as "aux_outputs"."""
    return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]}


def build_dino(backbone: str = "r50", num_classes: int = 91, imagenet_backbone: bool = False, **overrides) -> DINO:
    """DINO-4scale with `backbone` in ("r50", "swinl", "r18"); overrides are Config fields
    (hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, num_queries, ...).
    `imagenet_backbone` fetches torchvision's ImageNet weights (ResNets only; train.py's --pretrained-backbone
    takes those or a file)."""
    cfg = make_config(backbone=backbone, num_classes=num_classes, **overrides)  # every value checked
    body = build_backbone(cfg.backbone, imagenet_backbone, cfg.drop_path_rate, cfg.backbone_checkpointing)
    return DINO(cfg, body)


@torch.no_grad()
def select_detections(logits: Tensor, boxes: Tensor, target_sizes: Tensor, num_select: int = Config.num_select,
                      clip: bool = False, classes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The num_select best (query, class) pairs of each image over all Q*K sigmoid scores, as official DINO.
    logits (B, Q, K), boxes (B, Q, 4) cxcywh in [0, 1], target_sizes (B, 2) (height, width) of the original
    images; `classes` (K',) int64, the class indices that are categories (None: all K): the rows of no
    category (COCO's 11 gaps, unused ids) were trained as background only and are never reported.
    Returns scores (B, n), labels (B, n), boxes (B, n, 4) x1y1x2y2 in the original pixels, n = min(num_select,
    Q * K'); `clip` clips them to the image (official DINO does not). Tensors in and out: export traces it."""
    if classes is not None:
        logits = logits.index_select(-1, classes)
    B, Q, K = logits.shape
    scores, index = logits.sigmoid().reshape(B, Q * K).topk(min(num_select, Q * K), dim=1)
    query, labels = index // K, index % K
    if classes is not None:
        labels = classes[labels]
    boxes_xyxy = box_convert(boxes, "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
    h, w = target_sizes.to(boxes.dtype).unbind(1)
    size = torch.stack([w, h, w, h], 1)[:, None]  # (B, 1, 4)
    boxes_xyxy = boxes_xyxy * size
    if clip:
        boxes_xyxy = torch.minimum(boxes_xyxy.clamp(min=0), size)
    return scores, labels, boxes_xyxy


@torch.no_grad()
def postprocess(outputs: dict, target_sizes, num_select: int = Config.num_select, clip: bool = False,
                classes: Tensor | None = None) -> list[dict]:
    """select_detections on the model's outputs, per image {"scores": (n,), "labels": (n,), "boxes": (n, 4)
    absolute x1y1x2y2}. target_sizes (B, 2) (height, width) of the original images; `classes` the class
    indices that are categories (None: all)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    B = logits.shape[0]
    target_sizes = torch.as_tensor(target_sizes).to(boxes.device, non_blocking=True)  # no wait for the forward
    if target_sizes.shape != (B, 2):
        raise ValueError(f"target_sizes must be (batch, 2) = ({B}, 2) (height, width), got {tuple(target_sizes.shape)}")
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.int64).to(logits.device, non_blocking=True)
    scores, labels, boxes_xyxy = select_detections(logits, boxes, target_sizes, num_select, clip, classes)
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes_xyxy)]
