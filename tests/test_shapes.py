"""Any built-in model on any data set shape: it trains one step or is refused in one line."""

import re
from pathlib import Path

import pytest
import torch

from jacmatch.data import ImageSet, register_dataset
from jacmatch.models import create_model, list_models, smallest_input
from jacmatch.training import ConfigError, config_from_dict, train

README = Path(__file__).resolve().parents[1] / "docs" / "cli.md"  # the manual's page on models
SHAPES = {"digits": (1, 8, 8), "shape-1x28x28": (1, 28, 28), "shape-3x32x32": (3, 32, 32), "synthetic": (1, 8, 8)}


def _tiny(shape):
    def load(data_dir, download):
        g = torch.Generator().manual_seed(0)
        make = lambda n: ImageSet(torch.rand(n, *shape, generator=g), torch.arange(n) % 3)  # noqa: E731
        return make(12), make(6), 3, False
    return load


for _name, _shape in SHAPES.items():
    if _name.startswith("shape-"):
        register_dataset(_name, _tiny(_shape))


def test_readme_lists_the_smallest_input_of_every_model():
    text = README.read_text()
    for name in list_models():
        if name == "small_cnn":
            continue
        family = re.sub(r"(_\d+)+$|\d.*$", "", name)
        row = next((line for line in text.splitlines() if line.startswith(f"| `{family}")), None)
        assert row, f"README has no smallest-input row for {name}"
        side = smallest_input(create_model(name, 10, 1), 1, max_side=64)
        assert f"| {side}×{side} |" in row, (name, side, row)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(SHAPES))
@pytest.mark.parametrize("model", [m for m in list_models() if m != "small_cnn"])
def test_every_model_on_every_shape_trains_a_step_or_is_refused_in_one_line(tmp_path, model, dataset):
    cfg = config_from_dict({"out_dir": str(tmp_path), "data": {"name": dataset, "samples_per_class": 2},
                            "model": {"name": model}, "objective": {"beta": 0, "gamma": 0},
                            "optim": {"epochs": 1, "batch_size": 6},
                            "eval": {"noise_sigmas": [], "jacobian_cosine": False}, "progress": False})
    side = smallest_input(create_model(model, 10, SHAPES[dataset][0]), SHAPES[dataset][0])
    if side <= SHAPES[dataset][1]:
        results = train(cfg)
        assert results["epochs"] == 1 and torch.isfinite(torch.tensor(results["final"]["train"]["ce"]))
    else:
        with pytest.raises(ConfigError) as refused:
            train(cfg)
        message = str(refused.value)
        assert "\n" not in message and model in message and "smallest input is" in message


def test_cli_refuses_a_model_too_large_for_the_data_in_one_line(tmp_path, capsys):
    from jacmatch.cli import main
    code = main(["distill", "--recipe", "none", "--dataset", "digits", "--model", "lenet5", "--teacher-model", "small_cnn_4",
                 "--teacher-weights", str(tmp_path / "never_read.pt"), "--out", str(tmp_path / "s"),
                 "--set", "progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "'lenet5' cannot take digits inputs of shape 1x8x8: its smallest input is 1x12x12" in err
