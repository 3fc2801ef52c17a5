"""vitq/client_cli.py through the whole CLI (vitq.cli.main) against the in-process API on the real
PostgreSQL: every failure is one line with its documented exit status, local data files are uploaded
once (sha256 de-duplication), and the verbs the API has (list, cancel, events, datasets list, download
into a directory) print a summary for people and JSON for scripts."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.helpers.factories import write_npz
from tests.helpers.jobs import SMOKE, submit_job
from vitq import cli, client_cli
from vitq.cli_errors import ExitCode
from vitq.client import Client
from vitq.summaries import job_summary

BITS = ["--w-bits", "4", "--a-bits", "4", "--preset", "smoke"]


@pytest.fixture
def run(service, monkeypatch, tmp_path):
    """``vitq.cli.main`` whose Client talks to the in-process app, as tenant A unless ``key`` says otherwise;
    no key in the environment or a key file, so a missing key is really missing."""
    monkeypatch.delenv("VITQ_API_KEY", raising=False)
    monkeypatch.setenv("VITQ_DATA_DIR", str(tmp_path / "no-key-here"))

    def main(argv: list[str], key: str | None = service.key_a) -> int:
        def in_process_client(args):
            client = Client("http://testserver", api_key=key)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            client._http = TestClient(service.client.app, headers=headers)
            return client

        monkeypatch.setattr(client_cli, "_client", in_process_client)
        return cli.main(argv)

    return main


def _one_line_error(err: str) -> str:
    assert err.startswith("vitq: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_missing_key_names_the_flag_the_variable_and_the_key_file(run, capsys):
    assert run(["jobs", "list"], key=None) == ExitCode.AUTH == 5
    err = _one_line_error(capsys.readouterr().err)
    assert "--api-key" in err and "VITQ_API_KEY" in err and "no-key-here/local-api-key" in err, err
    assert "Bearer" not in err


def test_a_wrong_key_is_an_auth_failure_that_says_how_to_get_one(run, capsys):
    assert run(["jobs", "list"], key="vitq_not-a-real-key") == ExitCode.AUTH
    err = _one_line_error(capsys.readouterr().err)
    assert "refused this key" in err and "vitq admin keys create" in err, err


def test_bad_model_json_is_a_usage_error_in_one_line(run, capsys):
    assert run(["jobs", "submit", "--model", "{bad", *BITS]) == ExitCode.USAGE
    assert "--model is not valid JSON" in _one_line_error(capsys.readouterr().err)


def test_an_unknown_model_gets_did_you_mean(run, capsys):
    assert run(["jobs", "submit", "--model", "fmnist-vit-tny", *BITS]) == ExitCode.USAGE
    err = _one_line_error(capsys.readouterr().err)
    assert "unknown model 'fmnist-vit-tny'" in err and "did you mean 'fmnist-vit-tiny'?" in err, err


def test_wait_timeout_exits_3_and_says_the_job_keeps_running(run, service, capsys):
    job_id = submit_job(service)  # nothing runs it in-process: it stays queued
    assert run(["jobs", "wait", job_id, "--timeout", "0.2"]) == ExitCode.TIMEOUT == 3
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("vitq: error: ") and f"job {job_id} is still queued" in err, err
    assert f"vitq jobs wait {job_id}" in err and f"vitq jobs cancel {job_id}" in err


def test_ctrl_c_while_waiting_exits_130_and_names_the_job(run, service, capsys, monkeypatch):
    job_id = submit_job(service)

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises inside the poll's sleep

    monkeypatch.setattr("vitq.client.time.sleep", interrupted)
    assert run(["jobs", "wait", job_id]) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert "interrupted" in err and f"job {job_id} keeps running" in err, err


def test_submit_uploads_a_local_npz_once_then_reuses_it(run, service, tmp_path, capsys):
    npz = write_npz(tmp_path / "calib.npz", n=48, split="train", offset=4321)
    assert run(["datasets", "list", "--json"]) == 0
    before = {d["id"] for d in json.loads(capsys.readouterr().out)}

    assert run(["jobs", "submit", "--calib", str(npz), *BITS, "--json"]) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out)
    assert re.search(r"--calib calib\.npz: uploaded dataset \S+ \(48 images\)", captured.err), captured.err
    assert "preset smoke uses 32 of them" in captured.err  # the preset's calib_size, said out loud
    assert first["calibration"] not in before

    assert run(["jobs", "submit", "--calib", str(npz), *BITS, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["calibration"] == first["calibration"]
    assert "already uploaded (same sha256), reusing" in captured.err
    assert run(["datasets", "list", "--json"]) == 0
    after = {d["id"] for d in json.loads(capsys.readouterr().out)}
    assert after - before == {first["calibration"]}  # one upload, not two


def test_local_paths_that_cannot_be_uploaded_say_why(run, tmp_path, capsys):
    assert run(["jobs", "submit", "--calib", str(tmp_path / "missing.npz"), *BITS]) == ExitCode.USAGE
    assert "no such file" in _one_line_error(capsys.readouterr().err)
    assert run(["jobs", "submit", "--calib", str(tmp_path), *BITS]) == ExitCode.USAGE
    assert "tar czf" in _one_line_error(capsys.readouterr().err)


def test_jobs_list_cancel_and_events(run, service, capsys):
    job_id = submit_job(service)
    assert run(["jobs", "list", "--human", "--status", "queued"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["ID", "STATUS", "MODEL"] and job_id in out
    assert run(["jobs", "list", "--json", "--limit", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["data"]) == 1

    assert run(["jobs", "cancel", job_id, "--human"]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} cancelled"
    assert run(["jobs", "events", job_id, "--json"]) == 0
    kinds = [e["kind"] for e in json.loads(capsys.readouterr().out)]
    assert kinds == ["created", "cancelled"], kinds
    assert run(["jobs", "events", job_id, "--human"]) == 0
    assert "created" in capsys.readouterr().out

    assert run(["jobs", "status", job_id, "--human"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job_id} cancelled") and "calibration  fashion-mnist:train:32" in out, out


def test_a_cancelled_job_waited_for_exits_1(run, service, capsys):
    job_id = submit_job(service)
    assert run(["jobs", "cancel", job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert run(["jobs", "wait", job_id, "--json"]) == ExitCode.JOB_FAILED == 1
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"


def test_another_tenants_job_is_a_404_usage_error(run, service, capsys):
    job_id = submit_job(service)
    assert run(["jobs", "status", job_id], key=service.key_b) == ExitCode.USAGE
    assert "404 not_found" in _one_line_error(capsys.readouterr().err)


@pytest.fixture(scope="module")
def finished_job(service):
    """One real smoke job run by the worker's code in this process, with an evaluation set."""
    from worker.runner import run_job

    job_id = submit_job(service, evaluation="fashion-mnist:test:64", options={"iters": 2, "calib_size": 16})
    assert run_job(service.settings, job_id) == "succeeded"
    return job_id


def test_download_one_artifact_into_a_directory_that_does_not_exist_yet(run, finished_job, tmp_path, capsys):
    out = tmp_path / "results"
    assert run(["jobs", "download", finished_job, "--name", "report.html", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert run(["jobs", "download", finished_job, "--out", str(out / "report.html")]) == ExitCode.USAGE
    assert "is a file" in _one_line_error(capsys.readouterr().err)


def test_a_finished_job_is_summarised_in_a_few_lines_with_percentages(run, finished_job, capsys):
    assert run(["jobs", "wait", finished_job, "--human"]) == 0
    out = capsys.readouterr().out
    assert 6 <= len(out.splitlines()) <= 10, out
    assert out.startswith(f"job {finished_job} succeeded in ")
    assert re.search(r"top-1        FP \d+\.\d\d % -> quantized \d+\.\d\d % \([+-]\d+\.\d\d points\) on 64 images",
                     out), out
    assert "16 images used" in out and f"vitq jobs download {finished_job}" in out
    assert run(["jobs", "wait", finished_job]) == 0  # stdout is not a terminal: the JSON, for scripts
    assert json.loads(capsys.readouterr().out)["id"] == finished_job


def test_a_queued_job_summary_says_what_it_will_use_and_what_to_run_next():
    text = job_summary({"id": "j1", "status": "queued", "model": SMOKE["model"], "method": "isvit",
                        "w_bits": 4, "a_bits": 4, "preset": "smoke", "calibration": "fashion-mnist:train:64",
                        "config": {"calib_size": 32}})
    assert "fashion-mnist:train:64 · up to 32 images" in text and "vitq jobs wait j1" in text
