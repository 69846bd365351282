"""A small in-memory server that speaks the Hugging Face Hub's HTTP protocol, as `huggingface_hub` uses it.

Enough for the real client to push and pull a model or dataset repo with regular (non-LFS) files, on any branch,
and for `HfFileSystem` to read `hf://datasets/<owner>/<name>[@<rev>]/<file>` (repo info, tree, resolve). Each
`/api/models/...` route below also answers `/api/datasets/...` for dataset repos (created with
`repo_type="dataset"`), and `/datasets/{repo}/resolve/...` serves their files:

    GET  /api/whoami-v2                                   who the token belongs to
    POST /api/repos/create                                create a repo (409 if it exists)
    POST /api/validate-yaml                               model card metadata check (YAML must parse)
    POST /api/models/{repo}/preupload/{rev}               upload mode of each file: always "regular"
    POST /api/models/{repo}/commit/{rev}                  NDJSON commit: header (parentCommit: 412 if the
                                                          branch moved), base64 files, deletedFile/deletedFolder
    POST /api/models/{repo}/branch/{branch}               create a branch; JSON {"startingPoint": rev}, default
                                                          main's head (409 if it exists, 400 for a bad name)
    POST /api/models/{repo}/tag/{rev}                     tag a revision; JSON {"tag": name, "message": ...}
    GET  /api/models/{repo}/refs                          branches and tags with their commits
    GET  /api/models/{repo}[/revision/{rev}]              model info (sha, private, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]           listing: files and folders under path (recursive=true:
                                                          every file below it)
    POST /api/models/{repo}/paths-info/{rev}              form `paths`: oid and size of those files
    HEAD|GET /{repo}/resolve/{rev}/{path}                 file metadata (X-Repo-Commit, ETag) and content

A revision is a branch, a tag or a full commit oid. The client URL-encodes revisions and branch names
(`release/x` arrives as `release%2Fx`); routes match the encoded segment and decode it. A repo starts with one
commit on main holding `.gitattributes`, as on the Hub; `HubServer(initial_commit=False)` starts repos empty
(no main until the first commit to it), as some self-hosted servers do.

Auth: every request with an `Authorization: Bearer ...` header must carry one of `tokens` (else 401); writes
need one; private repos are invisible (404) without one. `fail(method, pattern, [500, 500])` makes the next
matching requests answer those statuses (`headers=` adds response headers, e.g. `{"Retry-After": "7"}`).
`HubServer(port=N)` listens on that port (default: a free one). `requests` records (method, path, status) per request; it never
records headers, so no token is kept.

    with HubServer(tokens={"hf_x"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

KIND = r"(?P<kind>models|datasets)"
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit oid

    def resolve(self, rev: str) -> Commit | None:
        oid = self.refs.get(rev) or self.tags.get(rev) or rev
        return next((c for c in self.commits if c.oid == oid), None)


UNBORN = Commit(oid="0" * 40, summary="", description="", files={})  # main of an empty repo, before its commit
# git check-ref-format, roughly, plus the Hub's rule that branches never live under refs/.
BAD_REF = re.compile(r"^refs/|^/|/$|//|\.\.|@\{|[\x00-\x20~^:?*\[\\\x7f]|\.lock(/|$)|^\.|/\.|^@$")


class HubServer:
    def __init__(self, tokens: dict[str, str] | set[str], host: str = "127.0.0.1", initial_commit: bool = True,
                 port: int = 0):
        # token -> user name (a set of tokens all belong to user "you")
        self.tokens = dict(tokens) if isinstance(tokens, dict) else {t: "you" for t in tokens}
        self.initial_commit = initial_commit
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._failures: list[tuple[str, re.Pattern, list[int], dict[str, str]]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.url = f"http://{host}:{self._httpd.server_address[1]}"

    # --- control from tests -----------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        """The next len(statuses) requests matching method + path regex answer these statuses (with `headers`)."""
        self._failures.append((method, re.compile(pattern), list(statuses), dict(headers or {})))

    def calls(self, method: str | None = None, pattern: str = "") -> list[tuple[str, str, int]]:
        return [r for r in self.requests if (method is None or r[0] == method) and re.search(pattern, r[1])]

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- routing -----------------------------------------------------------------------------------------
    def injected_failure(self, method: str, path: str) -> tuple[int, dict[str, str]] | None:
        for m, pattern, statuses, headers in self._failures:
            if m == method and statuses and pattern.search(path):
                return statuses.pop(0), dict(headers)
        return None

    def handle(self, method: str, path: str, query: dict, user: str | None, body: bytes):
        """Returns (status, headers, body bytes or JSON-able)."""
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/{KIND}/{REPO}/preupload/{REV}", self.preupload),
            ("POST", rf"/api/{KIND}/{REPO}/commit/{REV}", self.commit),
            ("POST", rf"/api/{KIND}/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            ("POST", rf"/api/{KIND}/{REPO}/tag/{REV}", self.create_tag),
            ("GET", rf"/api/{KIND}/{REPO}/refs", self.list_refs),
            ("POST", rf"/api/{KIND}/{REPO}/paths-info/{REV}", self.paths_info),
            ("GET", rf"/api/{KIND}/{REPO}/tree/{REV}(?:/(?P<path>.*))?", self.tree),
            ("GET", rf"/api/{KIND}/{REPO}/revision/{REV}", self.model_info),
            ("GET", rf"/api/{KIND}/{REPO}", self.model_info),
            ("HEAD", rf"/(?:(?P<kind>datasets)/)?{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
            ("GET", rf"/(?:(?P<kind>datasets)/)?{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if args.pop("kind", "models") == "datasets":  # dataset repos live apart: "datasets/<owner>/<name>"
                    args["repo"] = f"datasets/{args['repo']}"
                with self._lock:
                    return fn(user=user, body=body, query=query, **args)
        return 404, {}, {"error": f"no route for {method} {path}"}

    def _repo(self, repo: str, user: str | None, rev: str | None = None, unborn_ok: bool = False):
        """(Repo, Commit) or an error response: missing and invisible private repos are both 404.
        `unborn_ok`: main of an empty repo resolves to an empty commit (a first commit can land there)."""
        r = self.repos.get(repo)
        if r is None or (r.private and user != r.owner):
            return None, (404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"})
        if rev is None:
            return (r, None), None
        commit = r.resolve(rev)
        if commit is None and unborn_ok and rev == "main" and "main" not in r.refs:
            commit = UNBORN
        if commit is None:
            return None, (404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"})
        return (r, commit), None

    # --- endpoints ---------------------------------------------------------------------------------------
    def whoami(self, user, **_):
        if user is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        return 200, {}, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}}

    def create_repo(self, user, body, **_):
        req = json.loads(body)
        namespace = req.get("organization") or user
        repo_id = f"{namespace}/{req['name']}"
        key = f"datasets/{repo_id}" if req.get("type") == "dataset" else repo_id
        if user is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        if namespace != user:
            return 403, {}, {"error": f"You don't have the rights to create a model under the namespace {namespace!r}"}
        if key in self.repos:
            return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = req.get("visibility", "public") == "private" or bool(req.get("private"))
        repo = Repo(repo_id, private=private, owner=user)
        if self.initial_commit:
            initial = Commit(oid=hashlib.sha1(repo_id.encode()).hexdigest(), summary="initial commit", description="",
                             files={".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo.commits.append(initial)
            repo.refs["main"] = initial.oid
        self.repos[key] = repo
        return 200, {}, {"url": f"{self.url}/{key}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, body, **_):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as e:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {e}"}]}
        if not isinstance(meta, dict):
            return 200, {}, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        return 200, {}, {"errors": [], "warnings": []}

    def preupload(self, user, body, repo, rev, **_):
        found, error = self._repo(repo, user, rev, unborn_ok=True)
        if error:
            return error
        _, commit = found
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha(commit.files[f["path"]]) if f["path"] in commit.files else None}
                 for f in json.loads(body)["files"]]
        return 200, {}, {"files": files, "commitOid": commit.oid}

    def commit(self, user, body, repo, rev, **_):
        if user is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        found, error = self._repo(repo, user, rev, unborn_ok=True)
        if error:
            return error
        r, parent = found
        if user != r.owner:
            return 403, {}, {"error": "You don't have write access to this repo"}
        if rev not in r.refs and parent is not UNBORN:  # a tag or a commit oid: the Hub commits to branches only
            return 400, {}, {"error": f"Invalid rev id: {rev} is not a branch"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        if header.get("parentCommit") not in (None, parent.oid):
            return 412, {}, {"error": "A commit has happened since. Please refresh and try again."}
        files = dict(parent.files)
        for item in lines:
            key, path = item["key"], item["value"].get("path", "")
            if key == "file":
                files[path] = base64.b64decode(item["value"]["content"])
            elif key in ("deletedFile", "deletedFolder"):
                if key == "deletedFile":
                    doomed = [path] if path in files else []
                else:
                    doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    message = f"A file with this name doesn't exist: {path}"
                    return 404, {"X-Error-Code": "EntryNotFound"}, {"error": message}
                for p in doomed:
                    del files[p]
            elif key != "header":
                return 400, {}, {"error": f"this test server does not support {key!r} operations"}
        oid = hashlib.sha1(json.dumps([len(r.commits), parent.oid, header,
                                       sorted((p, git_blob_sha(d)) for p, d in files.items())]).encode()).hexdigest()
        r.commits.append(Commit(oid, header["summary"], header.get("description", ""), files))
        r.refs[rev] = oid
        return 200, {}, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def create_branch(self, user, body, repo, branch, **_):
        if user is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        found, error = self._repo(repo, user)
        if error:
            return error
        r, _ = found
        if user != r.owner:
            return 403, {}, {"error": "You don't have write access to this repo"}
        if BAD_REF.search(branch):
            return 400, {}, {"error": f"Invalid reference for a branch: {branch}"}
        if branch in r.refs:
            return 409, {}, {"error": f"Reference already exists: refs/heads/{branch}"}
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        commit = r.resolve(start)
        if commit is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {start}"}
        r.refs[branch] = commit.oid
        return 200, {}, {}

    def create_tag(self, user, body, repo, rev, **_):
        if user is None:
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        found, error = self._repo(repo, user, rev)
        if error:
            return error
        r, commit = found
        if user != r.owner:
            return 403, {}, {"error": "You don't have write access to this repo"}
        tag = json.loads(body)["tag"]
        if BAD_REF.search(tag):
            return 400, {}, {"error": f"Invalid reference for a tag: {tag}"}
        if tag in r.tags:
            return 409, {}, {"error": f"Reference already exists: refs/tags/{tag}"}
        r.tags[tag] = commit.oid
        return 200, {}, {}

    def list_refs(self, user, repo, query, **_):
        found, error = self._repo(repo, user)
        if error:
            return error
        r, _ = found
        ref = lambda kind, name, oid: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}  # noqa: E731
        out = {"branches": [ref("heads", n, o) for n, o in sorted(r.refs.items())], "converts": [],
               "tags": [ref("tags", n, o) for n, o in sorted(r.tags.items())]}
        if query.get("include_prs"):
            out["pullRequests"] = []
        return 200, {}, out

    def paths_info(self, user, body, repo, rev, **_):
        found, error = self._repo(repo, user, rev)
        if error:
            return error
        _, commit = found
        out = []
        for path in parse_qs(body.decode()).get("paths", []):
            if path in commit.files:
                data = commit.files[path]
                out.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)})
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
        return 200, {}, out

    def model_info(self, user, repo, rev="main", **_):
        found, error = self._repo(repo, user, rev)
        if error:
            return error
        r, commit = found
        repo_id = repo.removeprefix("datasets/")
        return 200, {}, {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": r.private, "author": r.owner,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]}

    def tree(self, user, repo, rev, query, path="", **_):
        """The entries under `path`: with recursive=true every file below it, else its files and folders."""
        found, error = self._repo(repo, user, rev)
        if error:
            return error
        _, commit = found
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and prefix[:-1] in commit.files:  # a file, not a folder: the Hub answers 404 too
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{path} is not a folder"}
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        files, folders = [], set()
        for p, d in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            files.append({"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)})
        if prefix and not files and not folders:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{path} does not exist"}
        dirs = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return 200, {}, dirs + files

    def resolve(self, user, repo, rev, path, **_):
        found, error = self._repo(repo, user, rev)
        if error:
            return error
        _, commit = found
        if path not in commit.files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}, {"error": "Entry not found"}
        data = commit.files[path]
        return 200, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(data)}"',
                     "Content-Type": "application/octet-stream"}, data


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
            user = server.tokens.get(token) if token else None
            injected = server.injected_failure(method, url.path)
            if injected is not None:
                (status, headers), payload = injected, {"error": f"injected {injected[0]}"}
            elif token is not None and user is None:
                status, headers, payload = 401, {}, {"error": "Invalid credentials in Authorization header"}
                headers["X-Error-Message"] = "Invalid credentials in Authorization header"
            else:
                status, headers, payload = server.handle(method, url.path, parse_qs(url.query), user, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            if not isinstance(payload, bytes):
                headers.setdefault("Content-Type", "application/json")
            server.requests.append((method, url.path, status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_HEAD(self):
            self._serve("HEAD")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, *args):  # quiet: tests read `requests`
            pass

    return Handler
