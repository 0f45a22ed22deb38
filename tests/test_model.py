import math

import pytest
import torch

from backbone import sine_position_embedding
from conftest import tiny_dino
from config import TooFewTokens
from model import box_sine_embedding, build_dino, encoder_proposals, inverse_sigmoid, postprocess


def test_output_shapes():
    model = tiny_dino().eval()
    out = model(torch.randn(2, 3, 96, 128))
    assert out["pred_logits"].shape == (2, 30, 5)
    assert out["pred_boxes"].shape == (2, 30, 4)
    assert len(out["aux_outputs"]) == 1  # dec_layers - 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, 30, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (2, 30, 5)
    assert "dn_outputs" not in out
    boxes = out["pred_boxes"]
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_float64_forward():
    model = tiny_dino().eval().double()
    out = model(torch.randn(1, 3, 96, 128, dtype=torch.float64))
    assert out["pred_logits"].dtype == out["pred_boxes"].dtype == torch.float64


def test_images_in_a_batch_do_not_affect_each_other():
    model = tiny_dino().eval().double()
    images = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        batched = model(images)
        alone = model(images[1:])
    torch.testing.assert_close(batched["pred_logits"][1:], alone["pred_logits"])
    torch.testing.assert_close(batched["pred_boxes"][1:], alone["pred_boxes"])


def test_padded_image_gives_the_same_detections_as_alone():
    """The transformer never reads padding: the same valid features, padded with large garbage inside a
    larger batch, give the outputs they give alone. Two official-DINO details let padding in on purpose:
    the input projections' GroupNorm sees it (so the comparison starts after them), and the decoder's
    positional query encodes the anchor in units of the padded level-0 map (so the decoder's outputs move
    slightly with the padded size: a tolerance there, exactness up to float32 positions before it)."""
    model = tiny_dino().eval().double()
    # Padding tokens are invalid proposals; official DINO lets them compete in the top-Q selection with
    # the score of a zero memory. A zero bias makes that score the prior (-4.6), below every top-Q token.
    torch.nn.init.zeros_(model.enc_output.bias)
    image = torch.randn(1, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        srcs, masks = model.multi_scale_features(image, torch.zeros(1, 96, 128, dtype=torch.bool))
        alone = model.detect_from_features(srcs, masks)
        padded_srcs, padded_masks = [], []
        for s in srcs:
            H, W = s.shape[-2:]
            big = torch.randn(2, s.shape[1], H + 3, W + 2, dtype=torch.float64) * 100  # garbage
            big[0, :, :H, :W] = s[0]
            big_mask = torch.ones(2, H + 3, W + 2, dtype=torch.bool)
            big_mask[0, :H, :W] = False
            big_mask[1] = False
            padded_srcs.append(big)
            padded_masks.append(big_mask)
        padded = model.detect_from_features(padded_srcs, padded_masks)
    for key in ("pred_logits", "pred_boxes"):  # encoder and query selection: exact up to float32 positions
        torch.testing.assert_close(padded["interm_outputs"][key][:1], alone["interm_outputs"][key],
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(padded[key][:1], alone[key], rtol=0, atol=0.03)
    detections_alone = postprocess(alone, [[96, 128]], num_select=5)[0]
    detections_padded = postprocess(padded, [[96, 128], [1, 1]], num_select=5)[0]
    assert torch.equal(detections_alone["labels"], detections_padded["labels"])
    torch.testing.assert_close(detections_alone["boxes"], detections_padded["boxes"], rtol=0, atol=2.0)


def test_gradients_reach_every_trainable_parameter():
    model = tiny_dino().train()
    with torch.no_grad():  # leave the zero initialisations (box heads' last layers, offsets), which block gradients
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])}]
    out = model(torch.randn(2, 3, 96, 128), targets=targets)
    outputs = [out, out["interm_outputs"], out["dn_outputs"], *out["aux_outputs"], *out["dn_outputs"]["aux_outputs"]]
    loss = sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in outputs)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)


def test_look_forward_twice_trains_the_previous_layers_box_prediction():
    """Sec. 3.5: layer i's supervised box is sigmoid(delta_i + inverse_sigmoid(b'_{i-1})), b'_{i-1} layer i-1's
    refined box *with* its gradient, while layer i itself starts from b_{i-1} = Detach(b'_{i-1}). So the gradient
    that layer i's boxes send to the box head's last bias comes twice, through delta_i and through b'_{i-1} (whose
    inverse sigmoid undoes its own sigmoid: a factor of exactly 1), and once for layer 0, whose boxes refine
    the detached anchors: 2 * sum b (1 - b) against 1 * sum b (1 - b). Look forward once gives 1 for every
    layer; a next layer started from undetached boxes adds more."""
    model = tiny_dino(dec_layers=3).double().eval()
    with torch.no_grad():  # leave the zero initialisations, under which the refinement is the identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    captured = {}
    model.decoder.register_forward_hook(lambda module, args, output: captured.update(boxes=output[1]))
    model(torch.randn(1, 3, 96, 128, dtype=torch.float64))
    bias = model.box_head.layers[-1].bias
    for i, boxes in enumerate(captured["boxes"]):
        grad = torch.autograd.grad(boxes.sum(), bias, retain_graph=True)[0]
        expected = (1 if i == 0 else 2) * (boxes * (1 - boxes)).sum((0, 1))
        torch.testing.assert_close(grad, expected, msg=f"layer {i}")


def test_each_decoder_layer_starts_from_detached_boxes():
    """Look forward once (Deformable DETR): the boxes a decoder layer reads, its deformable attention's
    reference boxes and its positional query's source, carry no gradient back into the earlier layers,
    in training with denoising queries as in evaluation."""
    model = tiny_dino(dec_layers=3).train()
    with torch.no_grad():  # leave the zero initialisations, under which the refinement is the identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    out = model(torch.randn(1, 3, 96, 128), targets=targets)
    assert len(seen) == 3 and not any(boxes.requires_grad for boxes in seen)
    assert out["pred_boxes"].requires_grad and out["aux_outputs"][0]["pred_boxes"].requires_grad


def test_sine_position_embedding_follows_the_valid_region():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, :, 3:] = True
    pos = sine_position_embedding(mask, num_feats=8, temperature=20)
    assert pos.shape == (1, 16, 4, 6)
    # x channels (second half): the last valid column is at 2*pi, feature 0 is sin(2*pi) = 0
    x_feat0 = pos[0, 8, 0]
    torch.testing.assert_close(x_feat0[2], torch.tensor(math.sin(2 * math.pi * 3 / (3 + 1e-6))), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_feat0[0], torch.tensor(math.sin(2 * math.pi / 3)), atol=1e-5, rtol=0)


def test_box_sine_embedding_orders_y_x_w_h():
    boxes = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)
    emb = box_sine_embedding(boxes, num_feats=4)
    first_sin = emb[0, 0, ::4]  # feature 0 of each coordinate: sin(2*pi*v)
    torch.testing.assert_close(first_sin, torch.sin(2 * math.pi * boxes[0, 0, [1, 0, 2, 3]]))


def test_encoder_proposals_mark_padding_and_border_tokens_invalid():
    memory = torch.ones(1, 60 * 2 + 1, 4)
    padding = torch.zeros(1, 121, dtype=torch.bool)
    padding[0, 120] = True  # the single token of level 1
    out_memory, proposals = encoder_proposals(memory, padding, [(2, 60), (1, 1)])
    # level 0 is 60 wide: x = 0.5 / 60 < 0.01 in column 0, (59.5) / 60 > 0.99 in column 59
    assert torch.isinf(proposals[0, 0]).all() and torch.isinf(proposals[0, 59]).all()
    assert torch.isfinite(proposals[0, 1]).all()
    torch.testing.assert_close(proposals[0, 1].sigmoid(), torch.tensor([1.5 / 60, 0.25, 0.05, 0.05]))
    assert torch.isinf(proposals[0, 120]).all() and (out_memory[0, 120] == 0).all()
    assert (out_memory[0, 0] == 0).all() and (out_memory[0, 1] == 1).all()


def test_encoder_proposals_are_centred_on_their_token_and_double_in_size_with_each_level():
    """A token at pixel (i, j) of level l proposes the box centred on that pixel, 0.05 * 2^l wide and high."""
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    memory = torch.ones(1, sum(H * W for H, W in shapes), 4)
    _, proposals = encoder_proposals(memory, torch.zeros(1, memory.shape[1], dtype=torch.bool), shapes)
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        level = proposals[0, start:start + H * W].view(H, W, 4)
        valid = torch.isfinite(level).all(-1)
        assert valid.any()
        boxes = level[valid].sigmoid()
        torch.testing.assert_close(boxes[:, 2:], torch.full_like(boxes[:, 2:], 0.05 * 2 ** lvl))
        i, j = valid.nonzero()[0].tolist()
        torch.testing.assert_close(level[i, j, :2].sigmoid(), torch.tensor([(j + 0.5) / W, (i + 0.5) / H]))
        start += H * W


class ApproximateDivision(torch.overrides.TorchFunctionMode):
    """Every floating-point division one ulp off, towards `direction`, as a GPU compiler's approximate
    division may round (torch.compile's Triton kernels divide with div.full.f32)."""

    def __init__(self, direction: float):
        super().__init__()
        self.direction = direction

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.__truediv__, torch.Tensor.__rtruediv__, torch.Tensor.div, torch.div) \
                and out.is_floating_point():
            out = torch.nextafter(out, torch.full_like(out, self.direction))
        return out


@pytest.mark.parametrize("direction", [-math.inf, math.inf])
def test_encoder_proposals_do_not_hang_on_how_a_division_rounds(direction):
    """A 50-row level's last row sits at 49.5 / 50 = 0.99 and a 50-column level's first column at
    0.5 / 50 = 0.01, exactly on the borders: both invalid, however the division rounds."""
    memory = torch.ones(1, 50 * 3 + 2 * 50, 4)
    padding = torch.zeros(1, memory.shape[1], dtype=torch.bool)
    _, exact = encoder_proposals(memory, padding, [(50, 3), (2, 50)])
    with ApproximateDivision(direction):
        _, rounded = encoder_proposals(memory, padding, [(50, 3), (2, 50)])
    invalid = torch.isinf(exact).all(-1)[0]
    assert invalid[49 * 3:150].all() and invalid[150] and invalid[200]  # the last row; the first columns
    assert torch.equal(torch.isinf(rounded).all(-1)[0], invalid)


def test_encoder_proposals_validity_is_the_float32_test_of_the_official_code():
    """Every pixel k < n of rows of every unpadded width n up to 2000: valid exactly where the float32
    centre (k + 0.5) / n is within (0.01, 0.99)."""
    N = 2000
    padding = torch.arange(N)[None] >= torch.arange(1, N + 1)[:, None]  # row n-1 has n unpadded pixels
    _, proposals = encoder_proposals(torch.ones(N, N, 1), padding, [(1, N)])
    centres = (torch.arange(N, dtype=torch.float32) + 0.5)[None] / torch.arange(1, N + 1)[:, None]
    official = (centres > 0.01) & (centres < 0.99) & ~padding
    assert torch.equal(torch.isfinite(proposals).all(-1), official)
    assert 0 < official.sum() < N * N


def test_inverse_sigmoid_clamps_like_official():
    x = torch.tensor([0.0, 0.5, 1.0, 0.2])
    torch.testing.assert_close(inverse_sigmoid(x), torch.log(torch.tensor([1e-3 / 1, 1.0, 1 / 1e-3, 0.25])))


def test_postprocess_picks_the_best_query_class_pairs():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    result = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), num_select=2)[0]
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 1.0]).sigmoid())
    torch.testing.assert_close(result["boxes"], torch.tensor([[0.0, 0.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def test_postprocess_reports_only_the_classes_that_are_categories():
    """Rows 0 and 2 of the class head are no category (ids 1 and 3 are): their scores, the highest here, are
    never reported, and the best pairs among the categories' rows take their places."""
    logits = torch.randn(2, 5, 4)
    logits[..., 0] += 10.0
    logits[..., 2] += 5.0
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    found = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]] * 2), num_select=6,
                        classes=[1, 3])
    for b, result in enumerate(found):
        assert set(result["labels"].tolist()) <= {1, 3} and len(result["labels"]) == 6
        best = logits[b][:, [1, 3]].sigmoid().flatten().topk(6)
        torch.testing.assert_close(result["scores"], best.values)
        assert result["labels"].tolist() == [[1, 3][i % 2] for i in best.indices.tolist()]


def test_too_many_queries_for_a_tiny_image_is_a_clear_error():
    with pytest.raises(TooFewTokens, match="gives 85 encoder tokens, fewer than the 900 queries .* about 209x209 pixels"):
        tiny_dino(num_queries=900).eval()(torch.randn(1, 3, 64, 64))
    tiny_dino(num_queries=900).eval()(torch.randn(1, 3, 209, 209))  # enough


def test_unknown_hyperparameter_is_a_clear_error():
    with pytest.raises(TypeError, match="hidden_dimm"):
        build_dino("r18", hidden_dimm=3)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_dino("vgg")


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])}]
    images = torch.randn(1, 3, 96, 128)
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = tiny_dino(backbone_checkpointing=on, encoder_checkpointing=on, decoder_checkpointing=on).train()
        torch.manual_seed(1)
        out = model(images, targets=targets)
        loss = out["pred_boxes"].sum() + out["pred_logits"].sum() + out["dn_outputs"]["pred_boxes"].sum()
        loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt["pred_boxes"], plain["pred_boxes"])
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], msg=name)


def test_bf16_autocast_agrees_with_float32():
    """Mixed precision keeps positions, proposals and box refinement in float32; the bf16 encoder's scores
    and the decoder's boxes stay within bf16 rounding of the float32 ones (relative error < 3%; boxes
    within 0.01 of the image). Compared per token / given the same anchors, since a top-Q selection
    among near-equal scores may pick others."""
    model = tiny_dino().eval()
    with torch.no_grad():  # leave the zero initialisations, under which the box refinement is the identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    images = torch.randn(1, 3, 96, 128)
    captured = []
    model.enc_class_head.register_forward_hook(lambda m, args, out: captured.append(out.float()))
    decoder_inputs = {}

    def keep_inputs(module, args):
        decoder_inputs.setdefault("args", args)
    model.decoder.register_forward_pre_hook(keep_inputs)
    with torch.no_grad():
        model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    full, half = captured
    assert (half - full).norm() / full.norm() < 0.03
    args = decoder_inputs["args"]
    with torch.no_grad():
        hidden_full, boxes_full = model.decoder(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden_half, boxes_half = model.decoder(*args)
    assert boxes_half[-1].dtype == torch.float32  # refinement in float32
    assert 0 < (boxes_half[-1] - boxes_full[-1]).abs().max() < 0.01
    assert (hidden_half[-1].float() - hidden_full[-1]).norm() / hidden_full[-1].norm() < 0.03
