"""`clipkit retrieve serve` end to end: a real server process on a free loopback port over an
index built by `clipkit retrieve index`, asked by text, image (base64, file URL) and embedding,
checked against `clipkit retrieve search` on the same index; bad requests; clip-retrieval's own
ClipClient (reference venv); the web page in a headless browser; SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from cli_util import invoke
from serve_util import ROOT, Server

pytestmark = pytest.mark.slow
CLIPRETRIEVAL_PYTHON = ROOT / ".venv-clipretrieval" / "bin" / "python"


@pytest.fixture(scope="module")
def index_dir(tiny_checkpoint, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "idx"
    args = ["retrieve", "index", "-c", tiny_checkpoint, "--data", demo_root / "eval"]
    assert invoke(*args, "--out", out, "--workers", 0).exit_code == 0
    return out


@pytest.fixture(scope="module")
def query_image(demo_root, tmp_path_factory) -> Path:
    """An image of the demo's eval split as a file of its own (the query of image searches)."""
    shard = sorted((demo_root / "eval").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith((".jpg", ".png", ".webp")))
        data = tar.extractfile(member).read()
    path = tmp_path_factory.mktemp("query") / ("query" + Path(member.name).suffix)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def server(index_dir):
    srv = Server("--index", f"demo={index_dir}", "--max-results", "50")
    yield srv
    srv.stop()


def search(index_dir, *args) -> list[dict]:
    """The reference: `clipkit retrieve search --json` on the same index."""
    result = invoke("retrieve", "search", "--index", index_dir, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def assert_same_hits(got: list[dict], want: list[dict]) -> None:
    assert [g["id"] for g in got] == [w["row"] for w in want]
    assert [g["key"] for g in got] == [w["key"] for w in want]
    assert [g["caption"] for g in got] == [w["caption"] for w in want]
    np.testing.assert_allclose(
        [g["similarity"] for g in got], [w["score"] for w in want], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("text", ["a red star", "two small blue circles on a plain backdrop"])
def test_text_query_matches_retrieve_search(server, index_dir, demo_root, text):
    got = server.knn(text=text, num_images=6, modality="image")
    assert_same_hits(got, search(index_dir, "--text", text, "-k", 6))
    # Each result carries its image inline: the bytes of its member in the indexed shard.
    from clipkit.data.eval_pairs import read_image_bytes

    row = json.loads((index_dir / "metadata.jsonl").read_text().splitlines()[got[0]["id"]])
    stored = read_image_bytes([(row["source"], row["key"])])[(row["source"], row["key"])]
    assert base64.b64decode(got[0]["image"]) == stored


def test_image_query_base64_and_file_url(server, index_dir, query_image):
    want = search(index_dir, "--image", query_image, "-k", 5)
    encoded = base64.b64encode(query_image.read_bytes()).decode()
    assert_same_hits(server.knn(image=encoded, num_images=5), want)
    assert_same_hits(server.knn(image_url=query_image.as_uri(), num_images=5), want)


def test_embedding_query_matches_search_index_dir(server, index_dir):
    from clipkit.eval.retrieval import open_index_dir, search_index_dir

    vector = np.load(index_dir / "image_embeddings.npy")[7]
    got = server.knn(embedding_input=vector.tolist(), num_images=4)
    assert_same_hits(got, search_index_dir(open_index_dir(index_dir), vector[None], 4))
    assert got[0]["id"] == 7 and got[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_result_ids_past_num_images_carry_no_metadata(server, index_dir):
    """clip-retrieval's shape: num_result_ids ids with similarities, metadata for the first
    num_images (clip-front fetches the rest through /metadata)."""
    got = server.knn(text="a red star", num_images=2, num_result_ids=6)
    want = search(index_dir, "--text", "a red star", "-k", 6)
    assert [g["id"] for g in got] == [w["row"] for w in want]
    assert all("caption" in g for g in got[:2])
    assert [sorted(g) for g in got[2:]] == [["id", "similarity"]] * 4
    status, metas = server.call("/metadata", {"ids": [g["id"] for g in got[2:]]})
    assert status == 200
    assert [m["metadata"]["caption"] for m in metas] == [w["caption"] for w in want[2:]]


def test_metadata_lists_and_health(server, index_dir):
    rows = [json.loads(line) for line in (index_dir / "metadata.jsonl").read_text().splitlines()]
    status, metas = server.call("/metadata", {"ids": [3, 0, 999], "indice_name": "demo"})
    assert status == 200 and [m["id"] for m in metas] == [3, 0, 999]
    assert [m["metadata"].get("caption") for m in metas] == [
        rows[3]["caption"],
        rows[0]["caption"],
        None,
    ]
    assert server.call("/indices-list") == (200, ["demo"])
    status, health = server.call("/health")
    assert status == 200 and health["status"] == "ok"
    assert health["indices"][0]["images"] == len(rows) and health["indices"][0]["name"] == "demo"


NOT_AN_IMAGE = base64.b64encode(b"these bytes are not an image").decode()
BAD_REQUESTS = [
    ("/knn-service", b"{bad json", 400),
    ("/knn-service", b"", 400),
    ("/knn-service", b"[1, 2]", 400),
    ("/knn-service", {"text": ""}, 400),
    ("/knn-service", {"text": "   "}, 400),
    ("/knn-service", {"text": 5}, 400),
    ("/knn-service", {}, 400),
    ("/knn-service", {"text": "a star", "image": NOT_AN_IMAGE}, 400),
    ("/knn-service", {"text": "a star", "indice_name": "nope"}, 404),
    ("/knn-service", {"text": "a star", "num_images": 10**9}, 400),
    ("/knn-service", {"text": "a star", "num_images": "ten"}, 400),
    ("/knn-service", {"text": "a star", "num_result_ids": 0}, 400),
    ("/knn-service", {"text": "a star", "modality": "audio"}, 400),
    ("/knn-service", {"text": "a star", "modality": "text"}, 400),
    ("/knn-service", {"text": "a star", "deduplicate": "yes"}, 400),
    ("/knn-service", {"image": "!!! not base64 !!!"}, 400),
    ("/knn-service", {"image": NOT_AN_IMAGE}, 400),
    ("/knn-service", {"image_url": "ftp://example.invalid/x.png"}, 400),
    ("/knn-service", {"image_url": "file:///no/such/image.png"}, 400),
    ("/knn-service", {"embedding_input": [1.0, 2.0]}, 400),
    ("/knn-service", {"embedding_input": ["a", "b"]}, 400),
    ("/metadata", {"ids": "0,1"}, 400),
    ("/metadata", {"ids": [0], "indice_name": "nope"}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS)
def test_bad_request_is_a_4xx_json_error_and_the_server_goes_on(server, path, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = server.call(path, raw=raw)
    assert got == status, answer
    assert isinstance(answer, dict) and isinstance(answer["error"], str) and answer["error"]
    assert "Traceback" not in answer["error"] and "Traceback" not in server.stderr()
    assert server.call("/health")[0] == 200
    assert len(server.knn(text="a red star", num_images=1)) == 1


def test_concurrent_clients_get_the_answers_of_single_queries(server):
    texts = ["a red star", "a green triangle", "two small blue circles", "a white cross"] * 4
    alone = {t: server.knn(text=t, num_images=3) for t in set(texts)}
    before = server.call("/health")[1]["queries"]
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(lambda t: server.knn(text=t, num_images=3), texts))
    for text, got in zip(texts, answers, strict=True):
        assert [g["id"] for g in got] == [a["id"] for a in alone[text]]
        np.testing.assert_allclose(
            [g["similarity"] for g in got], [a["similarity"] for a in alone[text]], atol=1e-5
        )
    assert server.call("/health")[1]["queries"] == before + len(texts)


CLIENT_SCRIPT = """
import json, sys
from clip_retrieval.clip_client import ClipClient, Modality
url, image, vector, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
client = ClipClient(url=url + "/knn-service", indice_name="demo", num_images=5,
                    deduplicate=False, modality=Modality.IMAGE)
answers = {"text": client.query(text="a red star"), "image": client.query(image=image),
           "embedding": client.query(embedding_input=vector),
           "dedup": ClipClient(url=url + "/knn-service", indice_name="demo",
                               num_images=5).query(text="a red star")}
json.dump(answers, open(out, "w"))
"""


def test_clip_retrieval_client(server, index_dir, query_image, tmp_path):
    if not CLIPRETRIEVAL_PYTHON.is_file():
        pytest.skip(
            "no clip-retrieval reference venv (.venv-clipretrieval): "
            "bash scripts/setup_reference_retrieval.sh"
        )
    vector = np.load(index_dir / "image_embeddings.npy")[11]
    out = tmp_path / "answers.json"
    cmd = [str(CLIPRETRIEVAL_PYTHON), "-c", CLIENT_SCRIPT, server.url, str(query_image)]
    done = subprocess.run(
        [*cmd, json.dumps(vector.tolist()), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(out.read_text())
    assert_same_hits(answers["text"], search(index_dir, "--text", "a red star", "-k", 5))
    assert_same_hits(answers["image"], search(index_dir, "--image", query_image, "-k", 5))
    assert [a["id"] for a in answers["embedding"]][0] == 11
    # ClipClient deduplicates by default: what is left keeps the order of the full answer.
    full = [a["id"] for a in answers["text"]]
    kept = [a["id"] for a in answers["dedup"]]
    assert kept and kept[0] == full[0] and kept == [i for i in full if i in kept]


def _launch_browser(playwright):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        return (
            playwright.chromium.launch(executable_path=exe) if exe else playwright.chromium.launch()
        )
    except Exception as e:  # no browser build for Playwright and no Debian chromium
        pytest.skip(f"no headless Chromium for Playwright ({str(e).splitlines()[0]})")


def test_web_page_in_headless_browser(server, index_dir, query_image, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    want = search(index_dir, "--text", "a red star", "-k", 8)
    with sync_api.sync_playwright() as p:
        browser = _launch_browser(p)
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        page.goto(server.url + "/")
        page.wait_for_selector("#indice option[value=demo]", state="attached")
        page.fill("#num", "8")
        page.fill("#text", "a red star")
        page.click("#go")
        page.wait_for_selector(".card >> nth=7")
        assert page.locator(".card .caption").all_inner_texts() == [w["caption"] for w in want]
        scores = [s.split("·")[1].strip() for s in page.locator(".card .score").all_inner_texts()]
        assert scores == [f"{w['score']:.4f}" for w in want]
        assert page.locator(".card img").count() == 8
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        by_image = search(index_dir, "--image", query_image, "-k", 8)
        page.set_input_files("#file", str(query_image))
        # "searching: NAME" comes first; the results are drawn before "N results for NAME"
        page.wait_for_function(
            "document.getElementById('status').textContent.includes("
            f"'results for {query_image.name}')"
        )
        assert page.locator(".card .key").all_inner_texts() == [w["key"] for w in by_image]
        browser.close()
    if os.environ.get("CLIPKIT_SERVE_SCREENSHOT"):  # refreshes docs/images/serve.png
        shutil.copy(shot, os.environ["CLIPKIT_SERVE_SCREENSHOT"])
    from PIL import Image

    assert Image.open(io.BytesIO(shot.read_bytes())).size[0] == 1100


def test_sigterm_ends_the_server_cleanly(server):
    """Last: SIGTERM -> uvicorn stops, the worker drains, exit code 0, no traceback."""
    assert server.stop() == 0
    assert "Traceback" not in server.stderr()
