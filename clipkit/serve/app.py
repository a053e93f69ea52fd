"""The FastAPI application: clip-retrieval's back routes over clipkit index directories, the
health endpoint and the web page. Handlers only read and check the request, hand the search to
the BatchWorker and shape its answer; blocking work (image fetch and decoding, reading result
images) runs in threads so the event loop keeps answering."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse

from clipkit.serve.collection import Collection
from clipkit.serve.images import fetch_image
from clipkit.serve.query import BadRequest, KnnQuery, parse_knn, parse_metadata
from clipkit.serve.worker import BatchWorker, Job, QueueFull

log = logging.getLogger(__name__)
BODY_SLACK = 64 * 1024  # room for the other JSON fields next to a base64 image


@dataclass(frozen=True)
class ServeSettings:
    """The service's limits and switches (the `clipkit retrieve serve` options)."""

    workers: int = 1
    max_batch: int = 32
    queue_size: int = 256
    max_results: int = 1000
    max_image_bytes: int = 16 * 2**20
    file_urls: bool = True
    cors_origins: tuple[str, ...] = ()


def _page() -> str:
    return resources.files("clipkit.serve").joinpath("static/index.html").read_text("utf-8")


async def _json_body(request: Request, settings: ServeSettings) -> Any:
    limit = settings.max_image_bytes * 4 // 3 + BODY_SLACK
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is larger than {limit:,} bytes", status=413)
    body = await request.body()
    if len(body) > limit:
        raise BadRequest(f"the request body is larger than {limit:,} bytes", status=413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None


class Service:
    """What the routes share: the collections by name, the worker and the settings."""

    def __init__(self, collections: dict[str, Collection], settings: ServeSettings):
        if not collections:
            raise ValueError("serve needs at least one index")
        self.collections, self.settings = collections, settings
        self.default = next(iter(collections))
        self.worker = BatchWorker(settings.workers, settings.max_batch, settings.queue_size)

    def collection(self, name: str) -> Collection:
        if name not in self.collections:
            raise BadRequest(
                f"unknown indice_name {name!r}; this server has: {', '.join(self.collections)}",
                status=404,
            )
        return self.collections[name]

    async def payload(self, query: KnnQuery, coll: Collection) -> Any:
        """What the worker needs: the text, the preprocessed image, or the vector."""
        if query.kind == "text":
            return query.text
        if query.kind == "embedding":
            coll.check_vector(query.embedding)
            return query.embedding
        data = query.image_bytes
        if data is None:
            limit, files = self.settings.max_image_bytes, self.settings.file_urls
            data = await asyncio.to_thread(fetch_image, query.image_url, limit, files)
        return await asyncio.to_thread(coll.encoder.pixels, data)

    async def knn(self, body: Any) -> list[dict[str, Any]]:
        s = self.settings
        query = parse_knn(body, self.default, s.max_results, s.max_image_bytes)
        coll = self.collection(query.indice_name)
        if query.modality == "text":
            raise BadRequest(
                "modality 'text' searches an index of captions, and clipkit index directories "
                "hold image embeddings only: use modality 'image' (text and image queries both "
                "find images)"
            )
        payload = await self.payload(query, coll)
        job = Job(coll, query.kind, payload, query.num_result_ids)
        scores, ids = await asyncio.wrap_future(self.worker.submit(job))
        return await asyncio.to_thread(
            coll.results, scores, ids, query.num_images, query.deduplicate
        )

    def health(self) -> dict[str, Any]:
        stats = self.worker.stats
        return {
            "status": "ok",
            "indices": [c.describe() for c in self.collections.values()],
            "queued": self.worker.waiting(),
            "queue_size": self.settings.queue_size,
            "batches": stats.batches,
            "queries": stats.queries,
            "largest_batch": stats.largest_batch,
        }


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(QueueFull)
    async def busy(_: Request, e: QueueFull):
        return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):  # logged here, never sent to clients
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)


def create_app(collections: dict[str, Collection], settings: ServeSettings) -> FastAPI:
    """The application; its worker starts with the app and drains when the app stops."""
    service = Service(collections, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.close)

    app = FastAPI(title="clipkit retrieve serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"]
        )

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return _page()

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/indices-list")
    async def indices_list():
        return list(service.collections)

    @app.post("/knn-service")
    async def knn_service(request: Request):
        return await service.knn(await _json_body(request, settings))

    @app.post("/metadata")
    async def metadata(request: Request):
        body = await _json_body(request, settings)
        name, ids = parse_metadata(body, service.default, settings.max_results)
        return await asyncio.to_thread(service.collection(name).metadata, ids)

    return app
