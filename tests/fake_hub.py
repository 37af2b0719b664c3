"""A fake Hugging Face Hub on 127.0.0.1, so push-to-hub tests never contact huggingface.co.

It speaks just enough of the Hub HTTP API for huggingface_hub's whoami, create_repo and
upload_folder: the preupload endpoint answers "regular" for every file, so file contents arrive
base64-encoded inside the commit's NDJSON body and no LFS/Xet storage is needed. What it saw is
kept in memory (repos, files per repo, every request) for tests to assert on.

Failure switches: `reject_tokens` (401 on everything), `fail_commits` (an HTTP status for every
commit), `stop()` (the port then refuses connections).
"""
import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

USER = "fake-user"
ORGS = ("fake-org",)
REPO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(preupload|commit)/([^/?]+))?")


class FakeHub:
    def __init__(self):
        self.repos = {}  # repo_id -> {path: bytes}, files as of the last commit
        self.commits = []  # (repo_id, summary) of each accepted commit
        self.requests = []  # (method, path) of every request, handled or not
        self.commit_attempts = 0
        self.reject_tokens = False
        self.fail_commits = None  # e.g. 500
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        """Close the listening socket: later requests get 'connection refused'."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()

    def _handler(hub):  # noqa: N805 -- `hub` is the FakeHub; `self` is the request handler below
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def reply(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def route(self, method):
                hub.requests.append((method, self.path))
                body = self.body() if method == "POST" else b""
                if hub.reject_tokens or not self.headers.get("Authorization", "").startswith("Bearer "):
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                if method == "GET" and self.path == "/api/whoami-v2":
                    return self.reply(200, {"type": "user", "name": USER, "orgs": [{"name": o} for o in ORGS]})
                if method == "POST" and self.path == "/api/repos/create":
                    return self.create(json.loads(body))
                if method == "POST" and self.path == "/api/validate-yaml":
                    return self.reply(200, {})
                m = REPO.match(self.path)
                if not m or m.group(1) not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo_id, action = m.group(1), m.group(2)
                if method == "GET" and action is None:  # repo_info
                    return self.reply(200, {"id": repo_id, "sha": "0" * 40, "siblings": []})
                if method == "POST" and action == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if method == "POST" and action == "commit":
                    return self.commit(repo_id, body)
                return self.reply(404, {"error": f"fake hub: no route for {method} {self.path}"})

            def create(self, payload):
                namespace = payload.get("organization") or USER
                repo_id = f"{namespace}/{payload['name']}"
                if namespace != USER and namespace not in ORGS:
                    return self.reply(403, {"error": f"You don't have the rights to create a model under the "
                                                     f"namespace \"{namespace}\""})
                url = f"{hub.endpoint}/{repo_id}"
                if repo_id in hub.repos:
                    return self.reply(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = {}
                return self.reply(200, {"url": url, "name": repo_id})

            def commit(self, repo_id, body):
                hub.commit_attempts += 1
                if hub.fail_commits:
                    return self.reply(hub.fail_commits, {"error": "fake hub: commit failed on purpose"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = dict(hub.repos[repo_id])
                for line in lines:
                    if line["key"] == "file":
                        assert line["value"]["encoding"] == "base64"
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] != "header":  # lfsFile, deletedFile...: not expected here
                        return self.reply(400, {"error": f"fake hub: unsupported commit line {line['key']}"})
                hub.repos[repo_id] = files
                hub.commits.append((repo_id, lines[0]["value"]["summary"]))
                oid = f"{len(hub.commits):040x}"
                return self.reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})

        return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    """A running FakeHub that huggingface_hub in this process talks to (and a subprocess, via HF_ENDPOINT).

    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, into huggingface_hub.constants;
    HfApi() copies constants.ENDPOINT when it is created (the module-level `huggingface_hub.create_repo`
    etc. are bound to an HfApi made at import, hence dreambooth.hub makes its own HfApi per call).
    """
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.stop()
