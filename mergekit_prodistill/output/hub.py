"""Publishing a finished merge to the Hugging Face Hub.

Only the files the merge wrote go up: ``prodistill_report.json`` lists them. The staging
folder, hidden working files and anything else a user keeps in the output folder stay
local. Weight shards of an earlier upload that the new merge no longer has are deleted in
the same commit, as a local re-merge replaces them.

The token comes from huggingface_hub's usual places: ``HF_TOKEN``, then the login saved
by ``hf auth login``. What can be checked without the network (the repo id, offline mode,
a token) is checked before the merge starts; a failure of the upload itself leaves the
merged folder complete and says how to retry:

    python -m mergekit_prodistill.output.hub ./merged user/model [--private] [--revision BRANCH]
"""

import argparse
import glob
import os
import shlex
from typing import List, Optional

from mergekit_prodistill.errors import ProDistillError, exit_with, one_line
from mergekit_prodistill.layout import REPORT, STAGING, WEIGHT_PREFIXES
from mergekit_prodistill.output.report import Report

NEVER_UPLOADED = (f"{STAGING}/**", ".*", "**/.*")


def check_ready(repo_id: str) -> None:
    """Fail now, not after hours of merging, on what needs no network to know."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ProDistillError(f"--push-to-hub: '{repo_id}' is not a valid repo id: {exc}") from None
    if constants.is_offline_mode():
        raise ProDistillError(
            "--push-to-hub: offline mode is enabled (HF_HUB_OFFLINE); unset it to upload"
        )
    if get_token() is None:
        raise ProDistillError(
            "--push-to-hub: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
        )


def finished_files(folder: str) -> List[str]:
    """The files of the finished merge in ``folder``, as its report lists them."""
    try:
        files = Report.read(folder).files
    except (OSError, ValueError):
        files = None
    if files is None:
        raise ProDistillError(
            f"{folder} holds no finished mergekit-prodistill merge (no readable {REPORT} "
            "listing its files)"
        )
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ProDistillError(f"{folder} is incomplete: {', '.join(missing[:3])} missing")
    return files


def push(folder: str, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         api=None) -> str:
    """Upload the finished merge in ``folder`` to the model repo ``repo_id``; return its URL."""
    from huggingface_hub import HfApi

    files = finished_files(folder)
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            revision=revision,
            allow_patterns=[glob.escape(name) for name in files],
            ignore_patterns=list(NEVER_UPLOADED),  # upload_folder extends the list it gets
            delete_patterns=[prefix + "*" for prefix in WEIGHT_PREFIXES],
            commit_message="Upload ProDistill merge",
        )
    except Exception as exc:  # the network boundary: whatever failed, nothing is lost
        retry = shlex.join(["python", "-m", "mergekit_prodistill.output.hub", folder, repo_id,
                            *(["--private"] if private else []),
                            *(["--revision", revision] if revision else [])])
        raise ProDistillError(
            f"upload to {repo_id} failed: {failure_reason(exc)}; the merged model in {folder} "
            f"is complete, retry with: {retry}"
        ) from None
    return str(url)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a Hub call failed, in the terms a user can act on."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is enabled (HF_HUB_OFFLINE)"
    if isinstance(exc, LocalTokenNotFoundError):
        return "no Hugging Face token (log in with `hf auth login` or set HF_TOKEN)"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return "the token was refused (HTTP 401); log in again with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return "the token may not write to this repo (HTTP 403); use a token with write access"
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return f"the Hugging Face Hub cannot be reached ({one_line(exc)})"
    return one_line(exc)



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mergekit_prodistill.output.hub",
        description="Upload a finished mergekit-prodistill merge to the Hugging Face Hub.",
    )
    parser.add_argument("folder", help="the merge's output folder")
    parser.add_argument("repo_id", help="the model repo, e.g. user/my-merge")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="the branch to upload to (created if missing)")
    args = parser.parse_args(argv)
    try:
        check_ready(args.repo_id)
        url = push(args.folder, args.repo_id, private=args.private, revision=args.revision)
    except ProDistillError as exc:
        exit_with(exc)
    print(f"uploaded {args.folder} to {url}")


if __name__ == "__main__":
    main()
