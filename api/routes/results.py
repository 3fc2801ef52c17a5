"""``/v1/results``: stored accuracy reports of finished jobs, side by side."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import SessionDep, TenantDep
from api.schemas import ResultPublic, ResultsPublic
from service.tables import Report

router = APIRouter(prefix="/v1/results", tags=["results"])


@router.get(
    "",
    summary="Compare finished runs (FP vs quantized top-1, seconds, preset)",
    description="`w_bits`/`a_bits` filter on the base widths; a mixed-precision model (from an accuracy-target "
    "job) is listed under its base widths with `bits_label` and `per_unit_bits` saying which units differ.",
)
def list_results(
    session: SessionDep,
    tenant: TenantDep,
    model: Annotated[str | None, Query(max_length=300)] = None,
    w_bits: Annotated[int | None, Query(ge=2, le=8)] = None,
    a_bits: Annotated[int | None, Query(ge=2, le=8)] = None,
    method: Literal["isvit", "repq", "ptq-uniform"] | None = None,
    preset: Literal["paper", "quick", "smoke"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> ResultsPublic:
    query = select(Report).where(Report.tenant_id == tenant.id)
    for column, value in (
        (Report.model_key, model),
        (Report.w_bits, w_bits),
        (Report.a_bits, a_bits),
        (Report.method, method),
        (Report.preset, preset),
    ):
        if value is not None:
            query = query.where(column == value)
    rows = session.scalars(query.order_by(Report.created_at.desc(), Report.job_id.desc()).limit(limit)).all()
    return ResultsPublic(
        data=[
            ResultPublic(
                job_id=r.job_id,
                model=r.model_key,
                w_bits=r.w_bits,
                a_bits=r.a_bits,
                # a target job's mixed model is filed under its base widths; these say it is mixed
                bits_label=str((r.report or {}).get("bits_label") or f"W{r.w_bits}A{r.a_bits}"),
                per_unit_bits=(r.report or {}).get("per_unit_bits") or None,
                method=r.method,
                preset=r.preset,
                fp_top1=r.fp_top1,
                quant_top1=r.quant_top1,
                delta_top1=(r.quant_top1 - r.fp_top1)
                if r.quant_top1 is not None and r.fp_top1 is not None
                else None,
                fp_top5=r.fp_top5,
                quant_top5=r.quant_top5,
                n_eval=r.n_eval,
                agreement=r.agreement,
                seconds=r.seconds_total,
                created_at=r.created_at,
            )
            for r in rows
        ]
    )
