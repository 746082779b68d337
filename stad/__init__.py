"""stad: student–teacher visual anomaly detection (Bergmann et al., Uninformed Students, 2020).

The public API is small; everything else is internal and may change (docs/api.md):

- :func:`load_model` → :class:`Model` (``score``, ``iter_score``, ``calibrate``, ``save``) →
  :class:`Result` (map, score, verdict, threshold);
- :func:`pretrain_teacher`, :func:`fit_students`, :func:`merge_models`, :func:`calibrate`,
  :func:`evaluate` — the command line's steps, with keyword settings;
- :func:`build_network` — a patch network for p ∈ {17, 33, 65} with ``forward`` and ``dense``;
- :class:`Sample`, :data:`API_VERSION` — the dataset adapter contract (see ``stad.datasets``);
- :func:`load_artifact`, :func:`save_artifact`, :class:`Artifact` — the safetensors artifacts;
- :func:`resolve_settings`, :class:`Settings` — settings from flags, environment and file;
- :class:`StadError` — the base of every error stad reports to users.
"""

from stad._version import __version__
from stad.api import (
    Model,
    Result,
    calibrate,
    evaluate,
    fit_students,
    load_model,
    merge_models,
    pretrain_teacher,
)
from stad.artifacts import Artifact, load_artifact, save_artifact
from stad.config import Settings, resolve_settings
from stad.datasets.base import API_VERSION, Sample
from stad.errors import StadError
from stad.networks import build_network

__all__ = [
    "API_VERSION",
    "Artifact",
    "Model",
    "Result",
    "Sample",
    "Settings",
    "StadError",
    "__version__",
    "build_network",
    "calibrate",
    "evaluate",
    "fit_students",
    "load_artifact",
    "load_model",
    "merge_models",
    "pretrain_teacher",
    "resolve_settings",
    "save_artifact",
]
