"""The lt_grid recipes (configs/lt_variants/*.yaml) are valid configs: each lays over the reduced CPU recipe,
passes the strict config schema, and builds its model and loss."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
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


def _shell_default(path: Path, name: str) -> list:
    """The default of ``NAME=${NAME:-"a b c"}`` in a shell script, as a list of words."""
    found = re.search(rf'^{name}=\$\{{{name}:-"([^"]*)"\}}', path.read_text(), flags=re.M)
    assert found, f"no default for {name} in {path}"
    return found.group(1).split()


def test_the_gpu_script_and_the_queue_name_only_known_variants():
    """A typo in a shell script's variant list would cost a GPU session or a night of CPU: they must exist."""
    gpu = _shell_default(ROOT / "scripts" / "gpu_lt.sh", "VARIANTS")
    assert gpu[:4] == ["softmax", "softmax_la", "tsp_paper_nu7", "tsp_paper_nu7_la"] and set(gpu) <= set(lt_grid.VARIANTS)
    queue = (ROOT / "bench" / "issue16_queue.sh").read_text()
    named = set(re.findall(r"--variants \"?([a-z0-9_]+)", queue)) | {
        word for group in re.findall(r'for (?:v|pair) in ([^;]+);', queue) for word in re.findall(r"[a-z][a-z0-9_]+", group)}
    named -= {"v", "pair", "seed"}
    assert named and named <= set(lt_grid.VARIANTS), named - set(lt_grid.VARIANTS)


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


def _kept_cell(folder: Path, name: str, seed: int, top1: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{lt_grid.cell_name('cifar10', 100, name, seed)}.json").write_text(json.dumps({
        "top1": top1, "many_shot_top1": top1 + 0.05, "medium_shot_top1": top1 - 0.2, "few_shot_top1": None,
        "provenance": {"device": "cpu", "epochs": 36, "seed": seed}}))


def test_kept_results_report_pairs_and_figure_without_training(tmp_path, monkeypatch, capsys):
    """--kept reads the committed results, trains nothing, prints the paired table (hand-computed: differences
    +2, +4, +3 points -> mean +3.0, t interval 3 -/+ 4.303 * 1 / sqrt 3 = [+0.5, +5.5]) and draws the figure;
    a seed with only one side is left out of the pair."""
    kept = tmp_path / "kept"
    for seed, (a, b) in enumerate([(0.60, 0.58), (0.62, 0.58), (0.61, 0.58)]):
        _kept_cell(kept, "softmax", seed, a)
        _kept_cell(kept, "tsp_kernel_s16", seed, b)
    _kept_cell(kept, "softmax", 3, 0.9)  # no tSP partner
    monkeypatch.setattr(lt_grid.subprocess, "run", lambda *a, **k: pytest.fail("--kept must not train"))
    figure = tmp_path / "pairs.png"
    monkeypatch.setattr(sys, "argv", ["lt_grid", "--config", str(ROOT / "configs" / "lt_cpu_reduced.yaml"),
                                      "--kept", str(kept), "--variants", "softmax", "tsp_kernel_s16",
                                      "--seeds", "0", "1", "2", "3", "--pairs", "softmax:tsp_kernel_s16",
                                      "--figure", str(figure), "--label", "36 epochs"])
    assert lt_grid.main() == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "softmax - tsp_kernel_s16" in line)
    assert "+2.0, +4.0, +3.0" in row and "| +3.0 |" in row and "[+0.5, +5.5]" in row and "| 0,1,2 |" in row
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kept_results_from_several_folders_first_one_wins(tmp_path, monkeypatch, capsys):
    """The three-seed cRT pair of issue 16 lives in two folders: --kept A B reads a cell from the first holding it."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1):
        _kept_cell(a, "softmax", seed, 0.60)
        _kept_cell(a, "tsp_kernel_s16", seed, 0.58)
    _kept_cell(b, "softmax", 0, 0.10)  # shadowed by a's seed 0
    _kept_cell(b, "softmax", 2, 0.64)
    _kept_cell(b, "tsp_kernel_s16", 2, 0.58)
    monkeypatch.setattr(sys, "argv", ["lt_grid", "--config", str(ROOT / "configs" / "lt_cpu_reduced.yaml"),
                                      "--kept", str(a), str(b), "--variants", "softmax", "tsp_kernel_s16",
                                      "--seeds", "0", "1", "2", "--pairs", "softmax:tsp_kernel_s16"])
    assert lt_grid.main() == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "softmax - tsp_kernel_s16" in line)
    assert "+2.0, +2.0, +6.0" in row and "| 0,1,2 |" in row


def test_grid_needs_data_and_out_unless_kept(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lt_grid", "--config", str(ROOT / "configs" / "lt_cpu_reduced.yaml")])
    with pytest.raises(SystemExit) as exc:
        lt_grid.main()
    assert exc.value.code == 2 and "--kept" in capsys.readouterr().err


def test_logit_profiles_follow_each_heads_formula(tmp_path):
    """scripts/head_summary.py's profile is the head's own logit at each angle; the figure draws them from 0."""
    from pancls.heads import HEADS
    from pancls.report.figures import logit_profiles_png

    spec = importlib.util.spec_from_file_location("head_summary", ROOT / "scripts" / "head_summary.py")
    head_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_summary)
    paper = HEADS.create("tsp_paper_nu7", in_features=4, num_classes=3)
    angles, logits = head_summary.profile(paper, points=7)
    assert list(angles) == [0, 30, 60, 90, 120, 150, 180]
    gamma = float(paper.gamma)
    expected = [-7 * np.log(gamma + (1 - np.cos(np.radians(a))) / 2) for a in angles]
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    assert logits[0] - logits[-1] == pytest.approx(paper.summary()["logit_width"], rel=1e-6)
    kernel = HEADS.create("tsp", in_features=4, num_classes=3, scale_init=4.0, kappa=2.0)
    _, kernel_logits = head_summary.profile(kernel, points=3)  # 0, 90, 180 degrees
    np.testing.assert_allclose(kernel_logits, [8.0, 8.0 / 3, 8.0 / 5], rtol=1e-6)
    path = logit_profiles_png({"nu 7": (angles, logits)}, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one"):
        logit_profiles_png({}, tmp_path / "q.png")


def test_paired_figure_refuses_unequal_seeds(tmp_path):
    from pancls.report.figures import paired_seeds_png

    with pytest.raises(ValueError, match="equally long"):
        paired_seeds_png([{"title": "t", "a": "A", "b": "B", "seeds": [0, 1], "a_values": [1, 2],
                           "b_values": [1]}], tmp_path / "f.png")
    with pytest.raises(ValueError, match="at least one"):
        paired_seeds_png([], tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_eigenspace_labels_tell_the_tsp_forms_apart():
    spec = importlib.util.spec_from_file_location("eigenspace", ROOT / "scripts" / "eigenspace.py")
    eigenspace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eigenspace)
    labels = []
    for name in ("softmax_la", "tsp_kernel_la", "tsp_paper_la", "tsp_paper_nu7_la"):
        head, loss, overrides = lt_grid.variant(name)
        data = apply_overrides(load_yaml(ROOT / "configs" / "lt_cpu_reduced.yaml"),
                               [f"model.head={head}", f"loss.name={loss}", *overrides])
        labels.append(eigenspace.run_label(load_config(data)))
    preset = apply_overrides(load_yaml(ROOT / "configs" / "lt_cpu_reduced.yaml"), ["model.head=tsp_paper_nu7"])
    labels.append(eigenspace.run_label(load_config(preset)))
    assert labels == ["softmax", "tsp kernel", "tsp paper", "tsp paper nu=7", "tsp paper nu=7"]
