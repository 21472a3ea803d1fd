"""A small Hugging Face Hub on 127.0.0.1 for tests: the endpoints `huggingface_hub`
calls to create a repo, upload (preupload, LFS batch + PUT, commit), list refs, tag,
read repo info, resolve files and validate card YAML. It keeps repos in memory,
checks tokens (write, read-only, unknown), records every request, and can fail chosen
requests once with a given status. The client's Xet transfer path is not spoken:
tests set HF_HUB_DISABLE_XET=1 so the client uses the LFS protocol.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

# A few of the Hub's license ids (the real list is longer); enough to check ours.
LICENSES = {"apache-2.0", "mit", "openrail", "creativeml-openrail-m", "openrail++", "other"}


@dataclass
class Repo:
    private: bool
    commits: list[dict] = field(default_factory=list)  # {"oid", "files": {path: bytes}}
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> dict:
        return self.commits[-1]

    def commit(self, files: dict[str, bytes], message: str) -> str:
        oid = hashlib.sha1(f"{len(self.commits)}:{message}:{sorted(files)}".encode()).hexdigest()
        self.commits.append({"oid": oid, "files": files, "message": message})
        return oid

    def at(self, revision: str) -> dict | None:
        if revision == "main":
            return self.head
        if revision in self.tags:
            revision = self.tags[revision]
        return next((c for c in self.commits if c["oid"] == revision), None)


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> "write" | "read"
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.failures: list[tuple[str, re.Pattern, int]] = []  # (method, path, status)
        self.lost: list[tuple[str, re.Pattern]] = []
        self.lock = threading.Lock()

    def fail_once(self, method: str, path_pattern: str, status: int) -> None:
        """The next matching request fails with `status` and changes nothing."""
        self.failures.append((method, re.compile(path_pattern), status))

    def lose_response_once(self, method: str, path_pattern: str) -> None:
        """The next matching request takes effect, but its answer is a 503."""
        self.lost.append((method, re.compile(path_pattern)))

    def commits(self, repo_id: str) -> list[dict]:
        return self.repos[repo_id].commits[1:]  # after the repo's initial commit


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head=False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(
            status,
            json.dumps(obj).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def _error(self, status: int, message: str, code: str | None = None, head=False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": message}).encode()
        self._send(status, b"" if head else body, {"Content-Type": "application/json", **headers})

    def _access(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        return self.state.tokens.get(token) if token else None

    def _handle(self, method: str):
        body = b"" if method in ("GET", "HEAD") else self._body()
        path = self.path.split("?")[0]
        with self.state.lock:
            self.state.requests.append({"method": method, "path": self.path})
            for i, (m, pattern, status) in enumerate(self.state.failures):
                if m == method and pattern.search(path):
                    del self.state.failures[i]
                    self.state.requests[-1]["status"] = status
                    return self._error(status, "injected failure", head=method == "HEAD")
            lost = [i for i, (m, p) in enumerate(self.state.lost) if m == method and p.search(path)]
            if lost:
                del self.state.lost[lost[0]]
                real, self.wfile = self.wfile, io.BytesIO()
                try:
                    self._route(method, path, body)
                finally:
                    self.wfile = real
                self.state.requests[-1]["status"] = 503
                return self._error(503, "the response was lost")
            try:
                self._route(method, path, body)
            except Exception as e:  # a bug here should fail the test loudly, not hang it
                self._error(500, f"test hub error: {type(e).__name__}: {e}")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # -- routes ---------------------------------------------------------------------

    def _route(self, method: str, path: str, body: bytes):
        repo = r"(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", r"^/api/repos/create$", self.create_repo),
            ("POST", r"^/api/validate-yaml$", self.validate_yaml),
            ("GET", rf"^/api/models/{repo}/refs$", self.refs),
            ("GET", rf"^/api/models/{repo}(?:/revision/(?P<rev>[^/]+))?$", self.info),
            ("GET", rf"^/api/models/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self.tree),
            ("POST", rf"^/api/models/{repo}/preupload/(?P<rev>[^/]+)$", self.preupload),
            ("POST", rf"^/api/models/{repo}/commit/(?P<rev>[^/]+)$", self.commit),
            ("POST", rf"^/api/models/{repo}/tag/(?P<rev>[^/]+)$", self.tag),
            ("POST", rf"^/{repo}\.git/info/lfs/objects/batch$", self.lfs_batch),
            ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", self.lfs_put),
            ("GET", rf"^/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.resolve),
            ("HEAD", rf"^/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.resolve),
        ]
        # Dataset repos (hf://datasets/... sources): the same handlers, kept under
        # "datasets/<repo>" in the state.
        data = r"(?P<repo>[^/]+/[^/]+)"
        routes += [
            ("GET", rf"^/api/datasets/{data}(?:/revision/(?P<rev>[^/]+))?$", self.info),
            ("GET", rf"^/api/datasets/{data}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self.tree),
            ("POST", rf"^/api/datasets/{data}/paths-info/(?P<rev>[^/]+)$", self.paths_info),
            ("GET", rf"^/datasets/{data}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.resolve),
            ("HEAD", rf"^/datasets/{data}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self.resolve),
        ]
        for m, pattern, handler in routes:
            match = re.match(pattern, path)
            if m == method and match:
                found = match.groupdict()
                if "datasets/" in pattern:
                    found["repo"] = f"datasets/{found['repo']}"
                return handler(body=body, head=method == "HEAD", **found)
        self._error(404, f"no route {method} {path}")

    def _repo(self, repo: str, write: bool, head=False) -> Repo | None:
        access = self._access()
        found = self.state.repos.get(repo)
        if access is None and (found is None or found.private or write):
            self._error(401, "Invalid credentials", head=head)
            return None
        if found is None:
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        if write and access != "write":
            self._error(403, "You don't have the rights to write to this repo", head=head)
            return None
        return found

    def create_repo(self, body, head):
        access = self._access()
        if access is None:
            return self._error(401, "Invalid credentials")
        if access != "write":
            return self._error(403, "You don't have the rights to create a repo")
        req = json.loads(body)
        repo_id = f"{req['organization']}/{req['name']}"
        host = self.headers.get("Host")
        if repo_id in self.state.repos:  # as the Hub answers: the error and the repo's url
            return self._json(
                409,
                {"error": "You already created this model repo", "url": f"http://{host}/{repo_id}"},
            )
        repo = Repo(private=req.get("visibility", "public") != "public")
        repo.commit(
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init"
        )
        self.state.repos[repo_id] = repo
        self._json(200, {"url": f"http://{host}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body, head):
        req = json.loads(body)
        problems = validate_card_yaml(req.get("content", ""))
        if problems:
            return self._json(400, {"error": "; ".join(problems)})
        self._json(200, {"warnings": []})

    def refs(self, repo, body, head):
        r = self._repo(repo, write=False)
        if r is None:
            return
        self._json(
            200,
            {
                "branches": [
                    {"name": "main", "ref": "refs/heads/main", "targetCommit": r.head["oid"]}
                ],
                "tags": [
                    {"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid}
                    for t, oid in r.tags.items()
                ],
                "converts": [],
            },
        )

    def info(self, repo, body, head, rev=None):
        r = self._repo(repo, write=False)
        if r is None:
            return
        commit = r.at(rev or "main")
        if commit is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": commit["oid"],
                "private": r.private,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit["files"])],
            },
        )

    def _commit_at(self, repo: str, rev: str, head=False) -> dict | None:
        """The repo's commit at `rev`, or None after answering 401/403/404."""
        r = self._repo(repo, write=False, head=head)
        if r is None:
            return None
        commit = r.at(rev)
        if commit is None:
            self._error(404, "Revision not found", "RevisionNotFound", head=head)
        return commit

    def tree(self, repo, rev, body, head, sub=None):
        commit = self._commit_at(repo, rev)
        if commit is None:
            return
        entries = self._entries(commit)
        if sub:
            entries = [e for e in entries if e["path"].startswith(sub.rstrip("/") + "/")]
        self._json(200, entries)

    def _entries(self, commit: dict) -> list[dict]:
        entries, folders = [], set()
        for path, data in sorted(commit["files"].items()):
            parts = path.split("/")
            folders |= {"/".join(parts[:i]) for i in range(1, len(parts))}
            entry = {"type": "file", "path": path, "size": len(data)}
            entry["oid"] = hashlib.sha1(data).hexdigest()
            if _is_binary(path):
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        return entries + [
            {"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)
        ]

    def paths_info(self, repo, rev, body, head):
        commit = self._commit_at(repo, rev)
        if commit is None:
            return
        from urllib.parse import parse_qs

        wanted = parse_qs(body.decode()).get("paths", [])  # a form: paths=a&paths=b&expand=
        self._json(200, [e for e in self._entries(commit) if e["path"] in wanted])

    def preupload(self, repo, rev, body, head):
        if self._repo(repo, write=True) is None:
            return
        files = json.loads(body)["files"]
        self._json(
            200,
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if _is_binary(f["path"]) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
            },
        )

    def lfs_batch(self, repo, body, head):
        if self._repo(repo, write=True) is None:
            return
        host = self.headers.get("Host")
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid, body, head):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        self.state.lfs[oid] = body
        self._send(200)

    def commit(self, repo, rev, body, head):
        r = self._repo(repo, write=True)
        if r is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != r.head["oid"]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(r.head["files"])
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.state.lfs:
                    return self._error(422, f"LFS object {v['oid']} was never uploaded")
                files[v["path"]] = self.state.lfs[v["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(v["path"], None)
        if "README.md" in files:
            problems = validate_card_yaml(files["README.md"].decode())
            if problems:
                return self._error(400, "Invalid metadata in README.md: " + "; ".join(problems))
        oid = r.commit(files, header["summary"])
        host = self.headers.get("Host")
        self._json(200, {"commitOid": oid, "commitUrl": f"http://{host}/{repo}/commit/{oid}"})

    def tag(self, repo, rev, body, head):
        r = self._repo(repo, write=True)
        if r is None:
            return
        req = json.loads(body)
        commit = r.at(rev)
        if commit is None:
            return self._error(404, "Revision not found", "RevisionNotFound")
        if req["tag"] in r.tags:
            return self._error(409, f"Tag {req['tag']} already exists")
        r.tags[req["tag"]] = commit["oid"]
        self._json(200, {})

    def resolve(self, repo, rev, file, body, head):
        commit = self._commit_at(repo, rev, head=head)
        if commit is None:
            return
        data = commit["files"].get(file)
        if data is None:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        etag = (
            hashlib.sha256(data).hexdigest() if _is_binary(file) else hashlib.sha1(data).hexdigest()
        )
        headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{etag}"'}
        self._send(200, data, headers, head=head)  # HEAD: the same headers, no body


def _is_binary(path: str) -> bool:
    return path.endswith((".safetensors", ".png", ".bin", ".jpg"))


def validate_card_yaml(content: str) -> list[str]:
    """The checks the Hub's YAML validation makes that our cards could break."""
    match = re.match(r"^---\n(.*?)\n---", content, re.S)
    if not match:
        return ["no YAML metadata block"]
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"YAML does not parse: {e}"]
    problems = []
    lic = meta.get("license")
    if lic is not None and lic not in LICENSES:
        problems.append(f"license {lic!r} is not a known license id")
    base = meta.get("base_model")
    for b in [base] if isinstance(base, str) else base or []:
        if not re.match(r"^[\w.-]+/[\w.-]+$", str(b)):
            problems.append(f"base_model {b!r} is not a model id")
    if "base_model_relation" in meta and meta["base_model_relation"] not in (
        "adapter",
        "merge",
        "quantized",
        "finetune",
    ):
        problems.append("base_model_relation is not adapter | merge | quantized | finetune")
    for entry in meta.get("model-index") or []:
        for result in entry.get("results", []):
            if "type" not in result.get("task", {}) or "name" not in result.get("dataset", {}):
                problems.append("model-index result lacks task.type or dataset.name")
            for metric in result.get("metrics", []):
                if "type" not in metric or "value" not in metric:
                    problems.append("model-index metric lacks type or value")
    for w in meta.get("widget") or []:
        if not isinstance(w, dict) or "text" not in w:
            problems.append("widget entries need text")
    return problems


def serve(tokens: dict[str, str]) -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start the hub on a free loopback port; returns (server, state, endpoint URL)."""
    state = HubState(tokens)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
