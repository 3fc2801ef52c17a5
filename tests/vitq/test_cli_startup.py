"""vitq/cli.py: `vitq --help` and the client verbs start without torch, timm or onnx (they run with those
imports made impossible), an unreachable API is one line and exit 4, `--version`, "did you mean" for
verbs, and the operator verbs under `vitq admin` with their old spellings still working."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO
from vitq.cli_args import METHODS, PRESETS, SOFTMAX_QUANTIZERS
from vitq.processes import free_port

ENGINE = ("torch", "timm", "onnx", "onnxruntime", "torchvision", "safetensors")
WITHOUT_ENGINE = f"""
import sys
class NoEngine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ENGINE!r}:
            raise ImportError(f"{{name}} is blocked: the client path must not import it")
sys.meta_path.insert(0, NoEngine())
from vitq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _vitq_without_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ENGINE, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "VITQ_DATA_DIR": "/nonexistent"})


def test_help_and_every_client_verb_parse_without_the_engine():
    assert _vitq_without_engine("--help").returncode == 0
    for verb in (["jobs", "submit"], ["jobs", "list"], ["jobs", "wait"], ["jobs", "download"],
                 ["datasets", "upload"], ["datasets", "list"], ["models", "upload"], ["admin", "keys", "create"]):
        done = _vitq_without_engine(*verb, "--help")
        assert done.returncode == 0, (verb, done.stderr[-1500:])


def test_an_unreachable_api_is_one_line_and_exit_4_without_the_engine():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _vitq_without_engine("jobs", "list", "--url", url, "--api-key", "vitq_x")
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith(f"vitq: error: cannot reach the vitq API at {url}"), done.stderr
    assert done.stderr.count("\n") == 1 and "vitq serve" in done.stderr and "--url" in done.stderr


def test_version_and_did_you_mean():
    version = _vitq_without_engine("--version")
    assert version.returncode == 0 and version.stdout.startswith("vitq "), version
    typo = _vitq_without_engine("jbos", "list")
    assert typo.returncode == 2 and "did you mean 'jobs'?" in typo.stderr, typo.stderr
    typo = _vitq_without_engine("jobs", "lst")
    assert typo.returncode == 2 and "did you mean 'list'?" in typo.stderr, typo.stderr


def test_operator_verbs_live_under_admin_and_the_old_spellings_still_parse():
    from vitq.cli import OPERATOR_VERBS, build_parser

    parser = build_parser()
    for verb in OPERATOR_VERBS:
        argv = {"keys": ["keys", "revoke", "k"], "tenants": ["tenants", "limits", "--tenant", "t"]}.get(verb, [verb])
        new, old = parser.parse_args(["admin", *argv]), parser.parse_args(argv)
        assert new.func is old.func and old.deprecated_spelling == verb
        assert getattr(new, "deprecated_spelling", None) is None
    assert "deprecated: vitq admin keys" in parser.format_help()
    assert parser.parse_args(["serve"]).func is parser.parse_args(["admin", "serve"]).func


def test_the_clis_choices_are_cores():
    from core.config import Method, Preset, SoftmaxQuantizer

    assert METHODS == [m.value for m in Method]
    assert PRESETS == [p.value for p in Preset]
    assert SOFTMAX_QUANTIZERS == [s.value for s in SoftmaxQuantizer]
