"""Every registered model runs on 1×28×28 and 3×32×32 and exposes its feature taps."""

import pytest
import torch

from jacmatch import FeatureTaps
from jacmatch.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_model_runs_and_taps(name, shape):
    model = create_model(name, num_classes=7, in_channels=shape[0]).eval()
    x = torch.rand(2, *shape)
    with FeatureTaps(model, model.feature_names) as taps:
        y = model(x)
    assert y.shape == (2, 7)
    assert all(taps[n].dim() == 4 and taps[n].shape[0] == 2 for n in model.feature_names)


def test_normalisation_lives_in_the_model():
    model = create_model("small_cnn_8", 3, 1, mean=[0.5], std=[0.25])
    assert model.mean.item() == 0.5 and "mean" in model.state_dict()


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="unknown model 'resnet1000'"):
        create_model("resnet1000", 10, 1)
    with pytest.raises(ValueError, match="expects images"):
        create_model("small_cnn_8", 10, 1)(torch.rand(2, 3, 28, 28))
