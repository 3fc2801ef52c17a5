"""Model ids as timm and the Hugging Face Hub write them, parsed into one typed value.

The forms (all optionally followed by ``@revision``, a branch, tag or commit of the hub repository):

- a built-in id: ``fmnist-vit-tiny`` (bundled weights);
- a timm name: ``deit_small_patch16_224`` (its default pretrained tag) or ``deit_small_patch16_224.fb_in1k``;
- a timm-format Hub repository: ``hf-hub:org/repo`` or ``org/repo``.

A timm name with a tag means that tag's pretrained weights, which timm keeps on the Hub
(``pretrained_cfg.hf_hub_id``, e.g. ``timm/deit_small_patch16_224.fb_in1k``); a hub id means the weights
in that repository, whose ``config.json`` names the architecture (``architecture``, ``model_args``,
``pretrained_cfg``). Parsing needs no network: only timm's registry is read. An unknown name is a
``ModelSpecError`` that lists close matches ("did you mean …") and the built-in ids.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

import timm

from core.errors import ModelSpecError

SUPPORTED_FAMILIES = ("vit_", "deit_", "deit3_", "swin_")
"""The timm families vitq quantizes (ViT, DeiT, DeiT-III, Swin)."""
HUB_PREFIX = "hf-hub:"
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_ID_PATTERN = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_TIMM_NAME = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_]+)?$")
MAX_ID_LENGTH = 300


@dataclass(frozen=True)
class HubRef:
    """Where pretrained weights live on the Hub: a repository, optionally pinned to a revision."""

    repo_id: str
    revision: str | None = None
    """Branch, tag or commit as asked; ``None`` is the repository's ``main``."""
    filename: str | None = None
    """A weights file other than timm's default (timm's ``pretrained_cfg.hf_hub_filename``)."""

    @property
    def organisation(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "filename": self.filename}

    @classmethod
    def from_dict(cls, data: Any) -> HubRef:
        if not isinstance(data, dict) or not isinstance(data.get("repo_id"), str):
            raise ModelSpecError("model spec field 'hub' must be an object with a repo_id")
        revision, filename = data.get("revision"), data.get("filename")
        if not REPO_ID_PATTERN.match(data["repo_id"]) or (revision is not None and not _valid_revision(revision)):
            raise ModelSpecError(f"model spec field 'hub' names an invalid repository {data['repo_id']!r}")
        if filename is not None and (not isinstance(filename, str) or "/" in filename or filename.startswith(".")):
            raise ModelSpecError("model spec field 'hub.filename' must be a file name")
        return cls(data["repo_id"], revision, filename)


@dataclass(frozen=True)
class ModelId:
    """A parsed model id. ``kind`` is ``builtin``, ``timm`` (a registered timm name, maybe tagged) or
    ``hub`` (a timm-format repository whose config names the architecture)."""

    kind: str
    text: str
    """The id as written (without surrounding space)."""
    timm_name: str | None = None
    """``kind == "timm"``: the name as timm takes it, with its tag when one was given."""
    hub: HubRef | None = None
    """Where the pretrained weights are (``timm``: from timm's registry; ``hub``: the repository)."""


def _valid_revision(revision: Any) -> bool:
    return isinstance(revision, str) and bool(_REVISION.match(revision)) and ".." not in revision


@functools.cache
def supported_timm_names() -> frozenset[str]:
    """timm's registered architectures in the supported families (read once: ``list_models`` sorts every
    name on each call)."""
    return frozenset(n for n in timm.list_models() if n.startswith(SUPPORTED_FAMILIES))


@functools.cache
def _pretrained_tags() -> frozenset[str]:
    return frozenset(n for n in timm.list_pretrained() if n.startswith(SUPPORTED_FAMILIES))


def timm_hub_ref(timm_name: str, revision: str | None = None) -> HubRef | None:
    """Where timm keeps the pretrained weights of ``timm_name`` (its default tag when it has none);
    ``None`` when timm has no Hub weights for it."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    data = cfg.to_dict() if cfg is not None else {}
    hub_id = data.get("hf_hub_id")
    if not hub_id:
        return None
    repo_id, _, pinned = str(hub_id).partition("@")
    return HubRef(repo_id, revision or pinned or None, data.get("hf_hub_filename") or None)


def did_you_mean(name: str, builtin_ids: frozenset[str] | set[str] = frozenset(), n: int = 5) -> list[str]:
    """Close matches for an unknown model name among the built-ins, the supported timm names and their
    pretrained tags (``difflib`` ratio ≥ 0.6)."""
    base = name.split("@", 1)[0].removeprefix(HUB_PREFIX)
    pool = set(builtin_ids) | supported_timm_names() | (_pretrained_tags() if "." in base else set())
    return difflib.get_close_matches(base, sorted(pool), n=n, cutoff=0.6)


def unknown_model_error(name: str, builtin_ids: frozenset[str] | set[str] = frozenset(),
                        why: str = "") -> ModelSpecError:
    """The refusal for a name vitq cannot resolve: close matches and the built-in ids."""
    close = did_you_mean(name, builtin_ids)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    builtins = f" Built-in ids: {', '.join(sorted(builtin_ids))}." if builtin_ids else ""
    return ModelSpecError(
        f"unknown model {name[:120]!r}{why}{hint}{builtins} Model ids: a built-in id, a timm ViT/DeiT/Swin name "
        "(vit_*, deit_*, deit3_*, swin_*), optionally with a pretrained tag (deit_small_patch16_224.fb_in1k), "
        "or a timm-format Hub repository (hf-hub:org/repo or org/repo), optionally @revision"
    )


def parse_model_id(text: str, builtin_ids: frozenset[str] | set[str] = frozenset()) -> ModelId:
    """Parse ``text`` (see the module docstring); raises ``ModelSpecError`` naming close matches."""
    if not isinstance(text, str) or not text.strip():
        raise ModelSpecError("a model id must be a non-empty string")
    value = text.strip()
    if len(value) > MAX_ID_LENGTH:
        raise ModelSpecError(f"a model id is at most {MAX_ID_LENGTH} characters")
    if value in builtin_ids:
        return ModelId("builtin", value)
    body, at, revision = value.partition("@")
    if at and not _valid_revision(revision):
        raise ModelSpecError(f"model id {value[:120]!r}: {revision[:60]!r} is not a valid revision")
    rev = revision if at else None
    is_hub = body.startswith(HUB_PREFIX) or "/" in body
    if is_hub:
        repo_id = body.removeprefix(HUB_PREFIX)
        if not REPO_ID_PATTERN.match(repo_id) or ".." in repo_id:
            raise ModelSpecError(
                f"model id {value[:120]!r}: a Hub repository is written org/repo (letters, digits, '.', '_', '-')"
            )
        return ModelId("hub", value, hub=HubRef(repo_id, rev))
    if not _TIMM_NAME.match(body):
        raise unknown_model_error(value, builtin_ids)
    name, _, tag = body.partition(".")
    if name not in supported_timm_names():
        raise unknown_model_error(value, builtin_ids)
    if tag and body not in _pretrained_tags():
        tags = sorted(t.partition(".")[2] for t in _pretrained_tags() if t.startswith(name + "."))
        raise ModelSpecError(
            f"timm has no pretrained tag {tag!r} for {name}"
            + (f"; its tags: {', '.join(tags)}" if tags else "; it has no pretrained weights in timm")
        )
    return ModelId("timm", value, timm_name=body, hub=timm_hub_ref(body, rev))
