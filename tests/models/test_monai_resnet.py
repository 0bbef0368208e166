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


def _medicalnet_file(tmp_path, depth, shortcut, bias):
    """A file in MedicalNet's layout: {'state_dict': {'module.<key>': tensor}} including its own fc layer."""
    from monai.networks.nets import resnet as monai_resnet

    torch.manual_seed(1)
    net = getattr(monai_resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, widen_factor=0.25,
                                                  conv1_t_size=7, conv1_t_stride=2, shortcut_type=shortcut,
                                                  bias_downsample=bias, num_classes=2)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path, net


def test_medicalnet_layout_weights_load_from_a_local_file(tmp_path):
    path, source = _medicalnet_file(tmp_path, 10, "B", False)
    net = BACKBONES.create("resnet10", widen_factor=0.25, conv1_t_stride=2, shortcut_type="B",
                           bias_downsample=False, pretrained=str(path))
    for key, value in net.net.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_mismatched_pretrained_weights_name_the_keys_and_the_needed_settings(tmp_path):
    from pancls.errors import UserError

    path, _ = _medicalnet_file(tmp_path, 18, "A", True)
    with pytest.raises(UserError, match=r"missing \d+: layer2\.0\.downsample.*needs shortcut_type 'A'") as exc:
        BACKBONES.create("resnet18", widen_factor=0.25, conv1_t_stride=2, shortcut_type="B", pretrained=str(path))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="not found"):
        BACKBONES.create("resnet18", pretrained=str(tmp_path / "nope.pth"))
