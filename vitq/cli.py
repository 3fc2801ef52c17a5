"""``vitq``: quantize, evaluate and benchmark from the shell (the engine verbs, here), jobs, datasets and
models through the REST API (``vitq.client_cli``), and the operator verbs under ``vitq admin``
(``vitq.server_cli``).

Every failure a user can act on prints one line, ``vitq: error: …``, and exits with a documented status
(``vitq.cli_errors.ExitCode``: 1 failed job, 2 usage or refused request, 3 timeout, 4 unreachable API,
5 auth, 130 interrupted); only a bug prints a traceback. Nothing is imported at start-up that the verb
does not need: ``vitq --help`` and the client verbs never import torch, timm or onnx.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from vitq.cli_args import (
    METHODS,
    PRESETS,
    SOFTMAX_QUANTIZERS,
    add_bits_or_target_arguments,
    add_output_arguments,
    int_list,
    str_list,
    target_fields,
)
from vitq.cli_errors import describe, did_you_mean


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="auto", choices=PRESETS,
                   help="auto (default): paper on an accelerator, quick on a CPU")
    p.add_argument("--iters", type=int, help="reconstruction iterations per unit per stage (overrides preset)")
    p.add_argument("--calib-size", type=int, help="calibration images used (overrides preset)")
    p.add_argument("--device", help="torch device (default: the accelerator if present, else cpu)")


def _target_spec(args: argparse.Namespace) -> Any:
    from core import TargetSpec
    from core.errors import InvalidConfigError

    if args.w_bits is not None or args.a_bits is not None:
        raise InvalidConfigError("give either --w-bits/--a-bits or --target-drop, not both "
                                 "(--target-w-bits/--target-a-bits bound the search)")
    if not args.eval:
        raise InvalidConfigError("--target-drop needs labelled evaluation data (--eval): the target is a top-1 drop")
    return TargetSpec.from_dict(target_fields(args))


def _print_target(report: dict[str, Any]) -> None:
    target = report["target"]
    print(f"target     top-1 drop <= {100 * target['max_top1_drop']:.2f} points: "
          f"{'met' if target['target_met'] else 'NOT met'}")
    print(f"           {target['message']}")
    print(f"{'trial':>5}  {'kind':<8} {'bits':<34} {'size MB':>8} {'top-1':>7} {'drop':>6} {'s':>7}")
    for t in target["trials"]:
        mark = "  <- chosen" if t["index"] == target["chosen"]["index"] else ""
        print(f"{t['index']:>5}  {t['kind']:<8} {t['label']:<34} {t['size_bytes'] / 1e6:>8.3f} "
              f"{100 * t['decision_top1']:>7.2f} {100 * t['drop']:>6.2f} {t['seconds']:>7.1f}{mark}")
    d, h = target["decision"], target["heldout"]
    print(f"decision   n={d['n']}  FP {100 * d['fp_top1']:.2f}  quant {100 * d['quant_top1']:.2f}  "
          f"drop {100 * d['drop']:.2f}")
    print(f"held-out   n={h['n']}  FP {100 * h['fp_top1']:.2f}  quant {100 * h['quant_top1']:.2f}  "
          f"drop {100 * h['drop']:.2f}")


def cmd_quantize(args: argparse.Namespace) -> int:
    from core import QuantConfig, run_quantization, run_target_search
    from core.errors import InvalidConfigError
    from vitq.progress import ProgressBar

    target = _target_spec(args) if args.target_drop is not None else None
    if target is None and (args.w_bits is None or args.a_bits is None):
        raise InvalidConfigError("give --w-bits and --a-bits, or --target-drop for the smallest model within a drop")
    w_bits, a_bits = target.uniform_widths()[0] if target is not None else (args.w_bits, args.a_bits)
    fields: dict[str, Any] = {"w_bits": w_bits, "a_bits": a_bits, "method": args.method,
                              "preset": args.preset, "seed": args.seed}
    for name in ("iters", "calib_size", "batch_size", "softmax_quantizer"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.no_sos:
        fields["sos"] = False
    if args.real_exponent:
        fields["integer_exponent"] = False
    config = QuantConfig(**fields)
    bar = ProgressBar(disable=args.quiet)
    try:
        if target is not None:
            report = run_target_search(args.model, target, config, args.calib, args.eval, args.out, progress=bar,
                                       device=args.device)
        else:
            report = run_quantization(args.model, config, args.calib, args.eval, args.out, progress=bar,
                                      device=args.device, allow_chance_fp=args.allow_chance_fp)
    finally:
        bar.close()
    out = Path(args.out)
    from worker.report_html import render_report_html

    (out / "report.html").write_text(render_report_html(report), encoding="utf-8")
    _print_quantize_summary(args, report, out)
    return 0


def _print_quantize_summary(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    from vitq.summaries import pct, points

    print(f"model      {args.model} ({report['model']['timm_name']})")
    bits = report.get("bits_label") or f"W{report['w_bits']}A{report['a_bits']}"
    calib = report["calibration"]
    print(f"config     {report['method']} {bits}, preset {report['preset']}, "
          f"iters {report['config']['iters']}, calibration {calib['n']} images"
          + (f" of {calib['population']}" if calib.get("population", calib["n"]) > calib["n"] else ""))
    if report.get("target"):
        _print_target(report)
    if report["fp"] is not None:
        q = report["quant"]
        print(f"top-1      FP {pct(report['fp']['top1'])} -> quantized {pct(q['top1'])} "
              f"({points(report['fp']['top1'] - q['top1'])}, n={report['fp']['n']})")
        print(f"agreement  {pct(q['agreement'])} of predictions equal FP's, logit SQNR {q['logit_sqnr_db']:.2f} dB")
    if (report.get("baseline_check") or {}).get("kept") == "baseline":
        print("kept       RepQ-ViT's model: the I&S-ViT reconstruction was not better on held-out calibration images")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items())
    print(f"time       {stages}")
    print(f"wrote      {out / 'checkpoint.safetensors'}, {out / 'report.json'}, {out / 'report.html'}")
    onnx = report.get("exports", {}).get("onnx", {})
    if onnx.get("file"):
        print(f"           {out / onnx['file']} ({onnx['bytes']} bytes; FP32 parameters "
              f"{report['sizes']['fp32_parameters_bytes']} bytes)")
    elif onnx.get("error"):
        print(f"no ONNX    {onnx['error']}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core import evaluate, load, load_dataset, read_checkpoint_metadata
    from core.models import build_model, make_spec, resolve_model_spec

    target = args.target
    if target.endswith(".onnx") and Path(target).is_file():
        return _evaluate_onnx(args, target, args.data)
    if target.endswith(".safetensors") and Path(target).is_file():
        header = read_checkpoint_metadata(target)
        spec = make_spec({**header["model"], "checkpoint": None})
        model = load(target)
    else:
        spec = resolve_model_spec(target)
        model = build_model(spec)
    dataset = load_dataset(args.data, spec.preprocess)
    _print_metrics(args, evaluate(model, dataset, device=args.device))
    return 0


def _print_metrics(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """JSON with fractions for scripts (``--json``, or stdout not a terminal); percentages for people."""
    from vitq.summaries import metrics_line, wants_json

    print(json.dumps(metrics) if wants_json(args) else metrics_line(metrics))


def _evaluate_onnx(args: argparse.Namespace, target: str, data: str) -> int:
    """A vitq ONNX file in ONNX Runtime (CPU), with the preprocessing its metadata records."""
    from core import load_dataset
    from core.export import ExportError, evaluate_onnx, read_onnx_metadata
    from core.models import make_spec

    meta = read_onnx_metadata(target)
    if not isinstance(meta.get("model"), dict):
        raise ExportError(f"{Path(target).name} has no vitq model metadata (was it written by vitq export?)")
    spec = make_spec({**meta["model"], "checkpoint": None})
    _print_metrics(args, evaluate_onnx(target, load_dataset(data, spec.preprocess)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from core.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote      {path} ({path.stat().st_size} bytes, {args.format})")
    return 0


def _run_bench(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    from vitq.bench import BenchSetup, markdown_table, run_rows, seeds_table, summarize_seeds, with_seeds, write_json
    from vitq.progress import ProgressBar

    setup = BenchSetup(args.model, args.preset, args.calib, args.eval, args.device, args.calib_size, args.iters)
    rows = with_seeds(rows, args.seeds)

    def on_row(partial: dict[str, Any]) -> None:
        row = partial["results"][-1]
        print(f"done: {row['label']}  top-1 {100 * row['top1']:.2f}  ({row['seconds']:.0f} s)", file=sys.stderr)
        if args.json:
            write_json(args.json, partial)

    report = run_rows(setup, rows, progress_factory=lambda label: ProgressBar(label, disable=args.quiet),
                      on_row=on_row)
    print(markdown_table(report))
    if args.seeds > 1:
        report["summary"] = summarize_seeds(report, rows)
        print("\n" + seeds_table(report["summary"]))
    if args.json:
        write_json(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vitq.bench import method_rows

    return _run_bench(args, method_rows(args.bits, args.methods))


def cmd_ablation(args: argparse.Namespace) -> int:
    from vitq.bench import ablation_rows

    return _run_bench(args, ablation_rows(args.bits, args.arms))


OPERATOR_VERBS = ("api", "worker", "webhooks", "migrate", "keys", "tenants")
"""Verbs that run the service or touch its database directly: ``vitq admin VERB``. Their old top-level
spellings (``vitq keys …``) still work, listed as deprecated in ``vitq --help``."""

EPILOG = """The old spellings vitq api|worker|webhooks|migrate|keys|tenants still work (= vitq admin ...).
Output: a summary on a terminal, JSON with --json or when stdout is a pipe or file.
Exit status: 0 ok, 1 job failed or cancelled, 2 usage or refused request, 3 --timeout passed,
4 API unreachable, 5 no or refused API key, 130 interrupted (docs/cli.md)."""


class VitqParser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped verb or choice."""

    def error(self, message: str) -> Any:  # noqa: ANN401 - argparse's signature (NoReturn)
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            message += did_you_mean(match.group(1), choices)
        super().error(message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"vitq {version('vitq')}"
    except PackageNotFoundError:
        return "vitq (not installed as a package)"


class _Subset:
    """The subparsers action ``add_server_commands`` sees when only some of its verbs should land here:
    ``vitq serve`` as a user verb, and the operator verbs' old top-level spellings (``deprecated``: listed
    as such, pointing at ``vitq admin``). The other verbs go to a throwaway parser."""

    def __init__(self, subparsers: argparse._SubParsersAction, names: tuple[str, ...], *, deprecated: bool) -> None:
        self._subparsers = subparsers
        self._names = names
        self._deprecated = deprecated

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name not in self._names:
            return argparse.ArgumentParser(add_help=False)
        if not self._deprecated:
            return self._subparsers.add_parser(name, **kwargs)
        kwargs["help"] = f"deprecated: vitq admin {name}"
        parser = self._subparsers.add_parser(name, **kwargs)
        parser.set_defaults(deprecated_spelling=name)
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = VitqParser(prog="vitq", description="I&S-ViT post-training quantization for ViTs, as a library, "
                        "a service and this command line", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    q = sub.add_parser("quantize", help="quantize a model; write checkpoint.safetensors, report.json, report.html")
    q.add_argument("--model", required=True, help="built-in id, model-spec JSON file, or timm name")
    add_bits_or_target_arguments(q, eval_flag="--eval")
    q.add_argument("--method", default="isvit", choices=METHODS)
    q.add_argument("--calib", "--calibration", dest="calib", required=True,
                   help="calibration data: fashion-mnist:train[:N], .npz, dir or archive")
    q.add_argument("--eval", "--evaluation", "--data", dest="eval", help="evaluation data (labelled)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--allow-chance-fp", action="store_true",
                   help="go on when the float model's top-1 is at chance on the evaluation data (said in the report)")
    q.add_argument("--batch-size", type=int)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--softmax-quantizer", choices=SOFTMAX_QUANTIZERS,
                   help="post-Softmax quantizer (isvit default: sulq-or-logsqrt2, chosen per layer)")
    q.add_argument("--no-sos", action="store_true", help="ablation: one reconstruction stage instead of three")
    q.add_argument("--real-exponent", action="store_true", help="ablation: SULQ without integer exponents")
    q.add_argument("--quiet", action="store_true")
    _add_quant_options(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="top-1/top-5 of a vitq checkpoint, ONNX file or float model spec")
    e.add_argument("target", help="checkpoint.safetensors, model.onnx (run in ONNX Runtime on the CPU), "
                                  "or a model spec (built-in id, JSON file, timm name)")
    e.add_argument("--data", "--eval", "--evaluation", dest="data", required=True, help="labelled data")
    e.add_argument("--device")
    add_output_arguments(e)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="a vitq checkpoint as a deployable file (ONNX with QDQ and 4-bit weights)")
    x.add_argument("checkpoint", help="checkpoint.safetensors")
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    x.set_defaults(func=cmd_export)

    for name, func, help_text in (("bench", cmd_bench, "methods × bit widths table"),
                                  ("ablation", cmd_ablation, "I&S-ViT ablation: post-Softmax quantizer × SOS")):
        b = sub.add_parser(name, help=help_text)
        b.add_argument("--model", required=True)
        b.add_argument("--calib", required=True)
        b.add_argument("--eval", "--data", dest="eval", required=True)
        b.add_argument("--json", help="write the results as JSON here")
        b.add_argument("--quiet", action="store_true")
        b.add_argument("--seeds", type=int, default=1,
                       help="run every row with seeds 0..N-1 and print mean ± standard deviation per row")
        _add_quant_options(b)
        if name == "bench":
            b.add_argument("--bits", type=int_list, default=[3, 4, 6])
            b.add_argument("--methods", type=str_list, default=METHODS)
        else:
            b.add_argument("--bits", type=int, default=3)
            b.add_argument("--arms", type=str_list, help="comma-separated subset of: sulq-or-logsqrt2, sulq, log2, "
                                                          "logsqrt2, uniform, sulq-sos-off (default: all)")
        b.set_defaults(func=func)

    from vitq.client_cli import add_client_commands
    from vitq.models_cli import register_model_cache_commands
    from vitq.server_cli import add_server_commands

    register_model_cache_commands(add_client_commands(sub)["models"])  # vitq models pull/import/cache
    add_server_commands(_Subset(sub, ("serve",), deprecated=False))  # the embedded service is a user verb too
    admin = sub.add_parser("admin", help="operator verbs: serve, api, worker, webhooks, migrate, keys, tenants")
    add_server_commands(admin.add_subparsers(dest="admin_command", required=True, metavar="VERB"))
    add_server_commands(_Subset(sub, OPERATOR_VERBS, deprecated=True))
    return parser


def run_parsed(args: argparse.Namespace) -> int:
    """Run the chosen verb; turn every failure a user can act on into one line and its exit status."""
    if getattr(args, "deprecated_spelling", None) and sys.stderr.isatty():
        print(f"vitq: note: `vitq {args.deprecated_spelling}` is now `vitq admin {args.deprecated_spelling}` "
              "(the old spelling keeps working)", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        explained = describe(exc, url=_url(args), key_given=_key_given(args))
        if explained is None:
            raise
        message, code = explained
        print(f"vitq: error: {message}", file=sys.stderr)
        return int(code)


def _url(args: argparse.Namespace) -> str | None:
    import os

    return getattr(args, "url", None) or os.environ.get("VITQ_URL")


def _key_given(args: argparse.Namespace) -> bool:
    if getattr(args, "api_key", None):
        return True
    client = sys.modules.get("vitq.client")
    return client is not None and client.default_api_key() is not None


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
