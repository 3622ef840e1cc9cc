"""Share: an adapter (or the merged model) on the Hugging Face Hub, with a model card the Hub understands.

The folder to upload is staged first and is exactly what the Hub receives (`--dry-run` stops there). The
token comes from `HF_TOKEN` or the huggingface_hub login and goes only into request headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftune import modeling, rundir
from peftune.card import hub_place, model_card
from peftune.data import Labels
from peftune.errors import PeftuneError, first_line
from peftune.methods import METHODS
from peftune.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    folder: Path  # the staged folder (kept for a dry run)
    files: list[tuple[str, int]]  # path in the repository, size in bytes
    url: str | None = None  # the commit, after a real push


def push(
    run_path: str | Path,
    repo_id: str,
    *,
    merged: bool = False,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model_id: str | None = None,
    license: str | None = None,
    output: str | Path | None = None,
    echo: Callable[[str], Any] = print,
) -> PushResult:
    """Stage the run's adapter (or merged model) with its card, then upload it unless `dry_run`."""
    check_repo_id(repo_id)
    run = rundir.complete_run(run_path)
    if dry_run:
        folder = Path(output) if output else run.path / (rundir.HUB_UPLOAD_DIR + ("-merged" if merged else ""))
        stage(run, folder, repo_id, merged=merged, base_model_id=base_model_id, license=license, echo=echo)
        return PushResult(folder, _listing(folder))
    api, token = _client()
    with _hub_errors(api, token, repo_id):  # a bad token or no network stops the push before any work
        api.whoami(token=token)
    with tempfile.TemporaryDirectory(prefix="peftune-push-") as tmp:
        folder = Path(tmp) / "upload"
        stage(run, folder, repo_id, merged=merged, base_model_id=base_model_id, license=license, echo=echo)
        files = _listing(folder)
        url = _upload(api, token, folder, repo_id, private, revision, commit_message or f"Upload {run.path.name}")
    return PushResult(folder, files, url)


def stage(
    run: rundir.RunDir,
    folder: Path,
    repo_id: str,
    *,
    merged: bool = False,
    base_model_id: str | None = None,
    license: str | None = None,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Write the folder to upload: the weights, the tokenizer, the run's records and README.md."""
    recipe = load_recipe(str(run.recipe_file))
    method = METHODS[recipe.method]
    base_id = hub_base_model(recipe, base_model_id, echo)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if not method.is_adapter:
        weights, library = run.weights_dir(is_adapter=False), "transformers"
    elif merged:
        weights, library = run.merged_dir, "transformers"
    else:
        weights, library = run.weights_dir(is_adapter=True), "peft"
    with tempfile.TemporaryDirectory(prefix="peftune-merge-") as scratch:
        if merged and not (weights / rundir.MERGE_FILE).is_file():  # not merged yet: merged here, the run untouched
            from peftune.merge import merge_adapter

            weights = merge_adapter(run.path, output=Path(scratch) / "merged")
        for file in sorted(weights.iterdir()):
            if file.is_file() and file.name != rundir.CARD_FILE:
                shutil.copyfile(file, folder / file.name)
    rundir.copy_records(run.path, folder, (*rundir.RECORDS, rundir.METRICS_FILE))
    if (folder / rundir.ADAPTER_CONFIG).is_file():  # the Hub copy names the base by its Hub id
        config = json.loads((folder / rundir.ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_id or config["base_model_name_or_path"]
        (folder / rundir.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    labels = Labels.read(run.labels_file)
    card = model_card(recipe, run.read_metrics(), labels, hub_place(repo_id), library, base_id, license)
    (folder / rundir.CARD_FILE).write_text(card, encoding="utf-8")
    return folder


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PeftuneError(f"--repo-id {repo_id!r} is not a valid repository id ({first_line(err)})") from None
    if repo_id.count("/") != 1:
        raise PeftuneError(f"--repo-id {repo_id!r} needs a namespace: write it as NAMESPACE/NAME (your user or org)")


def hub_base_model(recipe: Recipe, given: str | None, echo: Callable[[str], Any]) -> str | None:
    """The base model as a Hub id: the recipe's, or `--base-model-id` when the base was a local folder."""
    if given:
        check_repo_id(given)
        return given
    name = modeling.hub_id(recipe.model)
    if name is None:
        echo(
            f"warning: the base model was loaded from {recipe.model.name_or_path}, not a Hub id; the card leaves "
            "base_model out (pass --base-model-id ORG/NAME to name it)"
        )
    return name


def _listing(folder: Path) -> list[tuple[str, int]]:
    return [(str(f.relative_to(folder)), f.stat().st_size) for f in sorted(folder.rglob("*")) if f.is_file()]


def _client() -> tuple[Any, str]:
    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PeftuneError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (or use --dry-run)")
    token = get_token()
    if not token:
        raise PeftuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or constants.ENDPOINT), token


def _upload(api: Any, token: str, folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> str:
    """Create the repository (and branch) when missing, and commit the folder; return the commit URL."""
    with _hub_errors(api, token, repo_id):
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, token=token, revision=revision, commit_message=message
        )
    return str(info.commit_url)


@contextlib.contextmanager
def _hub_errors(api: Any, token: str, repo_id: str) -> Iterator[None]:
    """The Hub client's errors as one line that says what to do (and never shows the token)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:  # the HTTP client huggingface_hub uses: httpx2 from huggingface_hub 2, httpx before
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError  # type: ignore[no-redef]
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PeftuneError(
                "the Hub rejected the token (HF_TOKEN or the stored login); create a token with write access "
                "at https://huggingface.co/settings/tokens"
            ) from None
        if status == 403:
            raise PeftuneError(
                f"the token may not write to {repo_id}; use a namespace you own, or a token with write access"
            ) from None
        raise PeftuneError(f"the Hub refused the upload to {repo_id} ({_redact(first_line(err), token)})") from None
    except (TransportError, OSError) as err:  # no connection, DNS, timeouts
        raise PeftuneError(_unreachable(api.endpoint, err, token)) from None
    except ValueError as err:  # the client's own checks, e.g. of the card's metadata
        raise PeftuneError(f"cannot push to {repo_id}: {_redact(first_line(err), token)}") from None


def _unreachable(endpoint: str, err: BaseException, token: str) -> str:
    return (
        f"cannot reach the Hub at {endpoint} ({_redact(first_line(err), token)}); "
        "check the network connection, or HF_ENDPOINT"
    )


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
