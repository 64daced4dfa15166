"""ldro: Lookahead-DRO and multitask weighting methods as optax transformations.

Paper: "Balancing Average and Worst-case Accuracy in Multitask Learning"
(Lookahead-DRO). Core modules are pure JAX; see the README for usage.
"""

from ldro.bargaining import nash_mtl
from ldro.bargaining import nash_mtl_solve
from ldro.bargaining import NashMTLState
from ldro.dro import avg_max_interpolation
from ldro.dro import baselined_dro
from ldro.dro import group_dro
from ldro.game import best_response
from ldro.game import exponentiated_step
from ldro.game import maxent_nash
from ldro.game import maxent_nash_with_info
from ldro.game import NashInfo
from ldro.game import update_weights
from ldro.gradient_balancing import aligned_mtl
from ldro.gradient_balancing import aligned_mtl_coefficients
from ldro.gradient_balancing import cagrad
from ldro.gradient_balancing import cagrad_coefficients
from ldro.gradient_balancing import imtl_g
from ldro.gradient_balancing import imtl_g_coefficients
from ldro.gradient_balancing import mgda
from ldro.gradient_balancing import mgda_coefficients
from ldro.gradient_balancing import SolverInfo
from ldro.gradient_balancing import upgrad
from ldro.gradient_balancing import upgrad_coefficients
from ldro.gradient_normalization import gradnorm
from ldro.gradient_vaccine import gradvac
from ldro.gradient_vaccine import gradvac_coefficients
from ldro.gradient_vaccine import GradVacState
from ldro.lookahead import chunked_gram
from ldro.lookahead import compute_gram
from ldro.lookahead import GRAM_STRATEGIES
from ldro.lookahead import grouped_gram
from ldro.lookahead import interaction_matrix
from ldro.lookahead import jacrev_gram
from ldro.lookahead import lookahead_matrix
from ldro.lookahead import pairwise_gram
from ldro.lookahead import per_task_grads
from ldro.lookahead import task_gram
from ldro.lookahead_dro import ldro_weights
from ldro.lookahead_dro import LookaheadDROState
from ldro.loss_balancing import dwa
from ldro.loss_balancing import famo
from ldro.loss_balancing import imtl
from ldro.loss_balancing import imtl_l
from ldro.loss_balancing import uw
from ldro.conflict_projection import pcgrad
from ldro.meta_weighting import moml
from ldro.meta_weighting import MOMLState
from ldro.conflict_projection import pcgrad_coefficients
from ldro.random_weighting import random_gradient_weighting
from ldro.random_weighting import random_loss_weighting
from ldro.random_weighting import sample_random_weights
from ldro.rotograd import rotate_tasks
from ldro.rotograd import rotation_matrices
from ldro.rotograd import rotograd_optimizer
from ldro.rotograd import TaskRotations
from ldro.registry import get_method
from ldro.registry import method_info
from ldro.registry import method_names
from ldro.registry import MethodInfo
from ldro.registry import register_method
from ldro.sign_dropout import graddrop
from ldro.sign_dropout import graddrop_aggregate
from ldro.static import equal_weighting
from ldro.static import mixing_weights
from ldro.static import static_mixing
from ldro.weighting import combine
from ldro.weighting import on_shared_params
from ldro.weighting import Rule
from ldro.weighting import task_weighting
from ldro.weighting import task_weights
from ldro.weighting import TaskStats
from ldro.weighting import TaskWeighting
from ldro.weighting import WeightingState
from ldro.worst_group import apply_patch_mask
from ldro.worst_group import check_groups
from ldro.worst_group import group_correct_counts
from ldro.worst_group import GroupAccuracy
from ldro.worst_group import jtt_batch_indices
from ldro.worst_group import jtt_error_set
from ldro.worst_group import jtt_upweighted_indices
from ldro.worst_group import l1_activation
from ldro.worst_group import make_group_ids
from ldro.worst_group import masked_reconstruction_loss
from ldro.worst_group import per_group_accuracy
from ldro.worst_group import random_patch_mask
from ldro import train  # make_train_step, make_plain_step, TrainState (ldro.train.*)

__version__ = "0.1.0"

__all__ = (
    "aligned_mtl",
    "aligned_mtl_coefficients",
    "avg_max_interpolation",
    "baselined_dro",
    "best_response",
    "cagrad",
    "cagrad_coefficients",
    "chunked_gram",
    "combine",
    "compute_gram",
    "dwa",
    "equal_weighting",
    "exponentiated_step",
    "famo",
    "get_method",
    "gradnorm",
    "GRAM_STRATEGIES",
    "graddrop",
    "graddrop_aggregate",
    "gradvac",
    "gradvac_coefficients",
    "GradVacState",
    "group_dro",
    "grouped_gram",
    "imtl_g",
    "imtl_g_coefficients",
    "imtl",
    "imtl_l",
    "interaction_matrix",
    "jacrev_gram",
    "ldro_weights",
    "lookahead_matrix",
    "LookaheadDROState",
    "maxent_nash",
    "maxent_nash_with_info",
    "method_info",
    "method_names",
    "MethodInfo",
    "mgda",
    "mgda_coefficients",
    "mixing_weights",
    "moml",
    "MOMLState",
    "nash_mtl",
    "nash_mtl_solve",
    "NashMTLState",
    "NashInfo",
    "on_shared_params",
    "pairwise_gram",
    "pcgrad",
    "pcgrad_coefficients",
    "per_task_grads",
    "random_gradient_weighting",
    "random_loss_weighting",
    "register_method",
    "rotate_tasks",
    "rotation_matrices",
    "rotograd_optimizer",
    "sample_random_weights",
    "SolverInfo",
    "static_mixing",
    "task_gram",
    "Rule",
    "task_weighting",
    "task_weights",
    "TaskRotations",
    "TaskStats",
    "TaskWeighting",
    "upgrad",
    "upgrad_coefficients",
    "uw",
    "WeightingState",
    "apply_patch_mask",
    "check_groups",
    "group_correct_counts",
    "GroupAccuracy",
    "jtt_batch_indices",
    "jtt_error_set",
    "jtt_upweighted_indices",
    "l1_activation",
    "make_group_ids",
    "masked_reconstruction_loss",
    "per_group_accuracy",
    "random_patch_mask",
    "train",
    "update_weights",
)
