"""Request and response schemas: ``*Create`` for input, ``*Public`` for output (never secrets)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from core.errors import ModelSpecError
from core.timm_kwargs import check_json_shape

Bits = Annotated[StrictInt, Field(ge=2, le=8, description="Bit width, 2 to 8.")]
DATA_REF_DOC = "`fashion-mnist:train[:N]`, `fashion-mnist:test[:N]`, or an uploaded dataset id (`ds_…`)."


class TimmModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timm_name: str = Field(min_length=1, max_length=300, description="A model id: a timm ViT, DeiT or Swin name, "
                           "optionally with a pretrained tag (`deit_small_patch16_224.fb_in1k`), or a timm-format "
                           "Hub repository (`hf-hub:org/repo`, `org/repo`), optionally `@revision`.")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for timm.")
    weights: Literal["pretrained", "random"] | None = Field(
        None, description="`pretrained` (the default: the id's pretrained weights, under the operator's hub "
        "policy) or `random` (asked for, e.g. for timing runs)."
    )
    preprocess: dict[str, Any] | None = Field(
        None, description="Overrides of the pretrained preprocessing: `mean`, `std`, `input_size`, "
        "`interpolation`, `crop_pct`."
    )

    @field_validator("timm_kwargs", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        """Depth, item count and finite numbers (``core.timm_kwargs.check_json_shape``) before anything
        reads the value: nested hundreds of levels deep it broke the request hash (500). The sizes are
        checked where every spec is made (``core.models.make_spec``: 422 ``invalid_model``)."""
        if not isinstance(value, dict):
            return value  # pydantic's own "should be a valid dictionary"
        try:
            check_json_shape(value)
        except ModelSpecError as exc:
            raise ValueError(exc.message) from None
        return value


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


class TargetCreate(BaseModel):
    """An accuracy target instead of fixed bits: the smallest model within ``max_top1_drop`` of the float
    model's top-1 (core.target_search validates it again, the one rule's home)."""

    model_config = ConfigDict(extra="forbid")

    max_top1_drop: float = Field(ge=0, lt=1, description="Largest allowed top-1 drop, a fraction: 0.01 is one point.")
    w_bits: list[Bits] | None = Field(None, min_length=1, max_length=7, description="Weight widths to try "
                                      "(default 3, 4, 6, 8).")
    a_bits: list[Bits] | None = Field(None, min_length=1, max_length=7, description="Activation widths to try "
                                      "(default 3, 4, 6, 8).")
    max_trials: StrictInt | None = Field(None, ge=1, le=50, description="Most quantizations the search runs "
                                         "(default 8).")
    decision_fraction: float | None = Field(None, ge=0.1, le=0.9, description="Share of the evaluation images "
                                            "the search decides on (default 0.5); the rest are held out.")
    mixed: StrictBool | None = Field(None, description="Try per-unit mixed precision (default true).")


def _model_ref_kind(value: Any) -> str:
    """An object is a ``TimmModelRef``, anything else a model id: a wrong ``timm_kwargs`` is then reported
    for that branch alone, not beside "model: Input should be a valid string"."""
    return "timm" if isinstance(value, dict | TimmModelRef) else "id"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[
        Annotated[Annotated[str, Field(min_length=1, max_length=300)], Tag("id")]
        | Annotated[TimmModelRef, Tag("timm")],
        Discriminator(_model_ref_kind),
    ] = Field(
        description="A model id: built-in (`fmnist-vit-tiny`), uploaded (`mdl_…`), a timm name with or without a "
        "pretrained tag (`deit_small_patch16_224.fb_in1k`), or a timm-format Hub repository (`hf-hub:org/repo`, "
        "`org/repo`), each optionally `@revision`; or `{timm_name, timm_kwargs, weights, preprocess}`. A timm or "
        "Hub id means its pretrained weights, fetched by the worker under the operator's hub policy."
    )
    allow_chance_fp: StrictBool = Field(
        False, description="Go on when the float model's top-1 on the evaluation data is no better than chance "
        "(otherwise the job fails early with `fp_accuracy_at_chance`); the report says so."
    )
    w_bits: Bits | None = Field(None, description="Weight bits; required unless `target` is given.")
    a_bits: Bits | None = Field(None, description="Activation bits; required unless `target` is given.")
    target: TargetCreate | None = Field(
        None, description="Instead of `w_bits`/`a_bits`: search bit widths and per-unit mixed precision for the "
        "smallest model within the drop. Needs labelled `evaluation` data."
    )
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

    @model_validator(mode="wrap")
    @classmethod
    def _fixed_bits_or_target(cls, data: Any, handler: Any) -> JobCreate:
        """Fixed bits (both) or a target (then no bits, and evaluation data). A missing width is reported
        beside the other field errors, as a required field would be."""
        missing: list[InitErrorDetails] = []
        if isinstance(data, dict) and data.get("target") is None:
            missing = [InitErrorDetails(type="missing", loc=(name,), input=data)
                       for name in ("w_bits", "a_bits") if data.get(name) is None and name not in data]
        try:
            body = handler(data)
        except ValidationError as exc:
            if not missing:
                raise
            errors = [InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], **({"ctx": e["ctx"]}
                      if "ctx" in e else {})) for e in exc.errors()]
            raise ValidationError.from_exception_data(cls.__name__, [*missing, *errors]) from None
        if missing:
            raise ValidationError.from_exception_data(cls.__name__, missing)
        if body.target is None:
            if body.w_bits is None or body.a_bits is None:
                raise ValueError("w_bits and a_bits are required unless a target is given")
        else:
            if body.w_bits is not None or body.a_bits is not None:
                raise ValueError("give either w_bits and a_bits or a target, not both (the target's own "
                                 "w_bits/a_bits lists bound its search)")
            if body.evaluation is None:
                raise ValueError("a target job needs labelled evaluation data: set evaluation (the target is a "
                                 "top-1 drop, measured on it)")
        return body


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
    target_met: bool | None = Field(None, description="Target jobs: whether the chosen configuration met the target.")
    target_message: str | None = None
    chosen: str | None = Field(None, description="Target jobs: the chosen configuration, e.g. `W3A3 + 4 units W4A4`.")
    per_unit_bits: dict[str, dict[str, int]] | None = None
    decision_top1: float | None = Field(None, description="Target jobs: top-1 on the split the search decided on.")
    heldout_top1: float | None = Field(None, description="Target jobs: top-1 on the held-out split.")
    top1_drop: float | None = Field(None, description="Target jobs: float minus quantized top-1, decision split.")
    heldout_drop: float | None = None
    model_bytes: int | None = None
    trials: int | None = None


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
    w_bits: int | None
    a_bits: int | None
    target: dict[str, Any] | None = None
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
    w_bits: int = Field(description="The base weight width (every unit, unless `per_unit_bits` says otherwise).")
    a_bits: int = Field(description="The base activation width.")
    bits_label: str = Field(description="`W4A4`, or `W3A3 + 3 units W4A4` for a mixed-precision model.")
    per_unit_bits: dict[str, dict[str, int]] | None = Field(
        description="The units at their own widths, `{unit: {\"w_bits\": …, \"a_bits\": …}}`, as in the job's "
        "result; null when uniform."
    )
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
