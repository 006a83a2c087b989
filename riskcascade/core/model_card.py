"""The model card: the metadata file written next to the ONNX model and read by scorer and orchestrator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from riskcascade.core.calibration import PlattCalibrator
from riskcascade.core.config import ActionableFeature

ONNX_FILE = "model.onnx"
BOOSTER_FILE = "model.lgb.txt"
CARD_FILE = "model.json"


class CalibrationSpec(BaseModel):
    method: str = "platt"
    a: float
    b: float

    def calibrator(self) -> PlattCalibrator:
        return PlattCalibrator(a=self.a, b=self.b)


class Thresholds(BaseModel):
    """The escalation band on the calibrated score: below band_low approve, at/above band_high block."""

    band_low: float = Field(ge=0, le=1)
    band_high: float = Field(ge=0, le=1)
    rule: str = "share"  # "share": target_escalation_share of validation; "cost": least cost under ``costs``
    target_escalation_share: float = Field(ge=0, le=1)
    costs: dict[str, float] = Field(default_factory=dict)
    chosen_on: str = "validation"


class OnnxSpec(BaseModel):
    input: str = "features"
    output: str = "probabilities"
    opset: int | None = None
    parity_max_abs_diff: float


class FeatureScaling(BaseModel):
    """Training mean and standard deviation per input feature (feature_names order), for behaviour vectors."""

    mean: list[float]
    std: list[float]


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str
    created_at: str
    feature_names: list[str]  # numeric features callers send (the request's features map)
    feature_descriptions: dict[str, str]  # plain words for every model feature (reason codes)
    model_features: list[str] = Field(default_factory=list)  # every ONNX input column, in order
    categorical_features: dict[str, list[str]] = Field(default_factory=dict)  # name -> vocabulary
    links: list[str] = Field(default_factory=list)  # entity columns the graph features aggregate over
    anomaly: dict[str, Any] | None = None  # the isolation-forest feature: file, feature name, parity
    text_model: dict[str, Any] | None = None  # the text_risk feature: file, feature, fields, encoder, how it was fitted
    calibration: CalibrationSpec
    thresholds: Thresholds
    onnx: OnnxSpec
    feature_scaling: FeatureScaling
    metrics: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    # request features a customer or merchant can change, with their moves (counterfactual explanations); empty for
    # a card written before cards declared them, or a data set without such features: no counterfactual is offered
    actionable: list[ActionableFeature] = Field(default_factory=list)


def load_model_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no model card at {path}: run `riskcascade train` first (see README)"
        )
    return ModelCard.model_validate_json(path.read_text())


def write_model_card(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(card.model_dump_json(indent=2))
    return path
