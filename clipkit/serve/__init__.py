"""`clipkit retrieve serve`: index directories behind an HTTP service that speaks clip-retrieval's
back API (`/knn-service`, `/metadata`, `/indices-list`), with a health endpoint and a small web
page. Queries wait in a bounded queue; a worker encodes the waiting ones in one batch and
searches each index once for all of them."""

from clipkit.serve.app import ServeSettings, create_app
from clipkit.serve.collection import Collection
from clipkit.serve.server import run_server
from clipkit.serve.worker import BatchWorker, Encoder

__all__ = [
    "BatchWorker",
    "Collection",
    "Encoder",
    "ServeSettings",
    "create_app",
    "run_server",
]
