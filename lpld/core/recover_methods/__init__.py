"""Registry of recover methods: how each ``recover=<name>`` makes its distilled images.

A method is one :class:`~lpld.core.recover_methods.base.RecoverMethod` in one module of this package: its
knob dataclass (the schema ``conf/recover/<name>.yaml`` extends), its settings (validated knobs = the images'
identity), its plan (which classes are made together) and ``run_batch`` (the images of one device batch).
The module registers it with :func:`register_recover_method` when imported, and this package imports every
module it holds, so a new method, of a new kind or not, is that module plus its YAML. Built in:

* ``optimize`` (lpld, lpld_c, sre2l, cda): images synthesised from noise by BN matching (``lpld.core.synthesis``);
* ``rded``: RDED's selection of real-image crops scored by the teacher (``lpld.core.rded``);
* ``random_real``: randomly chosen real train images (baseline).
"""

from __future__ import annotations

import importlib
import pkgutil

from lpld.core.recover_methods.base import (
    PRECISION,
    BatchContext,
    ClassImages,
    RealImages,
    RecoverBase,
    RecoverMethod,
    get_recover_method,
    list_knob,
    list_recover_methods,
    own_knobs,
    recipe_knob,
    recover_schemas,
    register_recover_method,
    unregister_recover_method,
)

# built-in methods first, in the order their names are listed (lpld, lpld_c, sre2l, cda, rded, random_real);
# then any other module of this package
_FIRST = ("optimize", "rded", "random_real")
for _name in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in (*_FIRST, "base"))):
    importlib.import_module(f"{__name__}.{_name}")

from lpld.core.recover_methods.optimize import (  # noqa: E402 - after the registering imports
    CdaSchedule,
    OptimizeMethod,
    RecoverCda,
    RecoverOptimize,
    RecoverSlot,
)
from lpld.core.recover_methods.rded import RdedKnobs, RdedMethod, RecoverRded  # noqa: E402

__all__ = [
    "PRECISION",
    "BatchContext",
    "CdaSchedule",
    "ClassImages",
    "OptimizeMethod",
    "RdedKnobs",
    "RdedMethod",
    "RealImages",
    "RecoverBase",
    "RecoverCda",
    "RecoverMethod",
    "RecoverOptimize",
    "RecoverRded",
    "RecoverSlot",
    "get_recover_method",
    "list_knob",
    "list_recover_methods",
    "own_knobs",
    "recipe_knob",
    "recover_schemas",
    "register_recover_method",
    "unregister_recover_method",
]
