"""projidx serve facing a network: uploads only (or files under --data-root), bounded requests, one-line JSON
errors, a pinned store, bearer tokens; a real waitress server on the loopback interface; index pairs replaced as
one."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from projidx.settings import ServeLimits
from tests.test_cli import assert_clean_error, run

pytest.importorskip("flask", reason="projidx serve needs projidx[serve]")
pytest.importorskip("waitress", reason="projidx serve needs projidx[serve]")

LIMITS = ServeLimits(max_images=4, max_noise_draws=8, max_gradients=512, max_upload_bytes=256 << 10, timeout=20)


def featurize_and_index(d: Path, ckpt_dir: Path, store: Path, rows: slice = slice(0, 40), proj_dim: int = 32) -> None:
    from projidx.data.datasets import load_dataset

    digits = load_dataset("digits").subset(rows)
    np.savez(d / "train.npz", images=((digits.images.numpy() + 1) * 127.5).round().astype(np.uint8),
             ids=digits.ids.numpy() + 1000)
    run("featurize", "--checkpoints", ckpt_dir, "--data", d / "train.npz", "--store", store, "--timesteps", 2,
        "--proj-dim", proj_dim)
    run("index", "--store", store)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_ckpt_dir):
    """A store of 40 digits (2 checkpoints, grid of 2, k = 32) with its matched index; ``root/`` holds two query
    digits as an .npz and as PNGs."""
    from PIL import Image

    from projidx.data.datasets import load_dataset

    d = tmp_path_factory.mktemp("serve")
    featurize_and_index(d, tiny_ckpt_dir, d / "s.zarr")
    (d / "root").mkdir()
    queries = ((load_dataset("digits:test").subset(slice(0, 2)).images.numpy() + 1) * 127.5).round().astype(np.uint8)
    np.savez(d / "root" / "queries.npz", images=queries)
    for i, image in enumerate(queries):
        Image.fromarray(image[0]).save(d / "root" / f"q{i}.png")
    run("query", "--store", d / "s.zarr", "--data", d / "root" / "queries.npz", "--top-k", 4, "--out", d / "cli.json")
    return d


@pytest.fixture(scope="module")
def client(built):
    from projidx.cli.service import QueryService, create_app

    service = QueryService(str(built / "s.zarr"), limits=ServeLimits(**{**LIMITS.__dict__,
                                                                         "data_root": str(built / "root")}))
    return create_app(service).test_client()


def answers(result: dict) -> tuple[list, list]:
    return [q["ids"] for q in result["queries"]], [q["scores"] for q in result["queries"]]


def assert_same_answers(result: dict, expected: dict) -> None:
    ids, scores = answers(result)
    assert ids == answers(expected)[0]
    np.testing.assert_allclose(scores, answers(expected)[1], rtol=1e-6)


def uploads(d: Path, **fields) -> dict:
    """A JSON body with the two query PNGs of ``root/`` as base64 uploads."""
    images = [{"name": f"q{i}.png", "base64": base64.b64encode((d / "root" / f"q{i}.png").read_bytes()).decode()}
              for i in range(2)]
    return {"images": images, **fields}


def assert_json_error(response, status: int, *needles: str) -> str:
    """A JSON body {"error": one line} with ``status`` naming ``needles``; returns the line."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json", response.data[:300]
    error = response.get_json()["error"]
    assert "\n" not in error and 0 < len(error) <= 200, error
    for needle in needles:
        assert needle.lower() in error.lower(), (needle, error)
    return error


def png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` 8-bit grayscale pixels, with almost no pixel data (a
    small file that would decode to a huge image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def multipart(files: list[tuple[str, bytes]], **fields) -> dict:
    return {"data": {**{k: str(v) for k, v in fields.items()}, "image": [(io.BytesIO(b), n) for n, b in files]},
            "content_type": "multipart/form-data"}


# ---- answers ------------------------------------------------------------------------------------------------

def test_health_names_no_path_and_uploads_answer_as_projidx_query(client, built):
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "ok" and health.get_json()["n"] == 40
    assert {"matched", "dtrak", "das"} <= set(health.get_json()["methods"])  # before any query
    assert str(built) not in health.get_data(as_text=True)
    cli = json.loads((built / "cli.json").read_text())
    result = client.post("/query", json=uploads(built, top_k=4)).get_json()
    assert [q["query_name"] for q in result["queries"]] == ["q0.png", "q1.png"]
    assert_same_answers(result, cli)
    files = [(f"q{i}.png", (built / "root" / f"q{i}.png").read_bytes()) for i in range(2)]
    assert_same_answers(client.post("/query", **multipart(files, top_k=4)).get_json(), cli)
    assert_same_answers(client.post("/query", json={"data": "queries.npz", "top_k": 4}).get_json(), cli)
    exact = client.post("/query", json=uploads(built, top_k=4, exact=True)).get_json()
    assert answers(exact)[0] == answers(cli)[0]


def test_an_uploaded_training_image_finds_itself(client, built):
    from PIL import Image

    with np.load(built / "train.npz") as f:
        image = f["images"][7, 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    result = client.post("/query", **multipart([("seven.png", buffer.getvalue())], top_k=3)).get_json()
    entry = result["queries"][0]
    assert entry["query_name"] == "seven.png" and entry["ids"][0] == 1007 and len(entry["ids"]) == 3


# ---- no server-side file reads --------------------------------------------------------------------------

def test_no_file_outside_the_data_root_is_read_and_all_refusals_read_alike(client, built, tiny_ckpt_dir):
    root = built / "root"
    (root / "link.npz").symlink_to(built / "train.npz")  # a link leading out of the root
    (root / "dir.npz").mkdir()
    os.mkfifo(root / "fifo.npz")  # opened, it would block a reader forever
    refusals = {}
    for spec in ("missing.npz", "../train.npz", str(built / "train.npz"), "link.npz", "dir.npz", "fifo.npz",
                 "../../" * 12 + str(built / "train.npz").lstrip("/")):
        start = time.perf_counter()
        error = assert_json_error(client.post("/query", json={"data": spec}), 400, "no such file under the data root")
        assert time.perf_counter() - start < 5
        refusals[spec] = error.replace(repr(spec), "SPEC")
    assert len(set(refusals.values())) == 1, refusals
    # other kinds of file are refused by name, before the file system is touched: nothing is echoed from them
    checkpoint = next(Path(tiny_ckpt_dir).glob("*.pt"))
    for spec in ("/etc/passwd", str(checkpoint), f"../../{checkpoint.name}"):
        error = assert_json_error(client.post("/query", json={"data": spec}), 400, "under the data root")
        assert "state_dict" not in error and "data.pkl" not in error
    assert_json_error(client.post("/query", json={"data": "digits:test"}), 400, "built-in data sets are not served")


def test_without_a_data_root_no_data_spec_is_read(built):
    from projidx.cli.service import QueryService, create_app

    app = create_app(QueryService(str(built / "s.zarr"), limits=LIMITS)).test_client()
    for spec in (str(built / "root" / "queries.npz"), "/etc/passwd", "queries.npz"):
        assert_json_error(app.post("/query", json={"data": spec}), 400, "reads no files", "upload images")


# ---- bounded requests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "needles"), [
    ({"noise_draws": 100_000}, ("noise_draws", "[1, 8]")),
    ({"noise_draws": 1_000_000}, ("noise_draws",)),
    ({"query_timesteps": 1_000_000_000}, ("query_timesteps", "T = 1000")),
    ({"query_timesteps": 600, "noise_draws": 8}, ("gradient evaluations", "512")),
    ({"top_k": 41}, ("top_k", "[1, 40]")),
    ({"top_k": 0}, ("top_k",)),
    ({"top_k": 4, "rerank": 2}, ("rerank",)),
    ({"top_k": "four"}, ("top_k must be an integer",)),
    ({"top_k": 2.5}, ("top_k must be an integer",)),
    ({"top_k": True}, ("top_k must be an integer",)),
    ({"method": "tracin"}, ("no tracin index", "<store>")),
    ({"method": "bogus"}, ("unknown method",)),
    ({"exact": "maybe"}, ("exact must be true or false",)),
    ({"colour": 1}, ("unknown field 'colour'",)),
])
def test_every_field_is_bounded(client, built, fields, needles):
    start = time.perf_counter()
    error = assert_json_error(client.post("/query", json=uploads(built, **fields)), 400, *needles)
    assert time.perf_counter() - start < 5 and str(built) not in error


def test_huge_numbers_bad_json_and_bad_bodies_are_one_line_json(client, built):
    body = json.dumps(uploads(built)).replace('"images"', '"top_k": 1e400, "images"')  # inf to Python's json
    assert_json_error(client.post("/query", data=body, content_type="application/json"), 400, "top_k must be an int")
    assert_json_error(client.post("/query", data=b"{not json", content_type="application/json"), 400, "send a")
    assert_json_error(client.post("/query", json={}), 400, "send a multipart form")
    assert_json_error(client.post("/query", json={"images": [{"name": "x", "base64": "%%%"}]}), 400, "base64")
    assert_json_error(client.post("/query", json={"images": [{"name": "x", "base64": "aGVsbG8="}]}), 400,
                      "not a readable image")
    assert_json_error(client.post("/query", json={"images": "x"}), 400, "images must be a list")
    five = [("q.png", (built / "root" / "q0.png").read_bytes())] * 5
    assert_json_error(client.post("/query", **multipart(five)), 400, "images per request", "[1, 4]")
    assert_json_error(client.post("/query", data=b"x" * (300 << 10), content_type="application/json"), 413,
                      "too large")
    assert_json_error(client.post("/query", data=b"--x\r\nbroken", content_type="multipart/form-data; boundary=x"),
                      400)
    assert_json_error(client.get("/query"), 405)
    assert_json_error(client.get("/nowhere"), 404)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_headers_are_checked_before_any_pixel_is_decoded(client, built):
    for size, needles in (((12000, 12000), ("12000x12000 pixels", "8x8")), ((20000, 20000), ("too many pixels",)),
                          ((1, 1), ("1x1 pixels",))):
        start = time.perf_counter()
        assert_json_error(client.post("/query", **multipart([("big.png", png(*size))])), 400, *needles)
        assert time.perf_counter() - start < 2  # a 12000 x 12000 decode takes seconds and about 1 GB
    (built / "root" / "big.png").write_bytes(png(12000, 12000))
    assert_json_error(client.post("/query", json={"data": "big.png"}), 400, "12000x12000 pixels")


def test_an_unexpected_error_is_a_json_500_and_the_server_answers_after(client, built, monkeypatch):
    import projidx.cli.service as service_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(service_module, "query_vectors", broken)
    assert_json_error(client.post("/query", json=uploads(built)), 500, "internal error (RuntimeError)")
    monkeypatch.undo()
    assert_same_answers(client.post("/query", json=uploads(built, top_k=4)).get_json(),
                        json.loads((built / "cli.json").read_text()))


def test_a_busy_model_answers_503_after_the_timeout(built):
    from projidx.cli.service import QueryService, create_app

    service = QueryService(str(built / "s.zarr"), limits=ServeLimits(timeout=0.2))
    app = create_app(service).test_client()
    with service.model_lock:
        assert_json_error(app.post("/query", json=uploads(built)), 503, "busy")
    assert app.post("/query", json=uploads(built)).status_code == 200


# ---- authentication -----------------------------------------------------------------------------------------

def test_a_bearer_token_guards_every_endpoint(built, tmp_path, monkeypatch):
    from projidx.cli.service import TOKEN_ENV, QueryService, create_app, read_token

    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    assert read_token(str(tmp_path / "token")) == token
    monkeypatch.setenv(TOKEN_ENV, token)
    assert read_token(None) == token
    (tmp_path / "short").write_text("abc")
    with pytest.raises(Exception, match="at least 16"):
        read_token(str(tmp_path / "short"))
    app = create_app(QueryService(str(built / "s.zarr"), limits=LIMITS), token).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
        assert_json_error(app.get("/health", headers=headers), 401, "unauthorized")
        assert_json_error(app.post("/query", json=uploads(built), headers=headers), 401)
    good = {"Authorization": f"Bearer {token}"}
    assert app.get("/health", headers=good).status_code == 200
    assert app.post("/query", json=uploads(built), headers=good).status_code == 200


# ---- the pinned store ---------------------------------------------------------------------------------------

def test_a_store_rebuilt_under_the_service_is_never_served(built, tiny_ckpt_dir, tmp_path):
    from projidx.cli.service import QueryService, create_app

    shutil.copytree(built / "s.zarr", tmp_path / "s.zarr")
    shutil.copytree(built / "s.zarr.index", tmp_path / "s.zarr.index")
    app = create_app(QueryService(str(tmp_path / "s.zarr"), limits=LIMITS)).test_client()
    assert app.post("/query", json=uploads(built, top_k=4)).status_code == 200  # the index is loaded now
    shutil.rmtree(tmp_path / "s.zarr")
    shutil.rmtree(tmp_path / "s.zarr.index")
    featurize_and_index(tmp_path, tiny_ckpt_dir, tmp_path / "s.zarr", slice(40, 80), proj_dim=16)
    for fields in ({}, {"exact": True}):
        assert_json_error(app.post("/query", json=uploads(built, **fields)), 503, "store changed", "restart")
    health = app.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "stale"
    shutil.rmtree(tmp_path / "s.zarr")  # a deleted store too
    assert_json_error(app.post("/query", json=uploads(built)), 503, "store changed")


def test_an_index_not_built_from_the_pinned_store_is_refused(client, built):
    from projidx.cli.service import QueryService, Unavailable

    service = QueryService(str(built / "s.zarr"), limits=LIMITS)
    index = service.index("matched")
    index.sidecar = {**index.sidecar, "store_uuid": "another"}
    with pytest.raises(Unavailable, match="not built from the served store"):
        service.index("matched")


# ---- a real server --------------------------------------------------------------------------------------------

def http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers.get_content_type(), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), json.loads(e.read())


def test_waitress_on_loopback_answers_16_clients_as_projidx_query_and_refuses_in_json(built):
    from projidx.cli.service import QueryService, create_app, create_server

    limits = ServeLimits(**{**LIMITS.__dict__, "threads": 4})
    server = create_server(create_app(QueryService(str(built / "s.zarr"), limits=limits)), "127.0.0.1", 0, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.effective_port}"
    json_headers = {"Content-Type": "application/json"}
    try:
        cli = json.loads((built / "cli.json").read_text())
        body = json.dumps(uploads(built, top_k=4)).encode()
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: http(f"{url}/query", body, json_headers), range(16)))
        for status, kind, result in replies:
            assert status == 200 and kind == "application/json"
            assert_same_answers(result, cli)
        # a body over the limit is refused by waitress from its Content-Length, before it is sent, in JSON too
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=30) as s:
            s.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000000\r\n\r\n{")
            head, _, rest = s.makefile("rb").read().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, head
        assert "\n" not in json.loads(rest)["error"]
        status, kind, result = http(f"{url}/query", json.dumps({"data": "/etc/passwd"}).encode(), json_headers)
        assert status == 400 and "reads no files" in result["error"]
        status, _, result = http(f"{url}/health")
        assert status == 200 and str(built) not in json.dumps(result)
        status, _, result = http(f"{url}/query", body, json_headers)  # alive and right after the refusals
        assert status == 200
        assert_same_answers(result, cli)
    finally:
        server.close()
        thread.join(timeout=10)


def test_serve_refuses_bad_operator_settings_in_one_line(built, tmp_path):
    assert_clean_error(run("serve", "--store", built / "s.zarr", "--max-images", 0, ok=False), "--max-images",
                       ">= 1")
    (tmp_path / "token").write_text("short")
    assert_clean_error(run("serve", "--store", built / "s.zarr", "--token-file", tmp_path / "token", ok=False),
                       "at least 16")


# ---- elsewhere: index pairs, grid sizes ---------------------------------------------------------------------

def test_an_index_build_killed_before_its_switch_leaves_the_old_pair_working(built, tmp_path):
    shutil.copytree(built / "s.zarr", tmp_path / "s.zarr")
    shutil.copytree(built / "s.zarr.index", tmp_path / "s.zarr.index")
    before = sorted(p.name for p in (tmp_path / "s.zarr.index").iterdir())
    # SIGKILL at the switch: the new index file is written whole, its sidecar not yet
    killed = ("import os, signal, sys; import projidx.store.locations as L; write = L.Location.write_text\n"
              "def kill(self, text):\n"
              "    if self.name.endswith('.json'): os.kill(os.getpid(), signal.SIGKILL)\n"
              "    write(self, text)\n"
              "L.Location.write_text = kill\n"
              "from projidx.cli.main import main; main(['index', '--store', sys.argv[1]])")
    r = subprocess.run([sys.executable, "-c", killed, str(tmp_path / "s.zarr")], capture_output=True)
    assert r.returncode == -9
    after = sorted(p.name for p in (tmp_path / "s.zarr.index").iterdir())
    assert len(after) == len(before) + 1  # the new file beside the old pair
    run("query", "--store", tmp_path / "s.zarr", "--data", built / "root" / "queries.npz", "--top-k", 4, "--out",
        tmp_path / "r.json")
    assert_same_answers(json.loads((tmp_path / "r.json").read_text()), json.loads((built / "cli.json").read_text()))
    run("index", "--store", tmp_path / "s.zarr")  # the next build switches and removes what is not its own
    assert len(list((tmp_path / "s.zarr.index").iterdir())) == len(before)


def test_a_grid_larger_than_T_is_refused_at_once(built, tiny_ckpt_dir, tmp_path):
    start = time.perf_counter()
    r = run("featurize", "--checkpoints", tiny_ckpt_dir, "--data", built / "train.npz", "--store",
            tmp_path / "s.zarr", "--timesteps", 1_000_000_000, ok=False)
    assert_clean_error(r, "--timesteps must be <= T = 1000")
    assert time.perf_counter() - start < 10 and not (tmp_path / "s.zarr").exists()
