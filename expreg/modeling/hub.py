"""Share a run's best model on the HuggingFace Hub (weights, config with gene names, model card).

    python -m expreg.hub results/<run> --hub_model_id org/name     # push (or retry a failed push)

Training pushes by itself with ``train.push_to_hub=true train.hub_model_id=org/name`` (or
``--push_to_hub``). Without network access the push fails at once with a clear message; the
run itself is complete and kept either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("expreg")


class HubError(RuntimeError):
    """Pushing to the Hub failed (no network, offline mode, no permission, ...)."""


def push_best_model(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload ``run_dir/checkpoints/best`` (model, config, README model card) to ``repo_id``.

    Returns:
        The URL of the commit.

    Raises:
        HubError: With the reason and how to retry.
    """
    best = Path(run_dir) / "checkpoints" / "best"
    if not (best / "config.json").is_file():
        raise HubError(f"{best}: no saved best model to push")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(best), repo_id=repo_id, commit_message=f"expreg run {Path(run_dir).name}"
        )
    except Exception as err:  # noqa: BLE001 - offline mode, connection errors, HTTP errors, auth
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HubError(
            f"pushing {best} to the Hub as {repo_id!r} failed ({type(err).__name__}: {reason}). The run is complete "
            f"and kept; retry with network access and a token (huggingface-cli login): "
            f"python -m expreg.hub {run_dir} --hub_model_id {repo_id}"
        ) from err
    return str(getattr(commit, "commit_url", commit))


def push_and_record(run_dir: Path, repo_id: str, result: dict) -> HubError | None:
    """Push the best model at the end of a run; record the outcome in ``result`` and return the error, if any."""
    try:
        url = push_best_model(run_dir, repo_id)
    except HubError as err:
        logger.error(str(err))
        result["push_to_hub"] = {"repo_id": repo_id, "ok": False, "error": str(err)}
        return err
    logger.info(f"pushed the best model to {url}")
    result["push_to_hub"] = {"repo_id": repo_id, "ok": True, "url": url}
    return None
