"""distvi: variational inference for PyMC models on sharded data, with PyMC's variational API."""

from distvi._lean import lighten_a_worker as _lighten

_lighten()  # in a Ray worker of a local instance only: see distvi._lean

from distvi import data
from distvi.approximations import Approximation
from distvi.approximations import Empirical
from distvi.approximations import EmpiricalGroup
from distvi.approximations import FullRank
from distvi.approximations import FullRankGroup
from distvi.approximations import Group
from distvi.approximations import MeanField
from distvi.approximations import MeanFieldGroup
from distvi.callbacks import CheckLossConvergence
from distvi.callbacks import CheckParametersConvergence
from distvi.diagnostics import Diagnosis
from distvi.diagnostics import diagnose
from distvi.errors import DivergenceWarning
from distvi.errors import NotFiniteError
from distvi.callbacks import Tracker
from distvi.methods import ADVI
from distvi.methods import ASVGD
from distvi.methods import FullRankADVI
from distvi.methods import ImplicitGradient
from distvi.inference import Inference
from distvi.methods import KLqp
from distvi.methods import SVGD
from distvi.runs import fit
from distvi.runs import resume
from distvi.operators import KL
from distvi.operators import KSD
from distvi.optimizers import adadelta
from distvi.optimizers import adagrad
from distvi.optimizers import adagrad_window
from distvi.optimizers import adam
from distvi.optimizers import adamax
from distvi.optimizers import apply_momentum
from distvi.optimizers import apply_nesterov_momentum
from distvi.optimizers import momentum
from distvi.optimizers import nesterov_momentum
from distvi.optimizers import norm_constraint
from distvi.optimizers import rmsprop
from distvi.optimizers import sgd
from distvi.optimizers import total_norm_constraint
from distvi.results import sample_approx
from distvi.stein import RBF
from distvi.stein import Stein
from distvi.stein import rbf
from distvi.runs import open_run
from distvi.tracking import MLflowTracking

from distvi._version import __version__  # noqa: E402

__all__ = [
    "ADVI",
    "ASVGD",
    "Approximation",
    "CheckLossConvergence",
    "CheckParametersConvergence",
    "Diagnosis",
    "DivergenceWarning",
    "Empirical",
    "EmpiricalGroup",
    "FullRank",
    "FullRankADVI",
    "FullRankGroup",
    "Group",
    "ImplicitGradient",
    "Inference",
    "KL",
    "KLqp",
    "KSD",
    "MLflowTracking",
    "MeanField",
    "MeanFieldGroup",
    "NotFiniteError",
    "RBF",
    "SVGD",
    "Stein",
    "Tracker",
    "adadelta",
    "adagrad",
    "adagrad_window",
    "adam",
    "adamax",
    "apply_momentum",
    "apply_nesterov_momentum",
    "data",
    "diagnose",
    "fit",
    "momentum",
    "nesterov_momentum",
    "norm_constraint",
    "open_run",
    "rbf",
    "resume",
    "rmsprop",
    "sample_approx",
    "sgd",
    "total_norm_constraint",
]
