"""Models by name: ``create_model("resnet20", num_classes=10, in_channels=1)``.

Every model takes images with pixel values in [0, 1], normalises them itself (mean and
std are buffers, saved with the weights), and exposes ``feature_names``: the modules
whose outputs attention transfer may tap (``FeatureTaps``). All run on 1×28×28 and
3×32×32 inputs (global pooling before the classifier); the small ones on 8×8 too.

Layout (after timm): ``_registry.py`` (names), ``_factory.py`` (``create_model`` and input
checks), ``base.py`` (what the families share), one file per family (``small``,
``resnet``, ``wrn``, ``vgg``) and ``external.py`` (import paths, torchvision, timm).
"""

from . import resnet, small, vgg, wrn  # noqa: F401  (each registers its family)
from ._factory import count_parameters, create_model, dry_forward, input_side, smallest_input, takes_input
from ._registry import list_models, register_model
from .base import Classifier
from .external import ExternalClassifier, is_import_path, replace_hard_activations

__all__ = ["create_model", "list_models", "register_model", "Classifier", "count_parameters", "takes_input",
           "smallest_input", "input_side", "dry_forward",
           "ExternalClassifier", "is_import_path", "replace_hard_activations"]
