"""``vitq models pull | import | cache``: fill and read the pretrained-weights cache from the shell.

An air-gapped site carries weights in: ``vitq models pull deit_small_patch16_224.fb_in1k --cache DIR`` on a
connected machine (through ``HF_ENDPOINT`` when set, with the machine's ``HF_TOKEN``), carry ``DIR`` over,
then ``vitq models import DIR`` there puts its repositories into the model cache the service reads
(``VITQ_MODEL_CACHE``). ``import`` also takes a local timm-format snapshot (``config.json`` +
``model.safetensors``) or one weights file, under ``--as org/repo``.

These verbs live apart from the service's ``vitq models upload/list/delete`` (``vitq/client_cli.py``): they
need no server, only ``core``; ``register_model_cache_commands`` adds them to the ``models`` parser.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PULL_HELP = "download a model id's pretrained weights into a Hugging Face cache (needs network or a mirror)"
IMPORT_HELP = "add a Hugging Face cache, a timm-format snapshot directory or a weights file to the model cache"
CACHE_HELP = "list the repositories in the model cache"


def _cache(args: argparse.Namespace) -> Path:
    from core.hub_weights import default_cache_dir

    return Path(args.cache).expanduser() if args.cache else default_cache_dir()


def cmd_pull(args: argparse.Namespace) -> int:
    """Resolve the id (its config first, for a hub repository), then fetch its weights online."""
    from core.hub_weights import HubAccess, HubPolicy
    from core.models import resolve_model_spec, with_hub_weights
    from vitq.progress import ProgressBar

    env = HubPolicy.from_env()
    policy = HubPolicy(HubAccess.ONLINE, _cache(args), env.allowed_orgs, env.endpoint, env.token, args.timeout)
    spec = resolve_model_spec(args.model_id, policy)
    if spec.weights_kind != "hub":
        from core.errors import ModelSpecError

        raise ModelSpecError(f"{args.model_id!r} has no hub weights to pull (its weights: {spec.weights_kind})")
    bar = ProgressBar(disable=args.quiet)
    try:
        fetched = with_hub_weights(spec, policy, bar).fetched
    finally:
        bar.close()
    assert fetched is not None
    print(json.dumps({**fetched.provenance(), "cache": str(policy.cache_dir),
                      "downloaded": fetched.downloaded}, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from core.errors import ModelSpecError
    from core.hub_cache import REPO_PREFIX, import_hf_cache, import_snapshot

    source, cache = Path(args.source).expanduser(), _cache(args)
    if not source.exists():
        raise ModelSpecError(f"{source} does not exist")
    result: dict[str, Any] = {"cache": str(cache)}
    if source.is_dir() and any(source.glob(REPO_PREFIX + "*")):
        result["imported"] = import_hf_cache(source, cache)
    elif args.as_repo:
        commit = import_snapshot(source, cache, args.as_repo, args.revision)
        result["imported"] = [args.as_repo]
        result["commit"] = commit
        result["model_id"] = f"hf-hub:{args.as_repo}" + ("" if args.revision == "main" else f"@{args.revision}")
    else:
        raise ModelSpecError(
            f"{source} is not a Hugging Face cache (no {REPO_PREFIX}* folders); to import a snapshot directory or "
            "a weights file, name its repository with --as org/repo (timm's weights are timm/<name>.<tag>)"
        )
    print(json.dumps(result, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from core.hub_cache import cached_repositories

    print(json.dumps({"cache": str(_cache(args)), "repositories": cached_repositories(_cache(args))}, indent=2))
    return 0


def register_model_cache_commands(models_sub: Any) -> None:
    """Add ``pull``, ``import`` and ``cache`` to the subparsers of ``vitq models``."""
    cache_help = "model cache (default: VITQ_MODEL_CACHE, else the Hugging Face cache)"
    p = models_sub.add_parser("pull", help=PULL_HELP)
    p.add_argument("model_id", help="timm name[.tag], hf-hub:org/repo or org/repo, optionally @revision")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the hub (no retries)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pull)
    i = models_sub.add_parser("import", help=IMPORT_HELP)
    i.add_argument("source", help="a Hugging Face cache directory, a snapshot directory or a weights file")
    i.add_argument("--as", dest="as_repo", help="repository id for a snapshot or file (org/repo)")
    i.add_argument("--revision", default="main", help="the ref the imported snapshot is filed under")
    i.add_argument("--cache", help=cache_help)
    i.set_defaults(func=cmd_import)
    c = models_sub.add_parser("cache", help=CACHE_HELP)
    c.add_argument("--cache", help=cache_help)
    c.set_defaults(func=cmd_cache)


def add_models_cache_parser(sub: Any) -> None:
    """When the service's ``vitq models`` verbs are not installed: a ``models`` command of its own."""
    models = sub.add_parser("models", help="the pretrained-weights cache: pull, import, cache")
    register_model_cache_commands(models.add_subparsers(dest="models_command", required=True))
