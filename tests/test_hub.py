"""Publishing, tested up to the network boundary: what would go up, and clean failures."""

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading

import pytest
import transformers
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from mergekit_prodistill import cli
from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.output import hub

from helpers import BIN, merge

REPO = "someuser/tiny-prodistill"


@pytest.fixture(scope="module")
def finished(families, tmp_path_factory):
    fam = families("llama", 2)
    out = tmp_path_factory.mktemp("hub") / "merged"
    return merge(fam.recipe("prodistill", epochs=1, shots=8), out, out_shard_size=40_000)


@pytest.fixture
def folder(finished, tmp_path):
    """A copy of the merge with things beside it that must never be uploaded."""
    out = tmp_path / "merged"
    shutil.copytree(finished, out)
    (out / ".prodistill-staging").mkdir()
    (out / ".prodistill-staging" / "activations.pt").write_bytes(b"\0" * 64)
    (out / ".cache").mkdir()
    (out / ".cache" / "z1.bin").write_bytes(b"\0" * 64)
    (out / "my-notes.txt").write_text("private notes\n")
    return out


@pytest.fixture
def online(monkeypatch):
    """A token and no offline mode; any real request still fails (there is no network)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


def local_files(folder):
    return sorted(
        os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder) for n in names
    )


def digest(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in local_files(folder)}


def test_push_uploads_the_finished_files_only(folder, online, monkeypatch):
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault(
        "create_repo", (repo_id, kw)) and f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.setdefault(
        "create_branch", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault(
        "upload_folder", kw))

    hub.main([str(folder), REPO, "--private", "--revision", "prodistill-v1"])

    assert calls["create_repo"] == (REPO, {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["create_branch"] == (
        REPO, {"branch": "prodistill-v1", "repo_type": "model", "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == REPO and upload["revision"] == "prodistill-v1"
    assert upload["folder_path"] == str(folder)

    # What upload_folder would send: its own filtering, applied to this folder.
    sent = set(filter_repo_objects(
        local_files(folder), allow_patterns=upload["allow_patterns"],
        ignore_patterns=[*upload["ignore_patterns"], *DEFAULT_IGNORE_PATTERNS]))
    report = json.loads((folder / "prodistill_report.json").read_text())
    assert sent == set(report["files"])
    assert {"README.md", "prodistill_loss.png", "config.json", "model.safetensors.index.json",
            "prodistill_report.json", "mergekit_config.yml", "tokenizer.json"} <= sent
    assert len([f for f in sent if f.startswith("model-")]) > 1
    assert not sent & {".prodistill-staging/activations.pt", ".cache/z1.bin", "my-notes.txt"}

    # Stale shards of an earlier upload go; everything else on the Hub stays.
    remote = ["model-00001-of-00009.safetensors", "model.safetensors.index.json",
              "README.md", "notes.md", ".gitattributes"]
    deleted = set(filter_repo_objects(remote, allow_patterns=upload["delete_patterns"])) - sent
    assert deleted == {"model-00001-of-00009.safetensors"}

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "prodistill" in card.data.tags


def serve(status, body):
    class Handler(http.server.BaseHTTPRequestHandler):
        def respond(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        do_GET = do_POST = do_PUT = respond

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_refused_token_is_one_line_and_keeps_the_merge(folder, online):
    before = digest(folder)
    server = serve(401, {"error": "Invalid credentials in Authorization header"})
    try:
        api = HfApi(endpoint=f"http://127.0.0.1:{server.server_port}", token="hf_bad")
        with pytest.raises(ProDistillError) as err:
            hub.push(str(folder), REPO, api=api)
    finally:
        server.shutdown()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"upload to {REPO} failed: the token was refused (HTTP 401)")
    assert message.endswith(f"retry with: python -m mergekit_prodistill.output.hub {folder} {REPO}")
    assert digest(folder) == before


def test_push_refuses_a_folder_that_is_not_a_finished_merge(tmp_path, finished):
    with pytest.raises(ProDistillError, match="holds no finished mergekit-prodistill merge"):
        hub.push(str(tmp_path), REPO)
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / "README.md").unlink()
    with pytest.raises(ProDistillError, match="is incomplete: README.md missing"):
        hub.push(str(broken), REPO)


@pytest.mark.parametrize("args,setup,error", [
    (["--push-to-hub", "not a repo"], None, "--push-to-hub: 'not a repo' is not a valid repo id"),
    (["--push-to-hub", REPO], "offline", "--push-to-hub: offline mode is enabled (HF_HUB_OFFLINE)"),
    (["--push-to-hub", REPO], "no-token", "--push-to-hub: no Hugging Face token; log in with"),
    (["--private"], None, "--private and --revision apply to --push-to-hub REPO_ID"),
])
def test_publishing_problems_stop_the_command_before_the_merge(
        families, tmp_path, monkeypatch, args, setup, error):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", setup == "offline")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    if setup == "no-token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(families("llama", 2).recipe("prodistill", epochs=1, shots=4))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, [str(recipe), str(out), *args])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("mergekit-prodistill: error: ") and error in line
    assert not out.exists()


def test_unreachable_hub_after_the_merge_keeps_the_merged_model(families, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(families("llama", 2).recipe("prodistill", epochs=1, shots=4))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="1", HF_TOKEN="hf_test",
               HF_ENDPOINT=f"http://127.0.0.1:{port}")
    proc = subprocess.run([str(BIN / "mergekit-prodistill"), str(recipe), str(out), "--quiet",
                           "--push-to-hub", REPO], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mergekit-prodistill:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"mergekit-prodistill: error: upload to {REPO} failed: the "
                                "Hugging Face Hub cannot be reached")
    assert hub.finished_files(str(out))  # complete, as the report lists it
    transformers.AutoModelForCausalLM.from_pretrained(out)
