"""Request and response schemas: ``*Create`` for input, ``*Public`` for output (never secrets)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

Bits = Annotated[StrictInt, Field(ge=2, le=8, description="Bit width, 2 to 8.")]
DATA_REF_DOC = "`fashion-mnist:train[:N]`, `fashion-mnist:test[:N]`, or an uploaded dataset id (`ds_…`)."


class TimmModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timm_name: str = Field(min_length=1, max_length=200, description="Any timm ViT, DeiT or Swin name.")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for timm.")


class JobOptions(BaseModel):
    """Overrides of the preset (``None`` keeps the preset's value)."""

    model_config = ConfigDict(extra="forbid")

    iters: StrictInt | None = Field(None, ge=0, le=100_000)
    calib_size: StrictInt | None = Field(None, ge=1, le=100_000)
    batch_size: StrictInt | None = Field(None, ge=1, le=4096)
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    lr: float | None = Field(None, gt=0, lt=1, strict=True)
    softmax_quantizer: Literal["sulq-or-logsqrt2", "sulq", "log2", "logsqrt2", "uniform"] | None = None
    sos: StrictBool | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=200)] | TimmModelRef = Field(
        description="A built-in model id (`fmnist-vit-tiny`), an uploaded model id (`mdl_…`), "
        "or `{timm_name, timm_kwargs}`."
    )
    w_bits: Bits
    a_bits: Bits
    method: Literal["isvit", "repq", "ptq-uniform"] = "isvit"
    preset: Literal["auto", "paper", "quick", "smoke"] = Field(
        "auto", description="`auto`: `paper` on a GPU worker, `quick` on a CPU one; the report says which ran."
    )
    calibration: str = Field(min_length=1, max_length=300, description="Calibration data: " + DATA_REF_DOC)
    evaluation: str | None = Field(
        None, min_length=1, max_length=300, description="Evaluation data (optional): " + DATA_REF_DOC
    )
    options: JobOptions = Field(default_factory=JobOptions)
    exports: list[Literal["onnx"]] = Field(
        default_factory=lambda: ["onnx"],
        max_length=1,
        description="Deployable files besides the checkpoint: `onnx` (`model.onnx`: QDQ, 4-bit weights as "
        "uint4, opset 21). `[]` turns it off. A failed export does not fail the job; the report and the "
        "job's events say why the file is missing.",
    )
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://[^\s]+$",
        description="Receives a signed POST (Standard Webhooks) when the job ends.",
    )


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    stage: str | None = None
    unit: str | None = None
    index: int | None = None
    total: int | None = None
    loss: float | None = None
    done: int | None = None
    total_steps: int | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    updated_at: datetime | None = None


class JobResult(BaseModel):
    fp_top1: float | None = None
    quant_top1: float | None = None
    fp_top5: float | None = None
    quant_top5: float | None = None
    n_eval: int | None = None
    agreement: float | None = None
    logit_sqnr_db: float | None = None
    seconds: float | None = None
    checkpoint_sha256: str | None = None
    checkpoint_bytes: int | None = None
    onnx_sha256: str | None = None
    onnx_bytes: int | None = None
    export_error: str | None = Field(None, description="Why `model.onnx` is missing, where its export failed.")


class WebhookDelivery(BaseModel):
    attempt: int
    at: datetime
    ok: bool
    status_code: int | None = None
    error: str | None = None


class WebhookPublic(BaseModel):
    url: str
    deliveries: list[WebhookDelivery]


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str | TimmModelRef
    w_bits: int
    a_bits: int
    method: str
    preset: str
    calibration: str
    evaluation: str | None
    options: dict[str, Any]
    config: dict[str, Any] = Field(description="The QuantConfig that runs, preset defaults filled in.")
    progress: JobProgress | None
    error: JobError | None
    result: JobResult | None
    attempts: int
    cancel_requested: bool
    webhook: WebhookPublic | None
    artifacts_expired: bool = Field(
        False, description="The retention period (`VITQ_RETENTION_DAYS`) passed: the artifacts were removed."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: dict[str, str]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class JobEventPublic(BaseModel):
    at: datetime
    kind: str
    message: str
    data: dict[str, Any] | None


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]


class ArtifactPublic(BaseModel):
    name: str
    sha256: str
    size_bytes: int
    content_type: str
    url: str


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


class DatasetPublic(BaseModel):
    id: str
    filename: str
    format: str
    sha256: str
    size_bytes: int
    n: int
    image_shape: list[int]
    num_classes: int | None
    has_labels: bool
    normalized: bool
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]


class ModelPublic(BaseModel):
    id: str
    kind: Literal["builtin", "upload"]
    timm_name: str
    timm_kwargs: dict[str, Any]
    preprocess: dict[str, Any] | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    fp_top1: float | None = None
    filename: str | None = None
    created_at: datetime | None = None


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    note: str


class ResultPublic(BaseModel):
    job_id: str
    model: str
    w_bits: int
    a_bits: int
    method: str
    preset: str
    fp_top1: float | None
    quant_top1: float | None
    delta_top1: float | None
    fp_top5: float | None
    quant_top5: float | None
    n_eval: int | None
    agreement: float | None
    seconds: float | None
    created_at: datetime


class ResultsPublic(BaseModel):
    data: list[ResultPublic]


class TenantPublic(BaseModel):
    id: str
    name: str
    webhook_secret: str = Field(description="Signs this tenant's webhooks (Standard Webhooks, `whsec_…`).")
