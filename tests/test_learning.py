import torch
from torchvision.ops import box_convert, box_iou

import train
from config import make_config
from conftest import tiny_dino
from losses import Criterion
from model import postprocess
from appendix.safe_step import make_grad_scaler


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
    overrides = dict(enc_layers=1, num_queries=20, dn_number=20)
    model = tiny_dino(num_classes=3, **overrides).train()
    cfg = make_config(**{**model.cfg.__dict__, "lr": 1e-3, "lr_backbone": 1e-4})  # clipping 0.1, as the seed
    optimizer, scaler = train.build_optimizer(model, cfg), make_grad_scaler(image.device, cfg)
    mask = torch.zeros(1, *image.shape[1:], dtype=torch.bool)
    for _ in range(110):  # train.py's own step
        train.train_step(model, Criterion(cfg), optimizer, scaler, image[None], mask, [target], cfg)
    model.eval()
    with torch.no_grad():
        detections = postprocess(model(image[None]), [image.shape[1:]], num_select=3)[0]
    iou = box_iou(boxes_xyxy, detections["boxes"])  # (objects, detections)
    for obj, label in enumerate(target["labels"].tolist()):
        same_class = detections["labels"] == label
        assert same_class.any() and iou[obj][same_class].max() > 0.8, (obj, detections)
