"""A web page for the served visual search ad request: upload a photo (or pick one of the data
set's query photos) and see the ads the model server returns for it, in a grid, with their
similarity to the photo, predicted CTR, bid and eCPM = pCTR x bid, best first.

    python -m serving.search_page --data_dir=data/small --export_dir=runs/demo/models/search \
        --model_server=http://127.0.0.1:8501 [--port=8080]

The page calls the model server's REST API (TF Serving or `serving.stand_in_server`), model
`--model_name`, signature `request` (`export.search`), for the user picked on the page: users
and their request features come from the data dir's `ctr` records. Item and query images are
served from the data dir's catalog and queries. Standard library only (`http.server`).

Routes: GET / (the page), GET /api/setup (users, query photos, categories), GET
/item/<id> and /query/<id> (images), POST /api/request?user=<i>&category=<c>&k=<k>&n=<n> with
the photo's bytes as the body (JSON: the ads, or {"error": ...} with the model server's reason).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from export import client as client_lib
from trainer import console
from trainer.ctr import spec as ctr_spec
from trainer.data import pipeline, records
from trainer.stages.common import has_files

USERS = 12  # users offered on the page
QUERIES = 24  # query photos offered on the page


def _image_type(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"GIF":
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    return "image/jpeg"


class PageData:
    """What the page shows besides the model server's answers: catalog and query images by id,
    a few users' request features, the query photos on offer and the categories."""

    def __init__(self, data_dir: str, spec: ctr_spec.CtrSpec, users: int = USERS,
                 queries: int = QUERIES):
        from export import search as export_search
        catalog = records.default_pattern(data_dir, "catalog")
        cols = pipeline.read_columns(catalog, "catalog", ("item_id", "image", "category_id"))
        self.items = dict(zip(cols["item_id"].tolist(), cols["image"], strict=True))
        self.categories = sorted(set(cols["category_id"].tolist()))
        self.queries: dict[int, bytes] = {}
        self.query_category: dict[int, int] = {}
        query_files = records.default_pattern(data_dir, "queries")
        if has_files(query_files):
            q = pipeline.read_columns(query_files, "queries", ("query_id", "image",
                                                               "category_id"))
            for i in range(min(queries, len(q["query_id"]))):
                self.queries[int(q["query_id"][i])] = q["image"][i]
                self.query_category[int(q["query_id"][i])] = int(q["category_id"][i])
        names = [n for n in export_search.request_input_specs(spec)
                 if n not in ("photo", "category", "k", "n")]
        self.users: list[dict] = []
        ctr_files = records.default_pattern(data_dir, "ctr", "test")
        if not has_files(ctr_files):
            ctr_files = records.default_pattern(data_dir, "ctr")
        kind = spec.record_kind()
        lists = [n for n in names if kind.feature(n).is_list]
        seen: set = set()
        for batch in pipeline.iter_columns(ctr_files, kind, names + [n + "_mask" for n in lists]):
            for i in range(len(batch[names[0]])):
                user = {}
                for name in names:
                    value = batch[name][i]
                    mask = batch.get(name + "_mask")
                    user[name] = (value[mask[i].astype(bool)].tolist() if mask is not None
                                  else value.item())
                key = json.dumps(user, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    self.users.append(user)
                if len(self.users) >= users:
                    break
            if len(self.users) >= users:
                break
        if not self.users:
            raise ValueError(f"{ctr_files}: no ctr records to take users' request features from")


class SearchPage:
    """The page's HTTP server: `start()` serves it on a thread, `url` is its address."""

    def __init__(self, data: PageData, spec: ctr_spec.CtrSpec, model_server: str,
                 model_name: str = "search", port: int = 0, timeout: float = 30.0):
        self.data, self.spec, self.model_name = data, spec, model_name
        self.client = client_lib.RestClient(model_server, timeout=timeout)
        page = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # the page's own log stays quiet
                pass

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, obj: object) -> None:
                self._send(code, json.dumps(obj).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                path = urllib.parse.urlparse(self.path).path
                if path == "/":
                    return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                if path == "/api/setup":
                    d = page.data
                    return self._json(200, {
                        "users": [{"index": i, "label": _user_label(u, i)}
                                  for i, u in enumerate(d.users)],
                        "queries": [{"id": q, "category": d.query_category[q]}
                                    for q in d.queries],
                        "categories": d.categories})
                for prefix, store in (("/item/", page.data.items),
                                      ("/query/", page.data.queries)):
                    if path.startswith(prefix):
                        try:
                            image = store[int(path[len(prefix):])]
                        except (KeyError, ValueError):
                            return self._json(404, {"error": f"no image {path}"})
                        return self._send(200, image, _image_type(image))
                self._json(404, {"error": f"no page {path}"})

            def do_POST(self) -> None:  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                if url.path != "/api/request":
                    return self._json(404, {"error": f"no page {url.path}"})
                query = urllib.parse.parse_qs(url.query)
                try:
                    user = page.data.users[int(query.get("user", ["0"])[0])]
                    category = int(query.get("category", ["-1"])[0])
                    k, n = int(query.get("k", ["100"])[0]), int(query.get("n", ["10"])[0])
                except (ValueError, IndexError) as e:
                    return self._json(400, {"error": f"bad parameters: {e}"})
                photo = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not photo:
                    return self._json(400, {"error": "no photo in the request body"})
                t0 = time.perf_counter()
                try:
                    ads = page.client.request(photo, user, page.spec, category, k, n,
                                              model=page.model_name)
                except RuntimeError as e:  # the model server's reason (HTTP 400)
                    return self._json(400, {"error": str(e)})
                except OSError as e:  # not reachable, or timed out
                    return self._json(502, {"error": f"the model server at "
                                                     f"{page.client.base_url}: {e}"})
                ms = (time.perf_counter() - t0) * 1e3
                self._json(200, {"milliseconds": round(ms, 1), "ads": [
                    {"item_id": int(ads["item_id"][i]),
                     **{key: float(ads[key][i]) for key in ("similarity", "ctr", "bid", "ecpm")}}
                    for i in range(len(ads["item_id"]))]})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> SearchPage:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _user_label(user: dict, index: int) -> str:
    parts = [f"{k} {v}" for k, v in user.items() if not isinstance(v, list)]
    return f"#{index}: " + ", ".join(parts[:3])


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Visual search ads</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#controls { display: flex; gap: 1em; flex-wrap: wrap; align-items: center; }
#queries img { width: 56px; height: 56px; margin: 2px; cursor: pointer; border: 2px solid #ddd;
  image-rendering: pixelated; }
#query img { width: 128px; height: 128px; image-rendering: pixelated; border: 2px solid #444; }
#results { display: grid; grid-template-columns: repeat(auto-fill, 150px); gap: 10px; }
.result { margin: 0; border: 1px solid #ccc; padding: 4px; font-size: 12px; }
.result img { width: 140px; height: 140px; image-rendering: pixelated; }
#status { color: #555; } .error { color: #b00; }
</style></head>
<body>
<h1>Visual search ads</h1>
<p>A photo &rarr; the most similar catalog items (within a category) &rarr; ranked by the CTR
model &rarr; the top ads by eCPM = pCTR &times; bid.</p>
<div id="controls">
  <label>Photo <input type="file" id="upload" accept="image/*"></label>
  <label>User <select id="user"></select></label>
  <label>Category <select id="category"><option value="-1">any</option></select></label>
  <label>Retrieve <input type="number" id="k" value="100" min="1" max="1000"></label>
  <label>Show <input type="number" id="n" value="10" min="1" max="100"></label>
</div>
<p>Or pick a query photo:</p><div id="queries"></div>
<h2>Query</h2><div id="query"></div><p id="status"></p>
<h2>Ads</h2><div id="results"></div>
<script>
let photo = null;
async function setup() {
  const s = await (await fetch('/api/setup')).json();
  for (const u of s.users) document.getElementById('user').add(new Option(u.label, u.index));
  for (const c of s.categories) document.getElementById('category').add(new Option(c, c));
  for (const q of s.queries) {
    const img = document.createElement('img');
    img.src = '/query/' + q.id; img.title = 'query ' + q.id + ', category ' + q.category;
    img.className = 'pick';
    img.onclick = async () => {
      document.getElementById('category').value = q.category;
      show(new Uint8Array(await (await fetch(img.src)).arrayBuffer()), img.src);
    };
    document.getElementById('queries').appendChild(img);
  }
}
function show(bytes, src) {
  photo = bytes;
  document.getElementById('query').innerHTML = '<img id="query-image" src="' + src + '">';
  run();
}
async function run() {
  if (!photo) return;
  const status = document.getElementById('status');
  status.className = ''; status.textContent = 'searching...';
  const p = new URLSearchParams({user: document.getElementById('user').value,
    category: document.getElementById('category').value,
    k: document.getElementById('k').value, n: document.getElementById('n').value});
  const r = await fetch('/api/request?' + p, {method: 'POST', body: photo});
  const answer = await r.json();
  const grid = document.getElementById('results');
  grid.innerHTML = '';
  if (!r.ok) { status.className = 'error'; status.textContent = answer.error; return; }
  status.textContent = answer.ads.length + ' ads in ' + answer.milliseconds + ' ms';
  answer.ads.forEach((a, i) => {
    const f = document.createElement('figure');
    f.className = 'result'; f.dataset.itemId = a.item_id; f.dataset.ecpm = a.ecpm;
    f.innerHTML = '<img src="/item/' + a.item_id + '"><figcaption>#' + (i + 1) + ' item ' +
      a.item_id + '<br>similarity ' + a.similarity.toFixed(3) + '<br>pCTR ' +
      a.ctr.toFixed(4) + '<br>bid ' + a.bid.toFixed(2) + '<br>eCPM ' + a.ecpm.toFixed(4) +
      '</figcaption>';
    grid.appendChild(f);
  });
}
document.getElementById('upload').onchange = async (e) => {
  const file = e.target.files[0];
  if (file) show(new Uint8Array(await file.arrayBuffer()), URL.createObjectURL(file));
};
for (const id of ['user', 'category', 'k', 'n'])
  document.getElementById(id).onchange = run;
setup();
</script></body></html>
"""


def main() -> None:
    ap = console.CommandLine(description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True, help="data dir: catalog, queries, ctr users")
    ap.add_argument("--export_dir", required=True,
                    help="the search export (its base path or a version): its feature spec")
    ap.add_argument("--model_server", default="http://127.0.0.1:8501",
                    help="the model server's REST address")
    ap.add_argument("--model_name", default="search")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    spec = client_lib.spec_of_export(args.export_dir)
    page = SearchPage(PageData(args.data_dir, spec), spec, args.model_server, args.model_name,
                      args.port)
    print(f"search page: {page.url} (model '{args.model_name}' at {args.model_server})",
          flush=True)
    try:
        page.server.serve_forever()
    except KeyboardInterrupt:
        page.stop()


if __name__ == "__main__":
    main()
