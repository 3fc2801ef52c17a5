"""``GET /v1/results``: a target job's mixed-precision model is listed under its base widths and says it is
mixed (``bits_label``, ``per_unit_bits``), so a W3A3 filter does not pass it off as uniform W3A3."""

from __future__ import annotations

from core.config import QuantConfig
from service.db import session_scope
from service.keys import authenticate
from service.tables import Job, Report, new_id
from tests.helpers.factories import auth


def _finished(session, tenant_id: str, *, w: int, a: int, report: dict) -> str:
    job_id = new_id("job")
    session.add(Job(id=job_id, tenant_id=tenant_id, status="succeeded", request={}, model_key="fmnist-vit-tiny",
                    model_spec={}, config={}, calibration="fashion-mnist:train:32", request_hash="0" * 64))
    session.flush()
    session.add(Report(job_id=job_id, tenant_id=tenant_id, model_key="fmnist-vit-tiny", w_bits=w, a_bits=a,
                       method="isvit", preset="quick", fp_top1=0.845, quant_top1=0.838, report=report))
    return job_id


def test_a_mixed_model_is_filed_under_its_base_widths_and_says_it_is_mixed(service):
    # what core.pipeline writes into report.json for a mixed model
    config = QuantConfig(w_bits=3, a_bits=3, per_unit_bits={u: (4, 4) for u in ("patch_embed", "head", "blocks.0")})
    per_unit, label = config.to_dict()["per_unit_bits"], config.bits_label()
    assert label == "W3A3 + 3 units W4A4"
    with session_scope(service.settings.resolved_database_url) as session:
        tenant_id = authenticate(session, key=service.key_a).id
        uniform = _finished(session, tenant_id, w=3, a=3, report={"bits_label": "W3A3", "per_unit_bits": None})
        mixed = _finished(session, tenant_id, w=3, a=3, report={"bits_label": label, "per_unit_bits": per_unit})
        legacy = _finished(session, tenant_id, w=3, a=3, report={})  # a report from before bits_label existed
    response = service.client.get("/v1/results", params={"w_bits": 3, "a_bits": 3}, headers=auth(service.key_a))
    assert response.status_code == 200, response.text
    rows = {r["job_id"]: r for r in response.json()["data"]}
    assert (rows[uniform]["bits_label"], rows[uniform]["per_unit_bits"]) == ("W3A3", None)
    assert (rows[mixed]["bits_label"], rows[mixed]["per_unit_bits"]) == ("W3A3 + 3 units W4A4", per_unit)
    assert (rows[legacy]["bits_label"], rows[legacy]["per_unit_bits"]) == ("W3A3", None)
    assert all((r["w_bits"], r["a_bits"]) == (3, 3) for r in rows.values())
