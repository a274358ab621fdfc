"""projidx serve: warm look-ups through a real HTTP client on the loopback interface."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.test_cli import run

pytest.importorskip("flask", reason="projidx serve needs projidx[serve]")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt_dir):
    from werkzeug.serving import make_server

    from projidx.data import load_dataset
    from projidx.service import QueryService, create_app

    d = tmp_path_factory.mktemp("serve")
    digits = load_dataset("digits").subset(slice(0, 40))
    np.savez(d / "train.npz", images=((digits.images.numpy() + 1) * 127.5).round().astype(np.uint8),
             ids=digits.ids.numpy() + 1000)
    queries = load_dataset("digits:test").subset(slice(0, 2))
    np.savez(d / "queries.npz", images=((queries.images.numpy() + 1) * 127.5).round().astype(np.uint8))
    run("featurize", "--checkpoints", tiny_ckpt_dir, "--data", d / "train.npz", "--store", d / "s.zarr",
        "--timesteps", 2, "--proj-dim", 32)
    run("index", "--store", d / "s.zarr")
    srv = make_server("127.0.0.1", 0, create_app(QueryService(str(d / "s.zarr"))), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", d
    srv.shutdown()
    thread.join(timeout=10)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_a_json_query_match_the_cli(server):
    url, d = server
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["n"] == 40
    status, result = _post(f"{url}/query", json.dumps({"data": str(d / "queries.npz"), "top_k": 4}).encode(),
                           "application/json")
    assert status == 200 and result["method"] == "matched" and len(result["queries"]) == 2
    run("query", "--store", d / "s.zarr", "--data", d / "queries.npz", "--top-k", 4, "--out", d / "cli.json")
    cli = json.loads((d / "cli.json").read_text())
    assert [q["ids"] for q in result["queries"]] == [q["ids"] for q in cli["queries"]]
    np.testing.assert_allclose([q["scores"] for q in result["queries"]], [q["scores"] for q in cli["queries"]],
                               rtol=1e-6)


def test_an_uploaded_image_finds_its_training_image(server):
    from PIL import Image

    url, d = server
    with np.load(d / "train.npz") as f:
        image = f["images"][7, 0]
    path = d / "seven.png"
    Image.fromarray(image).save(path)
    boundary = "projidx-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"seven.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, result = _post(f"{url}/query", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, result
    entry = result["queries"][0]
    assert entry["query_name"] == "seven.png" and entry["ids"][0] == 1007 and len(entry["ids"]) == 3


def test_bad_requests_are_one_line_400s(server):
    url, d = server
    status, result = _post(f"{url}/query", b"{}", "application/json")
    assert status == 400 and "DATA spec" in result["error"]
    status, result = _post(f"{url}/query", json.dumps({"data": str(d / "missing.npz")}).encode(), "application/json")
    assert status == 400 and "no such file" in result["error"]
    status, result = _post(f"{url}/query", json.dumps({"data": str(d / "queries.npz"), "method": "tracin"}).encode(),
                           "application/json")
    assert status == 400 and "no tracin index" in result["error"]
