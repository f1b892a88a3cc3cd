"""``florence serve``: the JSON API (FastAPI's TestClient) and the page in headless Chromium, over a tiny collection
of 20 real Fashion-MNIST images embedded by a fresh ``unicl_test`` dual encoder."""
import io
import os
import tarfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from florence.benchmarks.search_screenshot import chromium_driver, chromium_missing, run_query
from florence.data.sources import FASHION_MNIST_DIR, read_idx
from florence.search import Index
from florence.search.webapp import background_server, create_app

pytestmark = pytest.mark.usefixtures("one_thread_module")

FMNIST = os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")
CLASSES = ["top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
MAX_UPLOAD = 4096


def _png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def web(tmp_path_factory, tiny_dual_encoder):
    """An Index over 20 Fashion-MNIST PNGs (2 per class, ``imgs/<class>_<n>.png``), the 4 bags/sandals tagged; the
    app on it (upload limit 4 KiB) and a TestClient. Also spare images for ``/api/index``."""
    if not os.path.exists(FMNIST):
        pytest.skip(f"Fashion-MNIST is absent ({FMNIST}; apt-get install dataset-fashion-mnist)")


    root = tmp_path_factory.mktemp("web")
    images = read_idx(FMNIST)
    labels = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    (root / "imgs").mkdir()
    files = {}
    for label, name in enumerate(CLASSES):
        for n, i in enumerate(np.flatnonzero(labels == label)[:3]):
            data = _png(images[i])
            if n < 2:
                files[f"{name}_{n}"] = root / "imgs" / f"{name}_{n}.png"
                files[f"{name}_{n}"].write_bytes(data)
            else:  # spares, not indexed at first
                (root / f"spare_{name}.png").write_bytes(data)
    bundle = tiny_dual_encoder([f"a photo of a {c}" for c in CLASSES] * 4)
    index = Index(root / "web.db", "web", model=bundle)
    index.add(root / "imgs", progress=False, workers=0)
    ids = {row["path"]: row["id"] for row in index.store.rows(("id", "path"))}
    ids = {name: ids[str(path)] for name, path in files.items()}
    index.store.update([{"id": ids[f"{c}_{n}"], "tag": c, "tag_confidence": 0.9} for c in ("bag", "sandal")
                        for n in range(2)])
    app = create_app(index, max_upload_bytes=MAX_UPLOAD)
    yield {"root": root, "index": index, "client": TestClient(app), "app": app, "files": files, "ids": ids}
    index.close()


def test_info(web):
    info = web["client"].get("/api/info").json()
    assert info["collection"] == "web" and info["count"] == 20
    assert info["dim"] == web["index"].embedder.dim and info["index_type"] == "FLAT"
    assert info["roots"] == [str(web["root"] / "imgs")] and info["model_sha256"] == web["index"].embedder.sha256
    assert info["max_upload_bytes"] == MAX_UPLOAD and info["allow_index"] is True


def test_text_search_matches_the_index(web):
    r = web["client"].post("/api/search", json={"text": "a photo of a bag", "top_k": 7})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    expected = web["index"].search(text="a photo of a bag", top_k=7)
    assert [h["id"] for h in hits] == [h.id for h in expected]
    assert np.allclose([h["score"] for h in hits], [h.score for h in expected], atol=1e-5)
    assert {"path", "kind", "tag", "tag_confidence", "content_hash", "url"} <= set(hits[0]) and "vector" not in hits[0]
    assert r.json()["ms"] >= 0


def test_image_upload_and_like_find_the_image_itself(web):
    name = "sneaker_1"
    data = web["files"][name].read_bytes()
    r = web["client"].post("/api/search/image", files={"image": ("q.png", data, "image/png")}, data={"top_k": "5"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and hits[0]["id"] == web["ids"][name] and hits[0]["score"] > 0.999
    assert hits[0]["path"] == str(web["files"][name]) and hits[0]["kind"] == "image"
    r = web["client"].post("/api/search", json={"like": web["ids"][name], "top_k": 3})
    assert r.status_code == 200 and r.json()["hits"][0]["id"] == web["ids"][name]
    # text + image mixed: the weight moves the query between the two
    both = web["client"].post("/api/search/image", files={"image": ("q.png", data)},
                              data={"text": "a photo of a bag", "text_weight": "0.0", "top_k": "1"}).json()
    assert both["hits"][0]["id"] == web["ids"][name]


def test_filter_and_bad_requests(web):
    client = web["client"]
    r = client.post("/api/search", json={"text": "a photo", "top_k": 20, "filter": 'tag == "bag"'})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert sorted(h["id"] for h in hits) == sorted(web["ids"][f"bag_{n}"] for n in range(2))
    assert all(h["tag"] == "bag" and h["tag_confidence"] == pytest.approx(0.9) for h in hits)
    r = client.post("/api/search", json={"text": "a photo", "filter": 'tag === "bag" or'})
    assert r.status_code == 400 and "filter" in r.json()["error"] and "\n" not in r.json()["error"]
    assert client.post("/api/search", json={"text": "x", "top_k": 1000}).status_code == 400
    assert client.post("/api/search", json={"like": "nope\" or true"}).status_code == 400
    assert client.post("/api/search", json={"like": "0" * 64}).status_code == 400  # no such row
    assert client.post("/api/search", json={}).status_code == 400
    r = client.post("/api/search/image", files={"image": ("q.png", b"not an image")})
    assert r.status_code == 400 and "query image" in r.json()["error"]


def test_upload_limit(web):
    client = web["client"]
    big = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    assert MAX_UPLOAD < len(big) < MAX_UPLOAD + 1000  # refused by the endpoint's own check
    r = client.post("/api/search/image", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and str(MAX_UPLOAD) in r.json()["error"]
    r = client.post("/api/search/image", files={"image": ("huge.png", b"\0" * (1 << 20))})  # by Content-Length
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(200):
            yield b"\0" * 1024

    r = client.post("/api/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_image_serving_and_roots(web, tmp_path):
    client, index, name = web["client"], web["index"], "coat_0"
    row_id, path = web["ids"][name], web["files"][name]
    r = client.get(f"/api/image/{row_id}")
    assert r.status_code == 200 and r.content == path.read_bytes() and r.headers["content-type"] == "image/png"
    r = client.get(f"/api/image/{row_id}?thumb=16")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (16, 16)
    assert client.get(f"/api/image/{'1' * 64}").status_code == 404
    assert client.get("/api/image/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    outside = tmp_path / "secret.png"
    outside.write_bytes(path.read_bytes())
    link = web["root"] / "imgs" / "link.png"
    link.symlink_to(outside)
    try:
        for alias in (str(outside), str(link), str(web["root"] / "imgs" / ".." / "bundle" / "config.json")):
            index.store.update([{"id": row_id, "path": alias}])
            r = client.get(f"/api/image/{row_id}")
            assert r.status_code == 403 and "outside" in r.json()["error"], alias
    finally:
        index.store.update([{"id": row_id, "path": str(path)}])
        link.unlink()
    assert client.get(f"/api/image/{row_id}").status_code == 200


def test_index_endpoint(web, tmp_path):

    client, root = web["client"], web["root"]
    new = root / "imgs" / "new"
    new.mkdir()
    (new / "dress.png").write_bytes((root / "spare_dress.png").read_bytes())
    with tarfile.open(new / "shard.tar", "w") as tar:  # a webdataset shard: served from inside the tar
        tar.add(root / "spare_boot.png", arcname="0001.png")
    (new / "outside.png").symlink_to(root / "spare_bag.png")  # resolves outside the roots: skipped
    before = client.get("/api/info").json()["count"]
    for source in (new, new / "shard.tar"):
        r = client.post("/api/index", json={"source": str(source)})
        assert r.status_code == 200, r.text
        summary = r.json()
        assert summary["indexed"] == 1, summary
    assert summary["count"] == before + 2 == client.get("/api/info").json()["count"]
    assert client.get("/api/info").json()["roots"] == [str(root / "imgs")]
    hits = client.post("/api/search/image", files={"image": ("q.png", (root / "spare_boot.png").read_bytes())},
                       data={"top_k": "1"}).json()["hits"]
    assert hits[0]["path"] == f"{new / 'shard.tar'}#0001.png" and hits[0]["score"] > 0.999
    r = client.get(hits[0]["url"])
    assert r.status_code == 200 and r.content == (root / "spare_boot.png").read_bytes()
    assert r.headers["content-type"] == "image/png"
    r = client.post("/api/index", json={"source": str(new)})  # again: unchanged, the symlink skipped
    assert r.json()["unchanged"] == 1 and any("outside" in reason for _, reason in r.json()["skipped"])
    for source in (root / "spare_bag.png", root, "/etc", str(root / "imgs" / ".." / "spare_bag.png"), "imgs/*.png"):
        r = client.post("/api/index", json={"source": str(source)})
        assert r.status_code == 403 and "roots" in r.json()["error"], source

    locked = TestClient(create_app(web["index"], allow_index=False))
    assert locked.post("/api/index", json={"source": str(new)}).status_code == 403
    assert client.get("/api/info").json()["count"] == before + 2


def test_page_in_headless_chromium(web):

    missing = chromium_missing()
    if missing:
        print(f"skipping the browser test: {missing}")
        pytest.skip(f"headless Chromium unavailable: {missing}")

    page = web["client"].get("/")
    assert page.status_code == 200 and 'id="results"' in page.text
    driver = chromium_driver(900, 700)
    try:
        with background_server(web["app"]) as url:
            cards = run_query(driver, url + "/", "a photo of a bag", top_k=6)
            expected = [h.id for h in web["index"].search(text="a photo of a bag", top_k=6)]
            assert [c.get_attribute("data-id") for c in cards] == expected
            assert "a photo of a bag" in driver.find_element(By.ID, "status").text
            target = cards[3].get_attribute("data-id")
            cards[3].click()  # more like this: the clicked image comes first
            WebDriverWait(driver, 20).until(lambda d: "more like this" in d.find_element(By.ID, "status").text)
            first = driver.find_element(By.CSS_SELECTOR, "#results .result")
            assert first.get_attribute("data-id") == target
            driver.find_element(By.ID, "image").send_keys(str(web["files"]["pullover_1"]))  # upload: searches
            WebDriverWait(driver, 20).until(lambda d: "pullover_1.png" in d.find_element(By.ID, "status").text)
            first = driver.find_element(By.CSS_SELECTOR, "#results .result")
            assert first.get_attribute("data-id") == web["ids"]["pullover_1"]
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        driver.quit()
