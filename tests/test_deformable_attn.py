import pytest
import torch

from deformable_attn import MSDeformAttn
import deformable_attn
import msda_cuda
from deformable_attn import ms_deform_attn_reference
from msda_cuda import ms_deform_attn, ms_deform_attn_gather, traced_as
from test_msda_cuda import random_inputs


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """One point at a time: bilinear interpolation written out, zero outside the map."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(B, Q, M, D)
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        v = value[:, start:start + H * W].view(B, H, W, M, D)
        for b in range(B):
            for q in range(Q):
                for m in range(M):
                    for p in range(P):
                        x = sampling_locations[b, q, m, lvl, p, 0] * W - 0.5
                        y = sampling_locations[b, q, m, lvl, p, 1] * H - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        sample = value.new_zeros(D)
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= yy < H and 0 <= xx < W:
                                    weight = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                    sample = sample + weight * v[b, yy, xx, m]
                        out[b, q, m] += attention_weights[b, q, m, lvl, p] * sample
        start += H * W
    return out.view(B, Q, M * D)


@pytest.mark.parametrize("formulation", [ms_deform_attn_reference, ms_deform_attn_gather])
@pytest.mark.parametrize("shapes", [[(6, 4), (3, 2)], [(5, 7)], [(1, 1), (4, 3), (2, 5)]])
def test_reference_and_gather_formulation_match_naive_bilinear_loop(shapes, formulation):
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(shapes)
    expected = naive_ms_deform_attn(value, spatial_shapes, locations, weights)
    got = formulation(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def border_locations(shapes, B, Q, M, P, dtype):
    """Locations (B, Q, M, L, P, 2) drawn from each level's awkward places: both borders, the first and last
    pixel centres, half and whole pixels beyond each border, pixel edges, and random points 30% beyond."""
    g = torch.Generator().manual_seed(1)
    levels = []
    for H, W in shapes:
        xy = []
        for n in (W, H):
            special = torch.tensor([0.0, 1.0, 0.5 / n, 1 - 0.5 / n, -0.5 / n, -1 / n, 1 + 0.5 / n, 1 + 1 / n,
                                    1 / n, 1 - 1 / n, 2.5 / n], dtype=torch.float64)
            pick = torch.randint(0, 2 * len(special), (B, Q, M, P), generator=g)
            drawn = torch.rand(B, Q, M, P, generator=g, dtype=torch.float64) * 1.6 - 0.3
            xy.append(torch.where(pick < len(special), special[pick.clamp(max=len(special) - 1)], drawn))
        levels.append(torch.stack(xy, -1))
    return torch.stack(levels, 3).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_gather_formulation_is_grid_sample_on_and_beyond_every_border(dtype, tol):
    """The export's formulation (gathers and arithmetic) computes F.grid_sample's bilinear sampling with zero
    padding, align_corners=False (the reference), where the corners fall outside the map too."""
    shapes = [(6, 4), (3, 5), (1, 1), (2, 7)]
    value, spatial_shapes, level_start_index, _, weights = random_inputs(shapes, B=3, Q=40, M=2, D=4, P=4, dtype=dtype)
    locations = border_locations(shapes, 3, 40, 2, 4, dtype)
    want = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    got = ms_deform_attn_gather(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_trace_records_the_formulation_chosen(monkeypatch):
    """Under tracing the attention is never the kernel: traced_as picks gather.py's formulation or the reference."""
    value, spatial_shapes, level_start_index, locations, weights = random_inputs([(6, 4), (3, 2)], dtype=torch.float32)
    calls = []
    for module, name, attribute in ((msda_cuda, "gather", "ms_deform_attn_gather"),
                                    (deformable_attn, "grid_sample", "ms_deform_attn_reference")):
        formulation = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, lambda *a, name=name, f=formulation: calls.append(name) or f(*a))
    fn = lambda v, loc, w: ms_deform_attn(v, spatial_shapes, level_start_index, loc, w)  # noqa: E731
    for name in ("gather", "grid_sample"):
        with traced_as(name):
            torch.jit.trace(fn, (value, locations, weights), check_trace=False)
    assert calls == ["gather", "grid_sample"]
    with pytest.raises(ValueError, match="formulation must be one of"):
        with traced_as("grid"):
            pass


def test_reference_gradcheck_float64():
    inputs = random_inputs([(4, 3), (2, 2)], B=1, Q=3, M=2, D=2, P=2, requires_grad=True)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # random locations lie off the pixel-centre grid lines, where bilinear sampling has kinks
    fn = lambda v, loc, w: ms_deform_attn_reference(v, spatial_shapes, level_start_index, loc, w)
    assert torch.autograd.gradcheck(fn, (value, locations, weights))


def test_entry_point_on_the_cpu_agrees_with_the_reference_and_dino_msda_reference_forces_it(monkeypatch):
    args = random_inputs([(6, 4), (3, 2)])
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args), rtol=1e-13, atol=1e-13)
    monkeypatch.setenv("DINO_MSDA", "reference")
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args), rtol=0, atol=0)


def test_module_locations_from_points_and_boxes():
    """Points: offsets in pixels of each level. Boxes: offsets in half box sizes divided by P."""
    torch.manual_seed(0)
    C, L, M, P = 8, 2, 2, 3
    attn = MSDeformAttn(C, L, M, P).double()
    shapes = torch.tensor([[6, 4], [3, 2]])
    start = torch.tensor([0, 24])
    query, value = torch.randn(1, 4, C, dtype=torch.float64), torch.randn(1, 30, C, dtype=torch.float64)
    offsets = attn.sampling_offsets(query).view(1, 4, M, L, P, 2)
    weights = attn.attention_weights(query).view(1, 4, M, L * P).softmax(-1).view(1, 4, M, L, P)
    v = attn.value_proj(value).view(1, 30, M, C // M)

    points = torch.rand(1, 4, L, 2, dtype=torch.float64)
    size = torch.stack([shapes[:, 1], shapes[:, 0]], -1).double().view(1, 1, 1, L, 1, 2)
    loc = points[:, :, None, :, None] + offsets / size
    expected = attn.output_proj(ms_deform_attn_reference(v, shapes, start, loc, weights))
    torch.testing.assert_close(attn(query, points, value, shapes, start), expected)

    boxes = torch.rand(1, 4, L, 4, dtype=torch.float64)
    loc = boxes[:, :, None, :, None, :2] + offsets * boxes[:, :, None, :, None, 2:] / (2 * P)
    expected = attn.output_proj(ms_deform_attn_reference(v, shapes, start, loc, weights))
    torch.testing.assert_close(attn(query, boxes, value, shapes, start), expected)


def test_padding_mask_zeroes_the_values():
    attn = MSDeformAttn(8, 1, 2, 2).double()
    shapes, start = torch.tensor([[3, 3]]), torch.tensor([0])
    query, points = torch.randn(1, 2, 8, dtype=torch.float64), torch.rand(1, 2, 1, 2, dtype=torch.float64)
    value = torch.randn(1, 9, 8, dtype=torch.float64)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 5:] = True
    garbage = value.clone()
    garbage[0, 5:] = 1e6
    torch.testing.assert_close(attn(query, points, value, shapes, start, mask),
                               attn(query, points, garbage, shapes, start, mask))


def test_initial_offsets_point_along_each_heads_direction():
    attn = MSDeformAttn(16, 2, 8, 3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    # head 0 looks right, head 2 down (y grows downwards), head 4 left; point k at distance k + 1
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[2, 1, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[4, 0, :, 0], torch.tensor([-1.0, -2.0, -3.0]))
