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
    """Errors that are the user's to fix (config, data, artifacts): printed as one message, no traceback."""
    return (ConfigError, ArtifactError, DatasetError)
