"""lpld's single entry point: ``python run.py stage=<name> [overrides]``.

Dispatch validates the composed config, freezes it into an Experiment and runs ``lpld.stages.<name>.run(exp)``
(see lpld/stages/__init__.py); nothing below dispatch reads the Hydra config.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

import lpld.config  # noqa: F401 - registers the typed config schemas (lpld/config/schema.py) before composing
from lpld.config.compose import composed, run_main
from lpld.stages import dispatch, log_once, user_errors

# the sweep files (-cd sweeps) add this repository's conf/ to Hydra's search path as ${oc.env:LPLD_CONF}: absolute,
# so a sweep launched from any working directory finds the config groups (issue 19: "path=conf is not available")
os.environ.setdefault("LPLD_CONF", str(Path(__file__).resolve().parent / "conf"))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one stage; the return value (if a float) is what Hydra sweepers optimise.

    A user error (config, data, artifact) prints one message naming the fix and exits with status 1;
    ``LPLD_DEBUG=1`` or ``HYDRA_FULL_ERROR=1`` shows its traceback.
    """
    composed()  # errors from here on are the stage's (a composition error was one line: run_main)
    log_once()  # Hydra has configured the root logger: Lightning's messages go through it, once
    with user_errors(cfg):
        return dispatch(cfg)


if __name__ == "__main__":
    from lpld.artifacts.base import check_env_roots

    with user_errors():
        check_env_roots()  # before Hydra makes its run folder under paths.root (LPLD_ROOT= would mean /logs)
    run_main(main)  # an unknown key or a mistyped value while composing: one line naming it
