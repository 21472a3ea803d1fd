"""Publishing to the Hugging Face Hub: one commit per version, a tag, never twice.

Every file of a version goes up in one `create_commit` (explicit operations, so the
repo is never half-updated; `upload_folder` may split large folders into several
commits). The commit names the branch head it was built on (`parent_commit`), so a
concurrent publish makes it fail instead of interleaving. Then a tag (`v{N}`, N
continuing from the repo's tags) on that commit.

Before committing, the repo's current `lineage.json` is read: when its UNet sha256
is ours, nothing is committed and the existing commit (and its tag, created if a lost
response left it missing) is reported. Each retry repeats that check, so a commit
whose response was lost is never made twice.

429, 5xx and connection errors are retried with exponential backoff and jitter;
401/403 are not (the token cannot write). Every failure is one line naming the repo,
the operation and the HTTP status; the token never appears in it.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from components.common.config import PublishConfig
from components.common.errors import ConfigError, T2IError, first_line
from components.common.models import hub_offline
from components.common.records import LINEAGE, HubPublication

T = TypeVar("T")
_RETRIED = {408, 409, 412, 425, 429, 500, 502, 503, 504}  # 409/412: the branch moved under us


def hub_token() -> str:
    """The token where `huggingface_hub` looks (HF_TOKEN, the `hf auth login` file).
    ConfigError when publishing to the Hub is impossible here (offline, no token)."""
    if hub_offline():
        raise ConfigError(
            "publish.target needs the Hugging Face Hub but HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE (or set publish.target: local)"
        )
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError(
            "publish.target needs a Hugging Face token with write access: set HF_TOKEN "
            "or run `hf auth login` (on Kubernetes, mount a secret as HF_TOKEN)"
        )
    return token


def publish_hub(
    cfg: PublishConfig,
    files: dict[str, Path],
    unet_sha256: str,
    documents: Callable[[int], dict[str, bytes]],
    token: str,
) -> HubPublication:
    """Commit `files` ({path in repo: local file}) plus `documents(version)` ({path:
    bytes}: the card and lineage.json, which name the version) to `cfg.hub_model_id`.

    Raises T2IError (one line) when the Hub refuses or stays unreachable."""
    from huggingface_hub import HfApi

    repo = cfg.hub_model_id
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    call = _Caller(cfg, repo, token)
    call("create the repo", lambda: api.create_repo(repo, private=cfg.private, exist_ok=True))
    result = call("commit", lambda: _commit_once(api, cfg, files, unet_sha256, documents))
    if result.tag is None:  # the commit's tag could not be made in _commit_once's call
        tag = cfg.tag_format.format(version=result.version)
        call("create the tag", lambda: _ensure_tag(api, repo, tag, result.commit))
        result = result.model_copy(update={"tag": tag})
    return result


def _commit_once(api, cfg, files, unet_sha256, documents) -> HubPublication:
    """One attempt: reuse the version holding this UNet, or commit the next one."""
    from huggingface_hub import CommitOperationAdd

    repo = cfg.hub_model_id
    refs = api.list_repo_refs(repo)
    head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
    tags = {t.name: t.target_commit for t in refs.tags}
    url = f"{api.endpoint}/{repo}"
    current = read_lineage(api, repo, head) if head else None
    if current and current.get("unet_sha256") == unet_sha256:
        # The version it was published as (a lost response may have left it untagged).
        version = int((current.get("published_as") or {}).get("version") or 0)
        version = version or _next_version(cfg, tags)
        tag = cfg.tag_format.format(version=version)
        have_tag = tags.get(tag) == head
        return HubPublication(
            repo_id=repo,
            url=url,
            commit=head,
            tag=tag if have_tag else None,
            version=version,
            new=False,
        )
    version = _next_version(cfg, tags)
    docs = documents(version)
    _validate_card(repo, docs["README.md"].decode())
    operations = [CommitOperationAdd(p, str(f)) for p, f in sorted(files.items())]
    operations += [CommitOperationAdd(p, data) for p, data in docs.items()]
    info = api.create_commit(
        repo,
        operations,
        commit_message=f"{cfg.name} v{version}",
        commit_description="Published by t2i-pipeline: model, card, lineage and evaluation.",
        parent_commit=head,
    )
    return HubPublication(
        repo_id=repo, url=url, commit=info.oid, tag=None, version=version, new=True
    )


def _validate_card(repo: str, card: str) -> None:
    """The Hub's own check of the card's metadata, before anything is uploaded."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(card).validate()
    except ValueError as e:  # 400: the metadata breaks the Hub's rules
        raise T2IError(f"{repo}: the Hub rejects the model card's metadata: {e}") from None


def read_lineage(api, repo: str, revision: str) -> dict[str, Any] | None:
    """The repo's `lineage.json` at `revision`, or None (not a t2i-pipeline repo yet)."""
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory() as cache:
        try:
            path = api.hf_hub_download(repo, LINEAGE, revision=revision, cache_dir=cache)
        except EntryNotFoundError:
            return None
        try:
            return json.loads(Path(path).read_text())
        except ValueError:
            return None


def _next_version(cfg: PublishConfig, tags: dict[str, str]) -> int:
    prefix, suffix = cfg.tag_format.split("{version}")
    pattern = re.compile(f"^{re.escape(prefix)}(\\d+){re.escape(suffix)}$")
    found = [int(m.group(1)) for t in tags if (m := pattern.match(t))]
    return max(found, default=0) + 1


def _ensure_tag(api, repo: str, tag: str, commit: str) -> None:
    """Tag `commit`; a tag already there on the same commit is fine."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo, tag=tag, revision=commit, tag_message=f"{tag} (t2i-pipeline)")
    except HfHubHTTPError as e:
        if _status(e) != 409:
            raise
        existing = {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}
        if existing.get(tag) != commit:
            raise T2IError(
                f"{repo}: tag {tag!r} already exists on another commit; "
                "delete it or change publish.tag_format"
            ) from None


class _Caller:
    """Runs one Hub operation with the retry policy and one-line failures."""

    def __init__(self, cfg: PublishConfig, repo: str, token: str):
        self.cfg, self.repo, self.token = cfg, repo, token

    def __call__(self, operation: str, fn: Callable[[], T]) -> T:
        from httpx2 import TransportError
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        attempts = self.cfg.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except RepositoryNotFoundError as e:  # the Hub hides repos a token cannot see
                raise self._no_access(operation, _status(e) or 404) from e
            except HfHubHTTPError as e:
                status = _status(e)
                if status in (401, 403):
                    raise self._no_access(operation, status) from e
                if status not in _RETRIED or attempt == attempts:
                    raise self._failed(operation, f"HTTP {status}", attempt, e) from e
            except (TransportError, ConnectionError) as e:
                if attempt == attempts:
                    raise self._failed(operation, type(e).__name__, attempt, e) from e
            delay = self.cfg.retry_backoff_s * 2 ** (attempt - 1)
            time.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _no_access(self, operation: str, status: int) -> T2IError:
        return T2IError(
            f"publish.hub_model_id {self.repo!r}: the token has no write access "
            f"(HTTP {status} to {operation}); use a token with write permission for it "
            "(HF_TOKEN or `hf auth login`)"
        )

    def _failed(self, operation: str, what: str, attempts: int, err: Exception) -> T2IError:
        detail = first_line(getattr(err, "server_message", None) or "", 200)
        detail = detail.replace(self.token, "***") if detail else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return T2IError(
            f"{self.repo}: could not {operation} on the Hub ({what}{tries})"
            + (f": {detail}" if detail else "")
        )


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)
