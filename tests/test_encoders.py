"""ConvEncoder: any square size >= 8, the pooling rule, gradients, and the unchanged 64x64 architecture."""

import pytest
import torch
from torch import nn

from worldmodel.encoders import ChannelLayerNorm, ConvEncoder


def reference_encoder(image_size: int, pool: int, depth: int, out_dim: int) -> nn.Module:
    """The ConvEncoder as it was before any-size support (image_size / pool a multiple of 16), norm="layer"."""
    layers = [nn.AvgPool2d(pool)] if pool > 1 else []
    width_in = 3
    for mult in (1, 2, 4, 8):
        layers += [nn.Conv2d(width_in, depth * mult, 4, stride=2, padding=1, bias=False), ChannelLayerNorm(depth * mult), nn.SiLU()]
        width_in = depth * mult
    res = image_size // pool // 16
    return nn.ModuleDict({"convs": nn.Sequential(*layers), "head": nn.Linear(width_in * res * res, out_dim)})


@pytest.mark.parametrize("image_size, pool", [(64, 2), (64, 1), (32, 1), (128, 2)])
def test_sizes_valid_before_keep_the_same_architecture_and_outputs(image_size, pool):
    torch.manual_seed(0)
    ref = reference_encoder(image_size, pool, depth=16, out_dim=8)
    torch.manual_seed(0)
    enc = ConvEncoder(image_size, 3, out_dim=8, depth=16, norm="layer", pool=pool)
    assert [type(m) for m in enc.convs] == [type(m) for m in ref["convs"]]
    assert {k: v.shape for k, v in enc.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for (name, a), b in zip(enc.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same seeded init
    frames = torch.randint(0, 256, (3, image_size, image_size, 3), dtype=torch.uint8)
    x = (frames.float() / 255 - 0.5).permute(0, 3, 1, 2)
    # equal up to round-off: pooled encoders average the uint8 frames before scaling them
    torch.testing.assert_close(enc(frames), ref["head"](ref["convs"](x).flatten(1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.double()(frames), ref.double()["head"](ref["convs"]((frames.double() / 255 - 0.5).permute(0, 3, 1, 2)).flatten(1)),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("image_size, pool, used_pool, stages, res", [
    (8, 2, 1, 3, 1), (10, 2, 1, 3, 1), (16, 2, 1, 4, 1), (24, 2, 1, 4, 1), (48, 2, 2, 4, 1), (48, 4, 3, 4, 1),
    (64, 2, 2, 4, 2), (96, 2, 2, 4, 3), (96, 8, 6, 4, 1), (33, 2, 1, 4, 2),
])
def test_any_square_size_encodes_with_gradients(image_size, pool, used_pool, stages, res):
    enc = ConvEncoder(image_size, 3, out_dim=5, depth=4, pool=pool)
    assert enc.pool == used_pool
    assert sum(isinstance(m, nn.Conv2d) for m in enc.convs) == stages
    assert enc.head.in_features == 4 * 2 ** (stages - 1) * res * res
    frames = torch.rand(2, image_size, image_size, 3, requires_grad=True)
    out = enc(frames)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert frames.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_bad_sizes_raise():
    for size in (7, 4, 0, 10.5):
        with pytest.raises(ValueError, match="image_size must be an int >= 8"):
            ConvEncoder(size)
    with pytest.raises(ValueError, match="pool"):
        ConvEncoder(64, pool=0)
    with pytest.raises(ValueError, match=r"frames must have shape \(N, 10, 10, 3\)"):
        ConvEncoder(10)(torch.zeros(1, 16, 16, 3))
