import pytest
import torch

from pancls.models import BACKBONES, create_model


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 1, 32, 32, 16)), (2, (2, 3, 32, 32))])
def test_feature_width_matches_out_features(spatial_dims, shape):
    net = BACKBONES.create("resnet10", spatial_dims=spatial_dims, in_channels=shape[1], widen_factor=0.25)
    feats = net(torch.randn(shape))
    assert feats.shape == (2, net.out_features)


def test_3d_classifier_with_tsp_head_trains_one_step():
    torch.manual_seed(0)
    model = create_model("resnet10", "tsp", 6, backbone_kwargs={"widen_factor": 0.25}, head_kwargs={"dim": 16})
    x, y = torch.randn(2, 1, 32, 32, 16), torch.tensor([0, 5])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model(x).shape == (2, 6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_bad_spatial_dims_is_refused():
    with pytest.raises(ValueError, match="spatial_dims"):
        BACKBONES.create("resnet18", spatial_dims=4)
