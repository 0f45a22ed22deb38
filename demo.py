"""Quick look at the detector end to end: a randomly initialised DINO on a generated image.

Draws a few coloured rectangles, normalises the image as ImageNet models expect, runs a small
DINO-4scale (ResNet-18) in eval mode and prints its top detections. The model is untrained, so the
detections are meaningless; training on generated data comes with train.py (issue #5).
"""
import torch

from model import build_dino, postprocess

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def generated_image(height: int = 240, width: int = 320, seed: int = 0) -> torch.Tensor:
    """(3, H, W) in [0, 1]: a grey background with three coloured rectangles."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, height, width), 0.5)
    for _ in range(3):
        h, w = int(torch.randint(30, 100, (1,), generator=g)), int(torch.randint(30, 120, (1,), generator=g))
        y, x = int(torch.randint(0, height - h, (1,), generator=g)), int(torch.randint(0, width - w, (1,), generator=g))
        image[:, y:y + h, x:x + w] = torch.rand(3, 1, 1, generator=g)
    return image


def main():
    torch.manual_seed(0)
    model = build_dino("r18", num_classes=3, hidden_dim=128, enc_layers=3, dec_layers=3, num_queries=100).eval()
    image = generated_image()
    normalised = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.inference_mode():
        detections = postprocess(model(normalised[None]), [image.shape[1:]], num_select=5)[0]
    print(f"untrained DINO-4scale (r18, {sum(p.numel() for p in model.parameters()):,} parameters) "
          f"on a {image.shape[2]}x{image.shape[1]} generated image; top 5 detections:")
    for score, label, box in zip(detections["scores"], detections["labels"], detections["boxes"]):
        print(f"  class {int(label)}  score {float(score):.3f}  box x1y1x2y2 {[round(v, 1) for v in box.tolist()]}")


if __name__ == "__main__":
    main()
