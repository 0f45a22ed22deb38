import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from denoising import build_cdn_queries, jitter_boxes, pad_targets


def build(targets, *args, slots=None, **kwargs):
    """build_cdn_queries on a list of target dicts, padded to `slots` (default: the most objects, at least 1)."""
    slots = slots or max(1, max(len(t["labels"]) for t in targets))
    return build_cdn_queries(pad_targets(targets, slots), *args, **kwargs)


def targets_with(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, 10, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], -1)}
            for n in counts]


def cdn(counts, dn_number=100, num_queries=30, **kw):
    return build(targets_with(counts), nn.Embedding(11, 16), num_classes=10, num_queries=num_queries,
                             dn_number=dn_number, box_noise_scale=kw.get("box_noise_scale", 0.4),
                             label_noise_ratio=kw.get("label_noise_ratio", 0.5))


@pytest.mark.parametrize("max_objects, groups, used", [(1, 100, 200), (7, 14, 196), (50, 2, 200), (150, 1, 300)])
def test_group_count_adapts_to_the_most_crowded_image(max_objects, groups, used):
    dn = cdn([max_objects, 1])
    queries = 2 * max(100, max_objects)  # always this many: fixed shapes
    assert dn.num_groups == groups and dn.trained.sum() == used and not dn.trained[used:].any()
    assert dn.content.shape == (2, queries, 16) and dn.boxes.shape == (2, queries, 4)
    assert dn.attn_mask.shape == (queries + 30, queries + 30)


def test_no_objects_gives_no_denoising_group():
    dn = cdn([0, 0])
    assert not dn.trained.any() and (dn.target_index == -1).all() and not dn.content.any()
    assert cdn([3], dn_number=0) is None


def test_padding_the_targets_further_changes_no_query():
    """The same targets padded to 3 slots and to 16 give the same queries (no noise: nothing drawn differs)."""
    targets = targets_with([3, 1])
    args = (nn.Embedding(11, 16), 10, 30, 20, 0.0, 0.0)
    tight, wide = build(targets, *args), build(targets, *args, slots=16)
    assert tight.content.shape[1] == 40 and wide.content.shape[1] == 40
    for a, b in zip(tight, wide):
        assert torch.equal(a, b)


def test_unused_slots_are_seen_by_no_used_query():
    dn = cdn([2, 1], dn_number=5)  # 2 groups of 4 (2 positives, 2 negatives), then 2 unused slots
    assert dn.num_groups == 2 and dn.content.shape[1] == 10 and dn.trained.tolist() == [True] * 8 + [False] * 2
    assert dn.attn_mask[:8, 8:10].all() and dn.attn_mask[10:, :10].all()
    assert (dn.target_index[:, 8:] == -1).all() and not dn.content[:, 8:].any()


def test_attention_mask_blocks():
    dn = cdn([2, 1], dn_number=6)  # 3 groups of 4 (2 positives, 2 negatives) + 30 matching queries
    mask, D = dn.attn_mask, 12
    assert dn.num_groups == 3 and dn.trained.all()
    group = torch.arange(D) // 4
    assert mask[D:, :D].all(), "matching queries must never see DN queries"
    assert not mask[D:, D:].any(), "matching queries see each other"
    assert torch.equal(mask[:D, :D], group[:, None] != group[None, :]), "a group sees itself and no other group"
    assert not mask[:D, D:].any(), "DN queries may look at the matching queries"


def test_dn_groups_cannot_attend_to_each_other_in_the_decoder(monkeypatch):
    """Changing one group's queries leaves every other group's and the matching queries' outputs unchanged."""
    import model as model_module
    from conftest import tiny_dino
    model = tiny_dino(num_classes=10, dn_number=6).train()
    targets, images = targets_with([2, 1]), torch.randn(2, 3, 96, 128)

    def run(perturbed_group):
        def build(*args, **kwargs):
            torch.manual_seed(1)  # the same noise in both runs
            dn = build_cdn_queries(*args, **kwargs)
            if perturbed_group is not None:
                dn.content[:, perturbed_group * 4:(perturbed_group + 1) * 4] += 5.0  # groups of 2 + 2
            return dn
        monkeypatch.setattr(model_module, "build_cdn_queries", build)
        with torch.no_grad():
            return model(images, targets=targets)

    base, changed = run(None), run(1)
    size = 4  # 3 groups of 2 positives + 2 negatives
    dn_base, dn_changed = base["dn_outputs"]["pred_logits"], changed["dn_outputs"]["pred_logits"]
    torch.testing.assert_close(dn_base[:, :size], dn_changed[:, :size])            # group 0
    torch.testing.assert_close(dn_base[:, 2 * size:], dn_changed[:, 2 * size:])    # group 2
    assert not torch.allclose(dn_base[:, size:2 * size], dn_changed[:, size:2 * size])
    torch.testing.assert_close(base["pred_logits"], changed["pred_logits"])         # matching queries


def test_positive_noise_within_lambda_negative_within_lambda_to_2_lambda():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2000, 1)
    negative = torch.arange(2000) % 2 == 1
    moved = jitter_boxes(boxes, negative, noise_scale=0.4) - box_convert(boxes, "cxcywh", "xyxy")
    relative = moved.abs() / (boxes[:, 2:].repeat(1, 2) / 2)  # in half widths / heights
    assert relative[~negative].max() < 0.4
    assert relative[negative].min() >= 0.4 and relative[negative].max() < 0.8
    assert relative[~negative].max() > 0.39 and relative[negative].max() > 0.79  # the whole range is used
    assert (moved > 0).float().mean().sub(0.5).abs() < 0.05  # both directions


def test_positives_then_negatives_in_each_group_with_padding_for_smaller_images():
    torch.manual_seed(0)
    targets = targets_with([2, 1])
    dn = build(targets, nn.Embedding(11, 16), 10, 30, dn_number=4, box_noise_scale=0.0, label_noise_ratio=0.0)
    assert dn.num_groups == 2 and dn.content.shape[1] == 8
    # without noise every positive and negative slot holds its object's box; image 1 pads slot 1 of each half
    for g in range(2):
        for half in range(2):
            start = g * 4 + half * 2
            torch.testing.assert_close(dn.boxes[0, start:start + 2], targets[0]["boxes"])
            torch.testing.assert_close(dn.boxes[1, start], targets[1]["boxes"][0])
            assert torch.equal(dn.boxes[1, start + 1], torch.full((4,), 0.5))
            assert torch.equal(dn.content[1, start + 1], torch.zeros(16))
    assert dn.target_index.tolist() == [[0, 1, -1, -1, 0, 1, -1, -1], [0, -1, -1, -1, 0, -1, -1, -1]]


def test_label_noise_flips_about_a_quarter_of_the_labels():
    torch.manual_seed(0)
    targets = [{"labels": torch.zeros(1000, dtype=torch.long), "boxes": torch.full((1000, 4), 0.5)}]
    embed = nn.Embedding(101, 4)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(101, dtype=torch.float32)[:, None].repeat(1, 4))  # row i holds i
    dn = build(targets, embed, num_classes=100, num_queries=1, dn_number=1000,
                           box_noise_scale=0.4, label_noise_ratio=0.5)
    labels = dn.content[0, :, 0]
    # flipped with probability 0.25 to a uniform class, which is class 0 again 1% of the time
    assert abs((labels != 0).float().mean().item() - 0.25 * 0.99) < 0.03


def test_built_positives_lie_within_lambda_and_negatives_within_lambda_to_2_lambda():
    """Sec. 3.3's two bands, on the queries the model gets: in every group, each corner of a positive's box
    moved by less than lambda times its object's half width / height, each corner of a negative's by
    lambda to 2 lambda (the official noise model, per coordinate). Boxes sit mid-image: no clipping."""
    torch.manual_seed(0)
    lam = 0.4
    targets = [{"labels": torch.tensor([1, 2, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.4, 0.6, 0.1, 0.2], [0.6, 0.4, 0.3, 0.1]],
                                      dtype=torch.float64)}]
    dn = build(targets, nn.Embedding(11, 16).double(), num_classes=10, num_queries=5,
               dn_number=300, box_noise_scale=lam, label_noise_ratio=0.0)
    assert dn.num_groups == 100 and dn.content.shape[1] == 600
    truth = box_convert(targets[0]["boxes"], "cxcywh", "xyxy")
    half = targets[0]["boxes"][:, 2:].repeat(1, 2) / 2
    slots = dn.boxes[0].view(100, 2, 3, 4)  # (group, positive / negative, object, 4)
    moved = (box_convert(slots, "cxcywh", "xyxy") - truth).abs() / half / lam  # in units of lambda
    positives, negatives = moved[:, 0], moved[:, 1]
    assert positives.max() < 1 + 1e-9 and positives.max() > 0.98
    assert negatives.min() > 1 - 1e-9 and negatives.max() < 2 + 1e-9 and negatives.max() > 1.98
    # the positive query of object j in group g is the one the loss asks to reconstruct object j
    assert torch.equal(dn.target_index[0], torch.tensor([0, 1, 2, -1, -1, -1]).repeat(100))
