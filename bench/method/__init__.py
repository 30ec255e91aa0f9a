"""The kit a method is written against: the base class and registry, what a step receives, the
shared mechanics (views live on the engine's `Views`; mixing, pseudo-labels, threshold policies,
memories and gates here), option declarations and stage declarations.

A method file imports from here only (`from bench.method import Method, register, ...`): this
is the stable surface; the modules behind it may move.
"""
from bench.data.batch import Batch, Images
from bench.errors import UsageError
from bench.method.base import (Method, Pass, TrainData, get_method, method_names, pseudo_label_options, register,
                               soft_cross_entropy, weighted_mean)
from bench.method.mixing import mix, one_hot_smooth, partners_of, prob_pseudo_mix_lambda
from bench.method.pseudo import PseudoLabelMemory, PseudoLabels, ValidationGate, agreeing
from bench.method.stage import PRETRAIN, Stage
from bench.method.thresholds import threshold_options
from bench.options import Option, non_negative, positive, unit_closed, unit_open, unit_open_closed

__all__ = ["Batch", "Images", "UsageError", "Method", "Pass", "TrainData", "get_method", "method_names",
           "pseudo_label_options", "register", "soft_cross_entropy", "weighted_mean", "mix", "one_hot_smooth",
           "partners_of", "prob_pseudo_mix_lambda", "PseudoLabelMemory", "PseudoLabels", "ValidationGate", "agreeing",
           "PRETRAIN", "Stage", "threshold_options", "Option", "non_negative", "positive", "unit_closed", "unit_open",
           "unit_open_closed"]
