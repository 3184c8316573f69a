"""The errors a user can fix, in one place.

``ConfigError`` (a bad config value), ``ArtifactError`` (a missing, corrupt or mismatched artifact) and
``DatasetError`` (data not where the config says) all carry a message that names the fix; ``run.py`` prints
them as one line instead of a traceback (see ``lpld.stages.user_errors``). Every layer imports its errors
from here, so no layer has to import ``lpld.stages`` just to raise one.
"""

from __future__ import annotations

from lpld.core.errors import ConfigError  # defined in core so core registries can raise it
from lpld.core.io import ArtifactError
from lpld.data.errors import DatasetError

__all__ = ["ArtifactError", "ConfigError", "DatasetError", "user_error_types"]


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (config, data, artifacts): printed as one message, no traceback.

    Other user-fixable errors join these families instead of this tuple: ``PretrainedWeightsError`` (no network
    for ``model.pretrained=true``) is a ConfigError. Errors raised by code below lpld are translated case by case
    by ``lpld.stages.translate_error`` (``lpld.stages.error_text``): ``ReportError``, a DataLoader worker's
    re-raise, an out-of-memory, torch's refusal of an unsafe pickle, and ``FileNotFoundError``. The last only for a
    *user* path (below ``paths.artifacts`` or ``dataset.root``, or named by the config): FileNotFoundError is also
    what a bug raises (a package file or temporary file lpld itself should have made), and a bug keeps its
    traceback, which is what its report needs.
    """
    return (ConfigError, ArtifactError, DatasetError)
