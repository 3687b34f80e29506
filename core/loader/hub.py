"""Model ids on the Hugging Face Hub: fetched once at start, as TGI's launcher does, then read from the cache.

`fetch` is the download step: it lists the repository at the revision, picks the files tokenmill reads
(config, generation config, tokenizer files, and either the safetensors weights, only the shards the
index names, or the repository's one GGUF file), and downloads them through `huggingface_hub`'s
`snapshot_download`, which keeps the Hub's cache layout, shows progress and skips files already cached.
`resolve_hub_id` finds a fetched snapshot again without the network.

A process resolves each hub id once: later look-ups by the bare id (the router reading the tokenizer
while the model server loads the weights) get the very snapshot fetched at start, so the weights and
the tokenizer come from one commit even if the branch moves meanwhile.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tokenmill.loader.errors import ModelNotFoundError, UnsupportedCheckpointError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
INDEX = "model.safetensors.index.json"
METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
            "chat_template.json", "chat_template.jinja", INDEX)

_fetched: dict[str, Path] = {}  # hub id -> the snapshot this process fetched or resolved for it at start


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub; the CLI fills it from flags and the environment (HF_TOKEN, HF_HUB_OFFLINE, ...)."""

    revision: str | None = None  # branch, tag or commit; None: the repository's default branch
    token: str | None = None  # sent as `Authorization: Bearer`; None: huggingface_hub's stored login, if any
    offline: bool = False  # HF_HUB_OFFLINE: the cache only, never the network
    cache_dir: Path | None = None  # None: huggingface_hub's default (HF_HUB_CACHE, HF_HOME)
    endpoint: str | None = None  # None: huggingface_hub's default (HF_ENDPOINT, else huggingface.co)
    progress: bool = True


def is_hub_id(model_id: str | None) -> bool:
    """`org/name` (or a bare `name`) that is not a path on this machine."""
    return bool(model_id) and not Path(model_id).expanduser().exists() and HUB_ID.match(model_id) is not None


def fetch(model_id: str, options: HubOptions) -> Path:
    """The local snapshot folder of hub id `model_id` at `options.revision`, downloaded if needed."""
    at = f" at revision {options.revision!r}" if options.revision else ""
    cache = options.cache_dir or _default_cache()
    if options.offline or (options.revision and COMMIT.match(options.revision)):
        try:  # a commit never changes: a complete cached copy of one is that commit
            cached = _cached(model_id, options.revision, options.cache_dir)
        except ModelNotFoundError:
            if options.offline:
                raise
            cached = None
        if cached is not None:
            return _remember(model_id, cached)
        if options.offline:
            raise ModelNotFoundError(f"model {model_id!r}{at} is not in the Hugging Face cache ({cache}) and "
                                     "HF_HUB_OFFLINE is set, so nothing is downloaded: fetch it where the Hub is "
                                     f"reachable (`hf download {model_id}`), or unset HF_HUB_OFFLINE")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = options.endpoint or "the Hugging Face Hub"
    try:
        folder = _download(model_id, options)
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"{model_id} on {where} is gated: accept its terms on the model's page and set "
                                 f"HF_TOKEN to a token of that account ({exc})") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{model_id} on {where} has no revision {options.revision!r} ({exc})") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{model_id} is neither a local path nor a model on {where} (a private "
                                 f"repository needs HF_TOKEN) ({exc})") from exc
    except _transport_errors() as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelNotFoundError(f"{where} refused access to {model_id} (HTTP {status}): HF_TOKEN is missing "
                                     "or does not grant access to it") from exc
        cached = _cached(model_id, options.revision, options.cache_dir)  # network down, Hub failing
        if cached is None:
            raise ModelNotFoundError(f"could not download {model_id}{at} from {where} ({exc}), and it is not in "
                                     f"the Hugging Face cache ({cache})") from exc
        logger.warning("could not reach %s (%r): serving %s from the cache, %s", where, exc, model_id, cached)
        return _remember(model_id, cached)
    return _remember(model_id, _check_complete(folder, model_id))


def resolve_hub_id(model_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """The cached snapshot folder of hub id `model_id`; never touches the network."""
    if revision is None and model_id in _fetched:
        return _fetched[model_id]
    if not HUB_ID.match(model_id):
        raise ModelNotFoundError(f"{model_id!r} is not an existing path, and not a hub id of the form org/name")
    cached = _cached(model_id, revision, cache_dir)
    if cached is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFoundError(f"model {model_id!r}{at} is neither a local path nor in the Hugging Face cache "
                                 f"({cache_dir or _default_cache()}); `tokenmill serve --model-id {model_id}` "
                                 "downloads it")
    return cached


def _download(model_id: str, options: HubOptions) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi(endpoint=options.endpoint, token=options.token).model_info(model_id, revision=options.revision)
    files = _files_to_fetch(model_id, [s.rfilename for s in info.siblings or ()], info.sha, options)
    logger.info("fetching %s at %s (commit %s): %s", model_id, options.revision or "its default branch", info.sha,
                ", ".join(files))
    return Path(snapshot_download(model_id, revision=options.revision, allow_patterns=files, token=options.token,
                                  cache_dir=options.cache_dir, endpoint=options.endpoint,
                                  tqdm_class=_bar_class(options.progress)))


def _cached(model_id: str, revision: str | None, cache_dir: Path | None) -> Path | None:
    """The complete cached snapshot, or None when there is none (ModelNotFoundError for an incomplete one)."""
    from huggingface_hub import errors, snapshot_download

    # huggingface_hub 2 checks a cached snapshot against the whole repository's file list; tokenmill fetches
    # only the files it reads, so that check is replaced by `_check_complete` on those files.
    incomplete = getattr(errors, "IncompleteSnapshotError", ())
    try:
        try:
            folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except incomplete as exc:
            folder = Path(exc.snapshot_path)
    except (errors.LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return _check_complete(folder, model_id)


def _files_to_fetch(model_id: str, files: list[str], sha: str | None, options: HubOptions) -> list[str]:
    """The files tokenmill reads, from the repository's listing (top-level files only)."""
    top = [f for f in files if "/" not in f]
    wanted = [f for f in METADATA if f in top]
    if INDEX in top:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(model_id, INDEX, revision=sha, token=options.token, cache_dir=options.cache_dir,
                                endpoint=options.endpoint)
        return wanted + sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    if safetensors:
        return wanted + (["model.safetensors"] if "model.safetensors" in safetensors else safetensors)
    ggufs = sorted(f for f in top if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return ggufs  # config and tokenizer come from the GGUF's metadata
    if ggufs:
        raise UnsupportedCheckpointError(
            f"{model_id} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): download the one you want "
            f"(`hf download {model_id} FILE`) and pass its path as --model-id")
    raise UnsupportedCheckpointError(f"{model_id} has no .safetensors or .gguf weights (tokenmill reads no "
                                     f"pickled .bin/.pt checkpoints); its files: {', '.join(top) or 'none'}")


def _check_complete(folder: Path, model_id: str) -> Path:
    """A snapshot tokenmill can load: one GGUF file, or a config with the safetensors shards (all that the
    index names, when there is one)."""
    if not (folder / "config.json").exists() and len(list(folder.glob("*.gguf"))) == 1:
        return folder
    missing = [] if (folder / "config.json").exists() else ["config.json"]
    if (folder / INDEX).exists():
        shards = set(json.loads((folder / INDEX).read_text())["weight_map"].values())
        missing += sorted(s for s in shards if not (folder / s).exists())
    elif not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelNotFoundError(f"the cached snapshot of {model_id} in {folder} lacks {', '.join(missing)} (an "
                                 "interrupted download?): start again where the Hub is reachable to complete it")
    return folder


def _remember(model_id: str, folder: Path) -> Path:
    _fetched[model_id] = folder
    return folder


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: OSError (huggingface_hub's HTTP errors, requests' errors) and the
    errors of the httpx family that huggingface_hub 1 and 2 use."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _bar_class(progress: bool) -> type[tqdm]:
    """Plain tqdm bars, shown in container logs too (huggingface_hub's own hide themselves off a terminal)."""

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = kwargs.get("disable") or not progress
            kwargs.setdefault("mininterval", 1.0)
            super().__init__(*args, **kwargs)

    return DownloadBar
