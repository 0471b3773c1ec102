"""jacmatch: knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018).

The public names below are the maths of docs/method.md (loss functions, Jacobian
estimators, and the same losses as ``nn.Module`` terms); the training system lives in
:mod:`jacmatch.training`, data sets in :mod:`jacmatch.data`, models in
:mod:`jacmatch.models`, experiments and the command line above them.
"""

from .core.estimators import Estimator, create_estimator, list_estimators, register_estimator
from .core.jacobian import (all_outputs, finite_difference_jvp, input_directions, input_jacobian,
                            jacobian_vector_product, label, math_attention, output_projections, teacher_top1,
                            teacher_top_k, vector_jacobian_product)
from .core.losses import (attention_map, attention_transfer_loss, gaussian_noise, jacobian_matching_loss,
                          jacobian_penalty, kd_loss, noise_training_loss, noisy_distillation_loss,
                          normalize_per_sample)
from .core.metrics import jacobian_cosine
from .core.objective import TEACHER_OBJECTIVE, ObjectiveConfig, TransferObjective, build_terms
from .core.outputs import logits_of
from .core.builtin_terms import (AttentionJacobianLoss, AttentionTransferLoss, CrossEntropyLoss, JacobianMatchingLoss,
                                 JacobianPenalty, KDLoss, NoiseTrainingLoss, NoisyDistillationLoss)
from .core.terms import FeatureTaps, Needs, Term, list_terms
from .errors import UsageError

__version__ = "0.2.0"

__all__ = [
    "input_jacobian", "vector_jacobian_product", "output_projections", "input_directions",
    "jacobian_vector_product", "finite_difference_jvp", "label", "teacher_top1", "teacher_top_k",
    "all_outputs", "math_attention", "jacobian_matching_loss", "jacobian_penalty", "kd_loss", "attention_map",
    "attention_transfer_loss", "noisy_distillation_loss", "noise_training_loss", "gaussian_noise",
    "normalize_per_sample", "ObjectiveConfig", "TEACHER_OBJECTIVE", "TransferObjective", "FeatureTaps", "jacobian_cosine",
    "build_terms", "logits_of", "Term", "Needs", "CrossEntropyLoss", "KDLoss", "JacobianMatchingLoss",
    "AttentionTransferLoss", "AttentionJacobianLoss", "JacobianPenalty", "NoiseTrainingLoss",
    "NoisyDistillationLoss", "Estimator", "create_estimator", "list_estimators", "register_estimator",
    "list_terms", "UsageError",
]
