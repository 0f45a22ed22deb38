"""Every hyperparameter, with the seed's values as defaults (official DINO's config/DINO/DINO_4scale.py).

`build_dino(**overrides)`, `build_criterion(**overrides)` and train.py's flags all come from these
fields, and the matcher's and the losses' keyword defaults point at them (`Config.set_cost_class`...):
each default lives here and nowhere else.
"""
import math
from dataclasses import dataclass, fields


@dataclass
class Config:
    # model (DINO arXiv 2203.03605v4 Sec. 4.1; Deformable DETR arXiv 2010.04159v4 Sec. 4.1)
    backbone: str = "r50"               # r50 | swinl | r18
    num_classes: int = 91               # largest category id + 1 (COCO: 90 + 1), as official DINO
    hidden_dim: int = 256               # C
    nheads: int = 8                     # M
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "relu"            # relu | gelu, the transformer FFN's activation
    num_queries: int = 900              # matching queries, chosen by mixed query selection (Sec. 3.4)
    enc_n_points: int = 4               # P in the encoder's deformable attention
    dec_n_points: int = 4               # P in the decoder's deformable attention
    pe_temperature: float = 20.0        # sine position encoding of the feature maps (official: 20, DETR: 10000)
    drop_path_rate: float = 0.2         # Swin-L stochastic depth (official DINO's Swin default)
    # activation checkpointing (recompute in the backward instead of storing): memory for compute
    backbone_checkpointing: bool = False   # per ResNet layer / Swin block
    encoder_checkpointing: bool = False    # per encoder layer
    decoder_checkpointing: bool = False    # per decoder layer
    # contrastive denoising (Sec. 3.3)
    dn_number: int = 100                # positive DN queries per image, about: max(1, dn_number // G_max) groups
                                        # of G_max positives and G_max negatives, so 2 * max(dn_number, G_max)
                                        # DN queries at most (denoising.py)
    dn_box_noise_scale: float = 0.4     # lambda_1; negatives get noise in [lambda_1, 2 * lambda_1)
    dn_label_noise_ratio: float = 0.5   # a DN label is flipped with probability dn_label_noise_ratio / 2
    # Hungarian matching (DETR arXiv 2005.12872v3 Sec. 3.1) and the loss (DINO Sec. 4.1: focal, L1, GIoU)
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # inference
    num_select: int = 300               # detections kept per image by postprocess
    # training (official DINO_4scale.py; batch size 1 and 100 epochs as the seed)
    lr: float = 1e-4                    # AdamW, everything but the backbone
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1          # gradient clipping
    batch_size: int = 1                 # per process
    epochs: int = 100
    lr_drop: int = 90                   # the lr is multiplied by 0.1 after this many epochs
    scale: float = 1.0                  # image sizes x scale (Swin-L fine-tuning: 1.5)
    amp: bool = False                   # mixed precision: bf16 where the GPU supports it, else fp16
    compile: bool = False               # torch.compile the training step, on fixed shapes (appendix/static_shapes.py)
    ema: bool = False                   # evaluate and keep an exponential moving average of the weights
    ema_decay: float = 0.9997
    eval_every: int = 1                 # epochs between evaluations on the validation set
    patience: int = 0                   # stop after this many evaluations without a better AP (0: never)
    num_workers: int = 2                # data loading processes per training process
    seed: int = 42


class ConfigError(ValueError):
    """A hyperparameter out of its range; the message names its flag."""


class TooFewTokens(ValueError):
    """An image too small for the number of queries: mixed query selection keeps Q of its S encoder tokens."""

    def __init__(self, tokens: int, queries: int):
        # a side-n square gives about n^2 / 64 * (1 + 1/4 + 1/16 + 1/64) tokens on the strides 8, 16, 32, 64
        side = math.ceil(math.sqrt(queries * 64 / (1 + 1 / 4 + 1 / 16 + 1 / 64)))
        super().__init__(f"an image (after resizing) gives {tokens} encoder tokens, fewer than the {queries} queries "
                         f"the model keeps: it needs about {side}x{side} pixels or more (or a model with fewer "
                         f"queries)")


BACKBONES = ("r50", "swinl", "r18")
MAX_CLASSES = 100_000  # class ids are category ids: a larger one is a numbering, not a class count (LVIS: 1,203)
# the fields that make a trained model what it is: fine-tuning from one of our checkpoints takes them from it
ARCHITECTURE = ("backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "activation",
                "num_queries", "enc_n_points", "dec_n_points", "pe_temperature")
# the fields a resumed run (train.py --resume) may change, each taking effect from where it goes on: the
# optimiser's rates and decay, the schedule's length and drop, how often it evaluates, what it keeps and
# how it loads and recomputes. Every other field would make the run another one (the architecture, the
# batch size: samples already trained or never trained, the augmentation, the objective, the seed).
CHANGEABLE_ON_RESUME = ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "epochs", "lr_drop", "eval_every", "patience",
                        "num_select", "num_workers", "compile", "backbone_checkpointing", "encoder_checkpointing",
                        "decoder_checkpointing")
ACTIVATIONS = ("relu", "gelu")
positive, non_negative = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
at_least_one, fraction = (lambda v: v >= 1, ">= 1"), (lambda v: 0 <= v <= 1, "in [0, 1]")
RULES = {  # field -> (valid?, what valid means); every other field takes any value of its type
    "backbone": (lambda v: v in BACKBONES, f"one of {', '.join(BACKBONES)}"),
    "activation": (lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
    "num_classes": (lambda v: 1 <= v <= MAX_CLASSES, f"in 1..{MAX_CLASSES}"), "nheads": at_least_one, "enc_layers": at_least_one, "dec_layers": at_least_one,
    "hidden_dim": (lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32 (GroupNorm(32) in the input projections)"),
    "dim_feedforward": at_least_one, "num_queries": at_least_one, "enc_n_points": at_least_one,
    "dec_n_points": at_least_one, "num_select": at_least_one, "batch_size": at_least_one, "epochs": at_least_one,
    "eval_every": at_least_one, "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"), "pe_temperature": positive, "scale": positive,
    "lr": positive, "lr_backbone": non_negative, "weight_decay": non_negative, "clip_max_norm": non_negative,
    "dn_number": non_negative, "dn_box_noise_scale": non_negative, "dn_label_noise_ratio": fraction,
    "set_cost_class": non_negative, "set_cost_bbox": non_negative, "set_cost_giou": non_negative,
    "cls_loss_coef": non_negative, "bbox_loss_coef": non_negative, "giou_loss_coef": non_negative,
    "focal_alpha": fraction, "focal_gamma": non_negative, "lr_drop": non_negative, "ema_decay": fraction,
    "num_workers": non_negative, "patience": non_negative,
}


def flag(field: str) -> str:
    """The train.py flag of a Config field: hidden_dim -> --hidden-dim."""
    return "--" + field.replace("_", "-")


def make_config(**overrides) -> Config:
    """Config with `overrides` applied, every value checked: an unknown name is a TypeError that lists the
    valid ones, a value of the wrong type or out of its range a ConfigError naming the flag."""
    names = {f.name: f for f in fields(Config)}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {unknown}; valid names: {sorted(names)}")
    for name, value in overrides.items():
        kind = type(names[name].default)
        if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                or kind is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{flag(name)} takes a {kind.__name__}, got {value!r}")
    cfg = Config(**overrides)
    if cfg.hidden_dim % max(cfg.nheads, 1):
        raise ConfigError(f"--hidden-dim ({cfg.hidden_dim}) must be divisible by --nheads ({cfg.nheads})")
    for name, (valid, meaning) in RULES.items():
        if not valid(getattr(cfg, name)):
            raise ConfigError(f"{flag(name)} must be {meaning}, got {getattr(cfg, name)!r}")
    return cfg


def parse_overrides(items: list[str]) -> dict:
    """["hidden_dim=64", "amp=false"] -> {"hidden_dim": 64, "amp": False}, each value of its field's type
    (booleans: true/false, yes/no, 1/0). For the benchmarks' --set; train.py has a flag per field."""
    types = {f.name: type(f.default) for f in fields(Config)}
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        if types[name] is bool:
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if text.lower() not in words:
                raise ValueError(f"{item!r}: {name} takes true or false")
            overrides[name] = words[text.lower()]
        else:
            try:
                overrides[name] = types[name](text)
            except ValueError:
                raise ValueError(f"{item!r}: {name} takes a {types[name].__name__}") from None
    return overrides
