"""The `tracking:` section of study.yaml: experiment trackers, off unless named.

The Optuna storage every run directory holds needs no section (evomerge/tracking/__init__.py).
A tracker named here whose package is missing is refused when the study loads (exit 2, naming
the extra to install), before any work; the check finds the package without importing it, so
a study without trackers never imports wandb or mlflow.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WandbConfig(_Frozen):
    project: str = Field(description="W&B project the study's run is logged to")
    entity: str | None = Field(None, description="W&B team or user (default: your default)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="online, offline (files only: `wandb sync` them later), disabled; "
        "default: $WANDB_MODE, else online",
    )


class MlflowConfig(_Frozen):
    tracking_uri: str | None = Field(
        None,
        description="http(s)://server, file:///dir or sqlite:///file (default: "
        "$MLFLOW_TRACKING_URI, else MLflow's default)",
    )
    experiment: str | None = Field(None, description="experiment name (default: the study's name)")


class TrackingConfig(_Frozen):
    wandb: WandbConfig | None = Field(None, description="log every trial to Weights & Biases")
    mlflow: MlflowConfig | None = Field(None, description="log every trial to MLflow")

    @model_validator(mode="after")
    def _packages(self) -> TrackingConfig:
        needs = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
        for section, (module, extra) in needs.items():
            if getattr(self, section) is not None and importlib.util.find_spec(module) is None:
                raise ValueError(
                    f"{section} needs the {module} package, which is not installed: "
                    f"pip install 'evomerge[{extra}]'"
                )
        return self

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers turned on, by section name."""
        return tuple(n for n in ("wandb", "mlflow") if getattr(self, n) is not None)
