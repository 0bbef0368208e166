"""The lt_grid recipes (configs/lt_variants/*.yaml) are valid configs: each lays over the reduced CPU recipe,
passes the strict config schema, and builds its model and loss."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pancls.config import apply_overrides, load_yaml
from pancls.lt import load_config
from pancls.schemas import build_model_and_loss

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lt_grid", ROOT / "scripts" / "lt_grid.py")
lt_grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lt_grid)


def test_the_grid_knows_every_variant_file():
    assert lt_grid.VARIANTS == sorted(p.stem for p in (ROOT / "configs" / "lt_variants").glob("*.yaml"))
    assert {"softmax", "tsp_kernel_s16", "tsp_paper", "softmax_la", "tsp_kernel_la"} <= set(lt_grid.VARIANTS)


def _stage1(folder: Path) -> dict:
    """A stage-1 cell as a two-stage variant names it: a softmax run folder with last.pt."""
    cfg = load_config(apply_overrides(load_yaml(ROOT / "configs" / "lt_cpu_reduced.yaml"), ["model.head=softmax"]))
    torch.manual_seed(1)
    net, _ = build_model_and_loss(cfg.model, cfg.loss, [500, 50, 5, 5, 5, 5, 5, 5, 5, 5])
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict()}, folder / "last.pt")
    return net.backbone.state_dict()


@pytest.mark.parametrize("name", lt_grid.VARIANTS)
def test_every_variant_is_a_valid_recipe(name, tmp_path):
    head, loss, overrides = lt_grid.variant(name)
    overrides = lt_grid.fill(overrides, {"{first_milestone}": "10", "{out}": str(tmp_path), "{dataset}": "cifar10",
                                         "{ratio}": "100", "{seed}": "0"})
    assert not [o for o in overrides if "{" in o.partition("=")[2]], "a placeholder the grid does not fill"
    two_stage = any(o.startswith("model.init_backbone_from=") for o in overrides)
    if two_stage:
        stage1 = _stage1(tmp_path / lt_grid.cell_name("cifar10", 100, "softmax", 0))
    data = apply_overrides(load_yaml(ROOT / "configs" / "lt_cpu_reduced.yaml"),
                           [f"model.head={head}", f"loss.name={loss}", *overrides])
    cfg = load_config(data)
    assert cfg.model.head == head and cfg.loss.name == loss
    net, criterion = build_model_and_loss(cfg.model, cfg.loss, [500, 50, 5, 5, 5, 5, 5, 5, 5, 5])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and criterion.num_classes == 10
    if two_stage:  # stage 2: the stage-1 backbone, frozen; a new head that trains
        for key, value in stage1.items():
            assert torch.equal(net.backbone.state_dict()[key], value), key
        assert net.backbone_frozen and not any(p.requires_grad for p in net.backbone.parameters())
        assert all(p.requires_grad for p in net.head.parameters())
