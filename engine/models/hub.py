"""Checkpoints by name from the Hugging Face hub: ``--checkpoint hf:ORG/REPO[/SUBFOLDER][@REVISION]``.

:func:`load_checkpoint` is how the pipeline loads a checkpoint: a local folder goes to the family's
loader as before; an ``hf:`` name is first resolved by :func:`resolve_checkpoint` into a folder of the
Hugging Face cache, downloading only the files the family's loader reads:

- Geneformer (``ctheodoris/Geneformer``): ``SUBFOLDER/config.json``, the weights (``model.safetensors``,
  else ``pytorch_model.bin``) and the gene dictionaries the loader would pick (the first
  ``token_dictionary*.pkl`` of its search folders, ``geneformer/`` of the repository included, whose
  size is ``config.json``'s ``vocab_size``, and the other dictionaries of that generation);
- Tahoe-X1 (``tahoebio/Tahoe-x1``): the four files of a size folder (``model.safetensors``,
  ``model_config.yml``, ``collator_config.yml``, ``vocab.json``).

The cache, offline mode and revisions are huggingface_hub's, read when a name is resolved:
``HF_HUB_CACHE`` (else ``HF_HOME/hub``), ``HF_HUB_OFFLINE=1`` (only the cache is read), ``HF_ENDPOINT``
(a mirror), ``@REVISION`` a branch, tag or commit (default ``main``). A hub that cannot be reached is
treated as offline (the cache is used), as huggingface_hub does. The loaded model's ``checkpoint`` record gains ``hub``:
repository, subfolder, the resolved commit and the sha256 of every file used, which the store keeps as
its ``hub`` attribute (not hashed: the same name resumes on a machine whose cache lives elsewhere).
scGPT and scFoundation are not published on the hub by their authors; an ``hf:`` name for them is
refused with a pointer to their download pages. Every failure is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import contextlib
import glob
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .base import LoadedModel, ModelFamily

HUB_PREFIX = "hf:"
DEFAULT_REVISION = "main"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_FORM = "write hf:ORG/REPO[/SUBFOLDER][@REVISION], e.g. hf:ctheodoris/Geneformer/Geneformer-V2-104M"

# families whose authors do not publish on the hub: where their checkpoints come from
OFFICIAL_DOWNLOADS = {
    "scgpt": "scGPT's authors publish its checkpoints on Google Drive, not on the Hugging Face hub: download a "
    "model folder (best_model.pt, args.json, vocab.json) from the links under 'Pretrained scGPT Model Zoo' in the "
    "README of github.com/bowang-lab/scGPT and pass --checkpoint FOLDER",
    "scfoundation": "scFoundation's authors publish models.ckpt outside the Hugging Face hub: download it from the "
    "link in model/models/download.txt of github.com/biomap-research/scFoundation (see its README), put it in a "
    "folder with OS_scRNA_gene_index.19264.tsv and pass --checkpoint FOLDER",
}


@dataclass(frozen=True)
class HubName:
    """A parsed ``hf:`` name: repository, optional subfolder, optional revision (None: ``main``)."""

    repo: str
    subfolder: str = ""
    revision: str | None = None

    @property
    def ref(self) -> str:
        """The revision asked for (``main`` when none was given)."""
        return self.revision or DEFAULT_REVISION

    def file(self, name: str) -> str:
        """The repository path of ``name`` inside the subfolder."""
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo}{sub}{rev}"


def parse_hub_name(checkpoint: str | Path | None) -> HubName | None:
    """The :class:`HubName` of an ``hf:`` checkpoint, None for anything else (a folder).

    An existing local path is a folder even if it starts with ``hf:``; a malformed name is a
    ``ConfigError`` giving the form.
    """
    text = str(checkpoint) if checkpoint is not None else ""
    if not text.startswith(HUB_PREFIX) or Path(text).exists():
        return None
    name, sep, revision = text[len(HUB_PREFIX) :].partition("@")
    parts = name.strip("/").split("/")
    bad_part = any(not _PART.fullmatch(p) or set(p) == {"."} for p in parts)
    bad_revision = bool(sep) and (not revision or any(c.isspace() for c in revision) or ".." in revision)
    if len(parts) < 2 or bad_part or bad_revision:
        msg = f"--checkpoint {text!r} is not a Hugging Face name; {_FORM}"
        raise ConfigError(msg)
    return HubName("/".join(parts[:2]), "/".join(parts[2:]), revision if sep else None)


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder as huggingface_hub finds it (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(env[key])).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` when set (a mirror), else None: huggingface_hub's default, https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only."""
    return any(os.environ.get(k, "").strip().upper() in TRUE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ------------------------------------------------------------------------------------------------
# resolving a name: the commit, the repository's files, the downloads


class _Repo:
    """One resolution: the name, the cache, how the hub is reached, and (once known) the commit and file list.

    Online, the hub gives the commit of the revision and the repository's file list first, so a missing
    file is named before anything is downloaded. Offline (``HF_HUB_OFFLINE``), or when the hub cannot be
    reached, only the cache is read, as huggingface_hub does: the revision's ``refs/`` entry, and the
    files present in the commit's snapshot folder.
    """

    def __init__(self, name: HubName, family: str) -> None:
        self.name = name
        self.family = family
        self.cache = hub_cache_dir()
        self.offline = hub_offline()
        self.unreachable: Exception | None = None  # why the hub could not be asked (then: the cache only)
        self.commit: str | None = None
        self.listing: set[str] = set()
        self.listed_online = False  # True: the hub's file list; False: the files in the local snapshot

    @property
    def cache_only(self) -> bool:
        return self.offline or self.unreachable is not None

    # -------------------------------------------------------------- messages
    def _at(self) -> str:
        commit = f" (commit {self.commit[:12]})" if self.commit and self.commit != self.name.ref else ""
        return f"{self.name.repo} at {self.name.ref}{commit}"

    def _fetch_hint(self, files: Sequence[str]) -> str:
        return " ".join(["hf download", self.name.repo, *files, "--revision", self.commit or self.name.ref])

    def not_cached(self, files: Sequence[str], what: str | None = None) -> CheckpointError:
        """Cache only, and ``files`` are not in it: say which, why the hub was not asked, how to fetch them."""
        if self.offline:
            why, fix = "HF_HUB_OFFLINE is set", "Unset HF_HUB_OFFLINE (with network access) to download them, or run"
        else:
            why = f"the hub could not be reached ({type(self.unreachable).__name__}: {_first_line(self.unreachable)})"
            fix = "Check the network (or HF_ENDPOINT), or on a machine online run"
        state = "not fully" if self.commit else "not"  # no commit: the revision itself was never fetched
        folders = self.model_folders()
        cached = f" (cached {self.family} model folders: {', '.join(folders)})" if folders else ""
        return CheckpointError(
            f"{self._at()} is {state} in the Hugging Face cache {self.cache} and {why}; missing: "
            f"{what or ', '.join(files)}{cached}. {fix}: {self._fetch_hint(files)} (with the same HF_HUB_CACHE)"
        )

    def not_in_repo(self, files: Sequence[str], what: str | None = None) -> CheckpointError:
        """``files`` are not in the repository at this revision; name the model folders it has."""
        folders = self.model_folders()
        have = f"; its {self.family} model folders: {', '.join(folders)}" if folders else ""
        sub = f"subfolder {self.name.subfolder!r}" if self.name.subfolder else "the repository root"
        return CheckpointError(
            f"{self._at()} has no {what or ', '.join(files)}: {sub} is not a {self.family} model folder{have}; {_FORM}"
        )

    def missing(self, files: Sequence[str], what: str | None = None) -> CheckpointError:
        return self.not_in_repo(files, what) if self.listed_online else self.not_cached(files, what)

    def model_folders(self) -> list[str]:
        anchor = "/" + _PLANS[self.family].anchor
        return sorted({f[: -len(anchor)] for f in self.listing if f.endswith(anchor)})

    # -------------------------------------------------------------- hub calls
    @contextlib.contextmanager
    def _errors(self, files: Sequence[str]) -> Iterator[None]:
        """Turn huggingface_hub's exceptions into one :class:`CheckpointError` line."""
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo = self.name.repo
        try:
            yield
        except GatedRepoError:
            msg = (
                f"{repo} on the Hugging Face hub is gated: accept its conditions on https://huggingface.co/{repo} "
                "and log in (hf auth login, or set HF_TOKEN)"
            )
            raise CheckpointError(msg) from None
        except RepositoryNotFoundError:
            msg = (
                f"no repository {repo} on the Hugging Face hub (or it is private: log in with hf auth login, or set "
                f"HF_TOKEN); {_FORM}"
            )
            raise CheckpointError(msg) from None
        except RevisionNotFoundError:
            msg = f"{repo} on the Hugging Face hub has no revision {self.name.ref!r}; give a branch, tag or commit"
            raise CheckpointError(msg) from None
        except LocalEntryNotFoundError as exc:  # cache only, and not there
            if not self.cache_only:  # the hub went away between two calls
                self.unreachable = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            raise self.not_cached(files) from self.unreachable
        except (HfHubHTTPError, OSError) as exc:
            msg = (
                f"the Hugging Face hub failed for {self._at()} ({type(exc).__name__}: {_first_line(exc)}); "
                "try again, or check the network and HF_ENDPOINT"
            )
            raise CheckpointError(msg) from exc

    def ask_hub(self) -> None:
        """Online: the commit of the revision and the repository's files at it (else the cache is used)."""
        if self.offline:
            return
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            with self._errors([]):
                info = HfApi(endpoint=hub_endpoint()).model_info(self.name.repo, revision=self.name.ref)
        except CheckpointError as err:
            if isinstance(err.__context__, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError)):
                raise
            self.unreachable = err.__cause__ if isinstance(err.__cause__, Exception) else err
            return
        except Exception as exc:  # the network, not the name: use what is cached, as huggingface_hub does
            self.unreachable = exc
            return
        self.commit = info.sha
        self.listing = {s.rfilename for s in info.siblings or []}
        self.listed_online = True

    def download(self, files: Sequence[str], revision: str | None = None) -> Path:
        """Bring ``files`` (repository paths) into the cache; the snapshot folder of the commit."""
        from huggingface_hub import snapshot_download

        with self._errors(files):
            folder = snapshot_download(
                self.name.repo,
                revision=revision or self.commit or self.name.ref,
                allow_patterns=[glob.escape(f) for f in files],
                cache_dir=str(self.cache),
                local_files_only=self.cache_only,
                endpoint=hub_endpoint(),
            )
        snapshot = Path(folder)
        if not self.listed_online or self.commit != snapshot.name:
            self.commit = snapshot.name
            self.listed_online = False  # cache only (or the branch moved): the files of this snapshot
            self.listing = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
        return snapshot

    def require(self, files: Sequence[str], what: str | None = None) -> None:
        absent = [f for f in files if f not in self.listing]
        if absent:
            raise self.missing(absent, what)


@dataclass(frozen=True)
class _Plan:
    """Which files of a repository a family's loader reads: ``anchor`` first, then ``files(repo, snapshot)``."""

    anchor: str
    files: Callable[[_Repo, Path, Mapping[str, Any]], list[str]]


def _tahoe_files(repo: _Repo, snapshot: Path, options: Mapping[str, Any]) -> list[str]:
    from .tahoe_x1 import REQUIRED_FILES

    del snapshot, options
    files = [repo.name.file(f) for f in REQUIRED_FILES]
    repo.require(files)
    return files


def _geneformer_files(repo: _Repo, snapshot: Path, options: Mapping[str, Any]) -> list[str]:
    """``config.json``, the weights, and the dictionaries :func:`.models.geneformer.find_dictionaries` picks."""
    from .checkpoints import load_plain_pickle, read_json
    from .geneformer import CONFIG_FILE, DICT_DIRS, DICT_ROLES, DICT_SUFFIXES, WEIGHTS_FILES

    name = repo.name
    weights = next((name.file(w) for w in WEIGHTS_FILES if name.file(w) in repo.listing), None)
    if weights is None:
        raise repo.missing([name.file(WEIGHTS_FILES[0])], " or ".join(name.file(w) for w in WEIGHTS_FILES))
    files = [name.file(CONFIG_FILE), weights]
    if options.get("token_dictionary") is not None:  # the user's own dictionaries
        return files
    cfg = read_json(snapshot / name.file(CONFIG_FILE), "Geneformer settings")
    vocab_size = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    token_pattern = DICT_ROLES["token_dictionary"]
    for rel in DICT_DIRS:
        folder = posixpath.normpath(posixpath.join(name.subfolder or ".", rel))
        if folder.startswith(".."):
            continue
        for sfx in DICT_SUFFIXES:
            candidate = _in(folder, token_pattern.format(sfx))
            if candidate not in repo.listing:
                continue
            repo.download([candidate])
            size = len(load_plain_pickle(snapshot / candidate, "Geneformer token dictionary") or {})
            if size == vocab_size:
                others = [_in(folder, p.format(sfx)) for role, p in DICT_ROLES.items() if role != "token_dictionary"]
                return [*files, candidate, *(f for f in others if f in repo.listing)]
    beside = f"{name.subfolder}/ or " if name.subfolder else ""
    what = f"Geneformer token dictionary with {vocab_size} tokens (config.json vocab_size) in {beside}geneformer/"
    raise repo.missing([_in("geneformer", token_pattern.format("*"))], what)


def _in(folder: str, name: str) -> str:
    return name if folder in ("", ".") else f"{folder}/{name}"


_PLANS: dict[str, _Plan] = {
    "geneformer": _Plan("config.json", _geneformer_files),
    "tahoe-x1": _Plan("model_config.yml", _tahoe_files),
}


@dataclass(frozen=True)
class HubCheckpoint:
    """A resolved ``hf:`` name: the local folder to load and what it came from."""

    name: HubName
    commit: str
    folder: Path
    snapshot: Path
    files: tuple[str, ...]

    def record(self, digests: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The store's ``hub`` attribute; ``digests`` (real path -> sha256) spares hashing a file twice."""
        from .checkpoints import sha256_file

        digests = digests or {}
        sha = {}
        for f in self.files:
            path = os.path.realpath(self.snapshot / f)
            sha[f] = digests.get(path) or sha256_file(Path(path))
        pinned = HubName(self.name.repo, self.name.subfolder, self.commit)
        return {
            "name": str(pinned),
            "repo": self.name.repo,
            "subfolder": self.name.subfolder,
            "revision": self.commit,
            "requested_revision": self.name.ref,
            "files": sha,
        }


def resolve_checkpoint(family: str, name: HubName, options: Mapping[str, Any] | None = None) -> HubCheckpoint:
    """Download (or find in the cache) the files of ``name`` that ``family``'s loader reads."""
    plan = _PLANS.get(family)
    if plan is None:
        pointer = OFFICIAL_DOWNLOADS.get(family) or (
            f"{family} checkpoints are not read from the Hugging Face hub; pass --checkpoint FOLDER"
        )
        msg = f"--checkpoint {name}: {pointer} (hf: names work for {', '.join(_PLANS)})"
        raise CheckpointError(msg)
    repo = _Repo(name, family)
    anchor = name.file(plan.anchor)
    repo.ask_hub()
    if repo.listed_online:
        repo.require([anchor])  # online: a wrong subfolder is named before anything is downloaded
    snapshot = repo.download([anchor], revision=name.ref)  # records the revision's commit in the cache
    repo.require([anchor])
    files = plan.files(repo, snapshot, dict(options or {}))
    repo.download(files)
    absent = [f for f in files if not (snapshot / f).is_file()]
    if absent:
        raise repo.not_cached(absent)
    return HubCheckpoint(name, repo.commit or snapshot.name, snapshot / name.subfolder, snapshot, tuple(files))


def load_checkpoint(family: ModelFamily, checkpoint: str | Path, **options: Any) -> LoadedModel:
    """``family.load`` of a checkpoint folder or an ``hf:`` name (recorded in ``checkpoint["hub"]``)."""
    name = parse_hub_name(checkpoint)
    if name is None:
        return family.load(checkpoint, **options)
    resolved = resolve_checkpoint(family.name, name, options)
    loaded = family.load(resolved.folder, **options)
    loaded.checkpoint["hub"] = resolved.record(_loader_digests(loaded.checkpoint, resolved.folder))
    return loaded


def _loader_digests(record: Mapping[str, Any], folder: Path) -> dict[str, str]:
    """Real path -> sha256 of the files the loader already hashed (its ``files`` record)."""
    out = {}
    for name, info in (record.get("files") or {}).items():
        if isinstance(info, Mapping) and info.get("sha256"):
            out[os.path.realpath(info.get("path") or folder / name)] = str(info["sha256"])
    return out


def hub_attrs(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"hub": ...}`` for the store's attributes when the checkpoint came from the hub, else nothing."""
    return {"hub": dict(record["hub"])} if record.get("hub") else {}


def describe_hub(attrs: Mapping[str, Any]) -> str | None:
    """The line ``cellstrata info`` prints for a store whose checkpoint came from the hub."""
    hub = attrs.get("hub")
    if not isinstance(hub, Mapping):
        return None
    files = hub.get("files") or {}
    where = "/".join(p for p in (hub.get("repo"), hub.get("subfolder")) if p)
    return (
        f"hub         {where} at {hub.get('revision')} (asked for {hub.get('requested_revision')}); "
        f"{len(files)} files, sha256 " + ", ".join(f"{Path(f).name} {str(s)[:12]}" for f, s in files.items())
    )


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = [
    "HUB_PREFIX",
    "OFFICIAL_DOWNLOADS",
    "HubCheckpoint",
    "HubName",
    "describe_hub",
    "hub_attrs",
    "hub_cache_dir",
    "hub_endpoint",
    "hub_offline",
    "load_checkpoint",
    "parse_hub_name",
    "resolve_checkpoint",
]
