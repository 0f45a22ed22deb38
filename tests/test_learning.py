import torch
from torchvision.ops import box_convert, box_iou

from losses import build_criterion
from model import build_dino, postprocess


def three_rectangles(H=128, W=128):
    """A red, a green and a blue rectangle (classes 0, 1, 2) on a dark, noisy background."""
    g = torch.Generator().manual_seed(0)
    boxes_xyxy = torch.tensor([[10, 20, 60, 70], [70, 15, 120, 50], [40, 80, 110, 120]], dtype=torch.float32)
    image = 0.1 * torch.randn(3, H, W, generator=g)
    for (x1, y1, x2, y2), channel in zip(boxes_xyxy.int().tolist(), range(3)):
        image[:, y1:y2, x1:x2] -= 1.0
        image[channel, y1:y2, x1:x2] += 3.0
    target = {"labels": torch.tensor([0, 1, 2]),
              "boxes": box_convert(boxes_xyxy / torch.tensor([W, H, W, H]), "xyxy", "cxcywh")}
    return image, target, boxes_xyxy


def test_small_dino_overfits_one_image():
    """DINO learns: with denoising and the full loss, a small model finds all three objects of one image."""
    torch.manual_seed(0)
    image, target, boxes_xyxy = three_rectangles()
    model = build_dino("r18", num_classes=3, hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2,
                       dim_feedforward=128, num_queries=20, dn_number=20)
    criterion = build_criterion()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not n.startswith("backbone")], "lr": 1e-3},
                                   {"params": [p for n, p in named if n.startswith("backbone")], "lr": 1e-4}],
                                  weight_decay=1e-4)
    model.train()
    for _ in range(110):
        loss = criterion(model(image[None], targets=[target]), [target])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = postprocess(model(image[None]), [image.shape[1:]], num_select=3)[0]
    iou = box_iou(boxes_xyxy, detections["boxes"])  # (objects, detections)
    for obj, label in enumerate(target["labels"].tolist()):
        same_class = detections["labels"] == label
        assert same_class.any() and iou[obj][same_class].max() > 0.8, (obj, detections)
