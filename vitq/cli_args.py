"""argparse pieces shared by the engine verbs (``vitq.cli``) and the client verbs (``vitq.client_cli``);
importing them pulls in neither torch nor the service."""

from __future__ import annotations

import argparse
from typing import Any

METHODS = ["isvit", "repq", "ptq-uniform"]
"""``core.config.Method``'s values, written out so that the CLI's parser needs no torch import
(tests/vitq/test_cli_args.py keeps the two equal)."""
PRESETS = ["auto", "paper", "quick", "smoke"]
"""``core.config.Preset``'s values (kept equal by the same test)."""
SOFTMAX_QUANTIZERS = ["sulq-or-logsqrt2", "sulq", "log2", "logsqrt2", "uniform"]
"""``core.config.SoftmaxQuantizer``'s values (kept equal by the same test)."""


def int_list(text: str) -> list[int]:
    """``"3,4,6"`` → ``[3, 4, 6]``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """``"isvit, repq"`` → ``["isvit", "repq"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]


def given(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the options left unset (``None``)."""
    return {k: v for k, v in values.items() if v is not None}


def add_bits_or_target_arguments(parser: argparse.ArgumentParser, *, eval_flag: str) -> None:
    """``--w-bits``/``--a-bits``, or ``--target-drop`` and the search's bounds: one set of flags for
    ``vitq quantize`` (which runs the search here) and ``vitq jobs submit`` (which sends it as the job's
    ``target``). ``eval_flag`` names the verb's evaluation-data option in the help."""
    parser.add_argument("--w-bits", type=int, help="weight bits (or --target-drop)")
    parser.add_argument("--a-bits", type=int, help="activation bits (or --target-drop)")
    parser.add_argument("--target-drop", type=float, help="instead of bits: the smallest model whose top-1 drops "
                        f"at most this much (a fraction: 0.01 is one point) on a decision split of {eval_flag}; "
                        f"needs {eval_flag}")
    parser.add_argument("--target-w-bits", type=int_list, help="weight widths the search may use (default 3,4,6,8)")
    parser.add_argument("--target-a-bits", type=int_list, help="activation widths it may use (default 3,4,6,8)")
    parser.add_argument("--max-trials", type=int, help="most quantizations the search runs (default 8)")
    parser.add_argument("--decision-fraction", type=float,
                        help=f"share of {eval_flag} the search decides on (default 0.5; the rest is held out)")
    parser.add_argument("--no-mixed", action="store_true", help="target search: uniform widths only")


def target_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The target flags as the fields of ``core.TargetSpec`` and of the API's ``target``; unset ones left out."""
    return given({
        "max_top1_drop": args.target_drop,
        "w_bits": args.target_w_bits,
        "a_bits": args.target_a_bits,
        "max_trials": args.max_trials,
        "decision_fraction": args.decision_fraction,
        "mixed": False if args.no_mixed else None,
    })


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` / ``--human``: JSON for scripts, a summary for people. Neither given: the summary on a
    terminal, JSON when stdout is a pipe or a file (``vitq.summaries.wants_json``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print JSON (the default when stdout is not a terminal)")
    group.add_argument("--human", action="store_true", help="print the summary even when stdout is not a terminal")
