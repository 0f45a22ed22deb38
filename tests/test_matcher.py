import itertools

import pytest
import torch

from matcher import hungarian_match, matching_costs


def matching_cost(logits, boxes, target_labels, target_boxes, *args, **kwargs):
    """matching_costs of one image: (Q, K), (Q, 4) predictions, (G,), (G, 4) targets -> (Q, G)."""
    return matching_costs(logits[None], boxes[None], target_labels[None], target_boxes[None], *args, **kwargs)[0]


def random_problem(Q, G, K=4, dtype=torch.float64):
    logits = torch.randn(1, Q, K, dtype=dtype)
    boxes = torch.cat([torch.rand(1, Q, 2, dtype=dtype) * 0.6 + 0.2, torch.rand(1, Q, 2, dtype=dtype) * 0.3 + 0.05], -1)
    target = {"labels": torch.randint(0, K, (G,)),
              "boxes": torch.cat([torch.rand(G, 2, dtype=dtype) * 0.6 + 0.2, torch.rand(G, 2, dtype=dtype) * 0.3 + 0.05], -1)}
    return logits, boxes, target


@pytest.mark.parametrize("Q, G", [(4, 3), (5, 5), (6, 2), (3, 5)])
def test_matching_is_optimal_against_brute_force(Q, G):
    for seed in range(5):
        torch.manual_seed(seed)
        logits, boxes, target = random_problem(Q, G)
        cost = matching_cost(logits[0], boxes[0], target["labels"], target["boxes"])
        rows, cols = hungarian_match(logits, boxes, [target])[0]
        assert len(rows) == min(Q, G) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        ours = cost[rows, cols].sum()
        if Q >= G:  # each object to a distinct query
            best = min(cost[list(p), range(G)].sum() for p in itertools.permutations(range(Q), G))
        else:       # each query to a distinct object
            best = min(cost[range(Q), list(p)].sum() for p in itertools.permutations(range(G), Q))
        torch.testing.assert_close(ours, best)


def test_class_cost_is_the_focal_loss_difference():
    logits = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    cost = matching_cost(logits, boxes, torch.tensor([1]), boxes, cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    p = torch.sigmoid(torch.tensor(-1.2, dtype=torch.float64))
    expected = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
    torch.testing.assert_close(cost[0, 0], expected)
    # identical boxes: L1 0, GIoU 1
    torch.testing.assert_close(matching_cost(logits, boxes, torch.tensor([1]), boxes, 0.0, 1.0, 1.0)[0, 0],
                               torch.tensor(-1.0, dtype=torch.float64))


def test_box_cost_is_the_l1_distance_and_giou_by_hand():
    """A 2x2 case worked out on paper: the L1 cost sums the four absolute differences (p=1, not the
    Euclidean distance), the GIoU cost is minus the GIoU of the two boxes in x1y1x2y2."""
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.4]], dtype=torch.float64)
    target = torch.tensor([[0.6, 0.4, 0.2, 0.3], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    logits = torch.zeros(2, 1, dtype=torch.float64)
    labels = torch.tensor([0, 0])
    l1 = matching_cost(logits, boxes, labels, target, cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    expected = torch.tensor([[0.1 + 0.1 + 0.0 + 0.1, 0.2 + 0.2 + 0.1 + 0.1],
                             [0.3 + 0.2 + 0.1 + 0.1, 0.0 + 0.3 + 0.2 + 0.1]], dtype=torch.float64)
    torch.testing.assert_close(l1, expected)
    torch.testing.assert_close(matching_cost(logits, boxes, labels, target, 0.0, 5.0, 0.0), 5 * expected)
    # box 0 (.4,.4,.6,.6) against target 0 (.5,.25,.7,.55): intersection .1 x .15 = .015, union .04 + .06 - .015
    # = .085, enclosing (.4,.25,.7,.6) = .105: GIoU = .015 / .085 - (.105 - .085) / .105
    giou = matching_cost(logits, boxes, labels, target, cost_class=0.0, cost_bbox=0.0, cost_giou=2.0)
    torch.testing.assert_close(giou[0, 0], torch.tensor(-2 * (0.015 / 0.085 - 0.02 / 0.105), dtype=torch.float64))


def test_every_cost_term_moves_the_assignment():
    """Two queries, two objects: each cost alone prefers its own assignment, so a cost left out, or read
    from the wrong term, gives the other one."""
    target = {"labels": torch.tensor([0, 1]),
              "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]], dtype=torch.float64)}
    # query 0 scores class 1 and sits on object 0; query 1 scores class 0 and sits on object 1
    logits = torch.tensor([[[-5.0, 5.0], [5.0, -5.0]]], dtype=torch.float64)
    boxes = target["boxes"][None].clone()
    by_class = hungarian_match(logits, boxes, [target], cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)[0]
    by_l1 = hungarian_match(logits, boxes, [target], cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)[0]
    by_giou = hungarian_match(logits, boxes, [target], cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)[0]
    assert by_class[1].tolist() == [1, 0]
    assert by_l1[1].tolist() == [0, 1] and by_giou[1].tolist() == [0, 1]


def test_matching_follows_a_permutation_of_the_targets():
    torch.manual_seed(0)
    logits, boxes, target = random_problem(8, 4)
    rows, cols = hungarian_match(logits, boxes, [target])[0]
    perm = torch.tensor([2, 0, 3, 1])
    permuted = {"labels": target["labels"][perm], "boxes": target["boxes"][perm]}
    rows_p, cols_p = hungarian_match(logits, boxes, [permuted])[0]
    assert rows_p.tolist() == rows.tolist()
    assert perm[cols_p].tolist() == cols.tolist()


def test_batched_matching_equals_single_image_matching():
    torch.manual_seed(0)
    problems = [random_problem(6, g) for g in (3, 0, 5)]
    logits = torch.cat([p[0] for p in problems])
    boxes = torch.cat([p[1] for p in problems])
    batched = hungarian_match(logits, boxes, [p[2] for p in problems])
    for (rows, cols), (l, b, t) in zip(batched, problems):
        single_rows, single_cols = hungarian_match(l, b, [t])[0]
        assert rows.tolist() == single_rows.tolist() and cols.tolist() == single_cols.tolist()


def test_empty_targets_give_empty_indices():
    logits, boxes, _ = random_problem(5, 1)
    rows, cols = hungarian_match(logits, boxes, [{"labels": torch.zeros(0, dtype=torch.long),
                                                  "boxes": torch.zeros(0, 4)}])[0]
    assert rows.shape == cols.shape == (0,) and rows.dtype == cols.dtype == torch.int64


def test_non_finite_predictions_are_a_clear_error():
    logits, boxes, target = random_problem(5, 2)
    logits[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        hungarian_match(logits, boxes, [target])
