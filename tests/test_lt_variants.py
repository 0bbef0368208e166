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


@pytest.mark.parametrize("name", lt_grid.VARIANTS)
def test_every_variant_is_a_valid_recipe(name):
    head, loss, overrides = lt_grid.variant(name)
    overrides = [o.replace("{first_milestone}", "10") for o in overrides]
    data = apply_overrides(load_yaml(ROOT / "configs" / "lt_cpu_reduced.yaml"),
                           [f"model.head={head}", f"loss.name={loss}", *overrides])
    cfg = load_config(data)
    assert cfg.model.head == head and cfg.loss.name == loss
    net, criterion = build_model_and_loss(cfg.model, cfg.loss, [500, 50, 5, 5, 5, 5, 5, 5, 5, 5])
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and criterion.num_classes == 10
