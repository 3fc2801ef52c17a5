"""vitq/client_cli.py: `vitq jobs submit` sends fixed bits or an accuracy target, and prints the API's
refusal (exit 2) rather than a traceback. The API runs in-process on the real PostgreSQL.
More verbs and failures: test_client_verbs.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from vitq import client_cli
from vitq.client import Client

SUBMIT = ["jobs", "submit", "--preset", "smoke", "--calibration", "fashion-mnist:train:32"]


@pytest.fixture
def cli(service, monkeypatch):
    """``client_cli.main`` whose Client talks to the in-process app with tenant A's key."""

    def in_process_client(args):
        client = Client("http://testserver", api_key=service.key_a)
        client._http = TestClient(service.client.app, headers={"Authorization": f"Bearer {service.key_a}"})
        return client

    monkeypatch.setattr(client_cli, "_client", in_process_client)
    return client_cli.main


def test_submit_with_a_target_drop_sends_a_target_job(cli, capsys):
    code = cli([*SUBMIT, "--evaluation", "fashion-mnist:test:64", "--target-drop", "0.01",
                "--target-w-bits", "3,4", "--target-a-bits", "4,8", "--max-trials", "3", "--no-mixed"])
    out = capsys.readouterr().out
    assert code == 0, out
    job = json.loads(out)
    assert job["status"] == "queued" and job["w_bits"] is None and job["a_bits"] is None
    assert {k: v for k, v in job["target"].items() if v is not None} == {
        "max_top1_drop": 0.01, "w_bits": [3, 4], "a_bits": [4, 8], "max_trials": 3, "mixed": False,
    }


def test_submit_with_fixed_bits_still_works(cli, capsys):
    assert cli([*SUBMIT, "--w-bits", "4", "--a-bits", "4"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["w_bits"], job["a_bits"], job["target"]) == (4, 4, None)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--w-bits", "4", "--a-bits", "4", "--evaluation", "fashion-mnist:test:64", "--target-drop", "0.01"],
         "not both"),
        (["--target-drop", "0.01"], "needs labelled evaluation data"),
        ([], "w_bits"),
    ],
)
def test_a_refused_submit_prints_the_apis_message_and_exits_2(cli, capsys, extra, fragment):
    assert cli([*SUBMIT, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitq: error: 422 invalid_request") and fragment in err, err
    assert err.count("\n") == 1, err
