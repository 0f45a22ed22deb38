import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from denoising import DNQueries, pad_targets
from losses import build_criterion, set_losses


def set_loss(logits, boxes, targets, indices, num_boxes):
    """set_losses on one set of predictions given as per-image (query_idx, target_idx), as a dict of the terms."""
    assigned = torch.full(logits.shape[:2], -1, dtype=torch.int64)
    for b, (q, t) in enumerate(indices):
        assigned[b, q] = t
    padded = pad_targets(targets, max(len(t["labels"]) for t in targets))
    values = set_losses(logits[None], boxes[None], padded, assigned[None], torch.tensor(num_boxes, dtype=torch.float64))
    return dict(zip(("loss_ce", "loss_bbox", "loss_giou"), values[0]))


def test_focal_l1_and_giou_terms_by_hand():
    # query 0 takes object 0 (class 0); query 1 is unmatched; both have logit 0 (p = 0.5)
    logits = torch.zeros(1, 2, 1, dtype=torch.float64)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.4]], dtype=torch.float64)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    terms = set_loss(logits, boxes, targets, indices, num_boxes=1.0)
    # focal: -log(0.5) * (1 - 0.5)^2, weighted 0.25 for the positive and 0.75 for the negative
    torch.testing.assert_close(terms["loss_ce"], torch.tensor((0.25 + 0.75) * 0.25 * math.log(2), dtype=torch.float64))
    torch.testing.assert_close(terms["loss_bbox"], torch.tensor(0.1 + 0.2, dtype=torch.float64))
    # x1y1x2y2 (.4,.4,.6,.6) vs (.5,.3,.7,.7): intersection .02, union .10, enclosing .12, and official
    # DINO's 1e-6 in both denominators: GIoU = .02 / (.10 + 1e-6) - (.12 - .10) / (.12 + 1e-6)
    giou = 0.02 / (0.10 + 1e-6) - 0.02 / (0.12 + 1e-6)
    torch.testing.assert_close(terms["loss_giou"], torch.tensor(1 - giou, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    halved = set_loss(logits, boxes, targets, indices, num_boxes=2.0)
    torch.testing.assert_close(halved["loss_bbox"], terms["loss_bbox"] / 2)


def test_focal_loss_weighs_positives_by_alpha_and_negatives_by_one_minus_alpha():
    """Two queries of different confidence, one matched (class 0), one not: the focal terms by hand
    (RetinaNet arXiv 1708.02002v2 Eq. 5, alpha 0.25 on the positives, gamma 2)."""
    logits = torch.tensor([[[1.0], [-0.5]]], dtype=torch.float64)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([0]), "boxes": boxes[0, :1]}]
    terms = set_loss(logits, boxes, targets, [(torch.tensor([0]), torch.tensor([0]))], num_boxes=1.0)
    p0, p1 = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)), torch.sigmoid(torch.tensor(-0.5, dtype=torch.float64))
    expected = 0.25 * (1 - p0) ** 2 * -torch.log(p0) + 0.75 * p1 ** 2 * -torch.log(1 - p1)
    torch.testing.assert_close(terms["loss_ce"], expected)


def random_leaves(B=2, Q=6, K=3, D=8, layers=2):
    """(logits, raw boxes) leaf pairs for: each decoder layer, the interm outputs, each DN layer."""
    sizes = [Q] * (layers + 1) + [D] * layers
    return [t for n in sizes for t in (torch.randn(B, n, K, dtype=torch.float64, requires_grad=True),
                                         torch.randn(B, n, 4, dtype=torch.float64, requires_grad=True))]


def known_layout(counts, groups, group_size, slots):
    """DNQueries.target_index (B, slots) for `groups` groups of `group_size` slots, object j of an image at
    slot j of each group; every slot of the groups trained."""
    index = torch.full((len(counts), slots), -1)
    for b, n in enumerate(counts):
        for g in range(groups):
            index[b, g * group_size:g * group_size + n] = torch.arange(n)
    return index, torch.arange(slots) < groups * group_size


def assemble(leaves, layers=2, groups=2):
    """DINO-shaped outputs from random_leaves; boxes pass through a sigmoid so they stay valid."""
    pairs = list(zip(leaves[0::2], leaves[1::2]))
    pred = lambda logits, raw: {"pred_logits": logits, "pred_boxes": raw.sigmoid() * 0.5 + 0.25}
    decoder, interm, dn = pairs[:layers], pairs[layers], pairs[layers + 1:]
    B, D, _ = dn[-1][0].shape
    Q = decoder[-1][0].shape[1]
    target_index, trained = known_layout([len(t["labels"]) for t in TARGETS], groups, D // groups, D)
    return {**pred(*decoder[-1]), "aux_outputs": [pred(*p) for p in decoder[:-1]], "interm_outputs": pred(*interm),
            "dn_outputs": {**pred(*dn[-1]), "aux_outputs": [pred(*p) for p in dn[:-1]]},
            "dn_queries": DNQueries(torch.zeros(B, D, 1), torch.zeros(B, D, 4), torch.zeros(D + Q, D + Q, dtype=torch.bool),
                                    target_index, trained, torch.tensor(groups), torch.zeros(B, D, dtype=torch.int64))}


TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]], dtype=torch.float64)},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.25, 0.25]], dtype=torch.float64)}]


def test_every_term_is_there_and_weighted():
    torch.manual_seed(0)
    out = assemble(random_leaves(layers=3), layers=3)
    terms = build_criterion()(out, TARGETS)
    suffixes = ["", "_0", "_1", "_interm", "_dn", "_dn_0", "_dn_1"]
    assert set(terms) == {f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in suffixes} | {"loss"}
    expected = sum(w * terms[f"loss_{t}{s}"] for t, w in (("ce", 1.0), ("bbox", 5.0), ("giou", 2.0)) for s in suffixes)
    torch.testing.assert_close(terms["loss"], expected)
    reweighted = build_criterion(bbox_loss_coef=0.0, giou_loss_coef=0.0)(out, TARGETS)
    torch.testing.assert_close(reweighted["loss"], sum(terms[f"loss_ce{s}"] for s in suffixes))


def test_denoising_terms_use_the_known_assignment():
    torch.manual_seed(0)
    out = assemble(random_leaves(D=6, layers=1), layers=1)  # 2 groups of 3: image 0's objects at slots 0,1 and 3,4
    terms = build_criterion()(out, TARGETS)
    dn = out["dn_outputs"]
    src = dn["pred_boxes"][0, [0, 1, 3, 4]]
    tgt = TARGETS[0]["boxes"].repeat(2, 1)
    l1 = (src - tgt).abs().sum() + (dn["pred_boxes"][1, [0, 3]] - TARGETS[1]["boxes"]).abs().sum()
    torch.testing.assert_close(terms["loss_bbox_dn"], l1 / (3 * 2))  # 3 objects x 2 groups


def test_unused_denoising_slots_are_in_no_loss_term():
    """2 groups of 4 slots, then 2 unused (denoising.py's fixed shapes): the terms equal those of the 8 used
    slots alone, whatever the unused ones predict."""
    torch.manual_seed(0)
    out = assemble(random_leaves(D=10, layers=1), layers=1)
    target_index, trained = known_layout([2, 1], 2, 4, 10)
    out["dn_queries"] = out["dn_queries"]._replace(target_index=target_index, trained=trained)
    used = {**out, "dn_outputs": {k: v[:, :8] for k, v in out["dn_outputs"].items() if k != "aux_outputs"} | {"aux_outputs": []},
            "dn_queries": out["dn_queries"]._replace(target_index=target_index[:, :8], trained=trained[:8])}
    got, want = build_criterion()(out, TARGETS), build_criterion()(used, TARGETS)
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-14, atol=0)


def test_total_loss_gradcheck():
    torch.manual_seed(0)
    criterion = build_criterion()
    leaves = random_leaves(B=2, Q=4, D=4, layers=2)
    assert torch.autograd.gradcheck(lambda *t: criterion(assemble(t), TARGETS)["loss"], tuple(leaves))


def test_images_without_objects_push_all_scores_down():
    logits = torch.zeros(2, 5, 3, dtype=torch.float64, requires_grad=True)
    boxes = torch.full((2, 5, 4), 0.5, dtype=torch.float64)
    out = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [],
           "interm_outputs": {"pred_logits": logits, "pred_boxes": boxes}}
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4, dtype=torch.float64)}] * 2
    terms = build_criterion()(out, empty)
    assert terms["loss_bbox"] == 0 and terms["loss_giou"] == 0
    # no objects: the focal loss of 30 "no object" sigmoids at p = 0.5, normalised by one object, not by zero
    torch.testing.assert_close(terms["loss_ce"], torch.tensor(30 * 0.75 * 0.25 * math.log(2), dtype=torch.float64))
    terms["loss"].backward()
    assert (logits.grad > 0).all()  # gradient descent lowers every logit


def test_a_model_trains_on_a_batch_with_and_without_objects():
    from conftest import tiny_dino
    model, criterion = tiny_dino(num_classes=3).train(), build_criterion()
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for targets in ([empty, empty], [TARGETS[0], empty]):
        targets = [{k: v.float() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
        out = model(torch.randn(2, 3, 96, 128), targets=targets)
        objects = any(len(t["labels"]) for t in targets)
        assert bool(out["dn_queries"].trained.any()) == objects  # without objects, no DN group
        terms = criterion(out, targets)
        assert (terms["loss_ce_dn"] > 0) == objects
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"])


def _distributed_num_boxes(rank, world_size, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # rank 0 has 1 object, rank 1 has 3: each normalises by the mean, 2
        n = 1 if rank == 0 else 3
        target = {"labels": torch.zeros(n, dtype=torch.long), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(n, 1)}
        boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2]]]).repeat(1, n, 1)
        out = {"pred_logits": torch.zeros(1, n, 1), "pred_boxes": boxes, "aux_outputs": [],
               "interm_outputs": {"pred_logits": torch.zeros(1, n, 1), "pred_boxes": boxes}}
        results[rank] = build_criterion()(out, [target])["loss_bbox"].item()
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_processes():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed_num_boxes, args=(2, port, results), nprocs=2)
    assert results[0] == pytest.approx(0.2 * 1 / 2) and results[1] == pytest.approx(0.2 * 3 / 2)


def test_without_denoising_model_and_criterion_still_train():
    from conftest import tiny_dino
    model = tiny_dino(num_classes=3, dn_number=0).train()
    targets = [{k: v.float() if v.is_floating_point() else v for k, v in TARGETS[0].items()}]
    out = model(torch.randn(1, 3, 96, 128), targets=targets)
    assert "dn_outputs" not in out
    terms = build_criterion()(out, targets)
    assert not any("_dn" in name for name in terms)
    terms["loss"].backward()
    assert model.class_head.weight.grad is not None
