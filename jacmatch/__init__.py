"""jacmatch: knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018).

The public names below are the maths of shared/METHOD.md; the training system lives in
:mod:`jacmatch.training`, data sets in :mod:`jacmatch.data`, models in
:mod:`jacmatch.models`, experiments and the command line above them.
"""

from .core.jacobian import (all_outputs, finite_difference_jvp, input_directions, input_jacobian,
                            jacobian_vector_product, label, output_projections, teacher_top1,
                            teacher_top_k, vector_jacobian_product)
from .core.losses import (attention_map, attention_transfer_loss, gaussian_noise, jacobian_matching_loss,
                          jacobian_penalty, kd_loss, noise_training_loss, noisy_distillation_loss,
                          normalize_per_sample)
from .core.objective import FeatureTaps, ObjectiveConfig, TransferObjective, jacobian_cosine

__version__ = "0.1.0"

__all__ = [
    "input_jacobian", "vector_jacobian_product", "output_projections", "input_directions",
    "jacobian_vector_product", "finite_difference_jvp", "label", "teacher_top1", "teacher_top_k",
    "all_outputs", "jacobian_matching_loss", "jacobian_penalty", "kd_loss", "attention_map",
    "attention_transfer_loss", "noisy_distillation_loss", "noise_training_loss", "gaussian_noise",
    "normalize_per_sample", "ObjectiveConfig", "TransferObjective", "FeatureTaps", "jacobian_cosine",
]
