"""Run in clip-retrieval's venv (.venv-clipretrieval) by scripts/bench_serve.py: serve a clipkit
index directory's vectors with `clip-retrieval back`.

    python clip_back_ref.py INDEX_DIR WORK_DIR PORT

It lays out clip-retrieval's indice folder in WORK_DIR (image.index linked to clipkit's, the
captions as metadata/0.parquet) and starts clip_back on PORT with an open_clip ViT-B-32 of random
weights saved locally (clip_back must load a CLIP model, and no weights can be downloaded here):
the benchmark queries it by `embedding_input`, so that model only costs start-up time. No mclip,
no aesthetic embeddings, no safety models (those need downloads too)."""

import json
import os
import sys
from pathlib import Path

index_dir, work, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
indice = work / "indice"
(indice / "metadata").mkdir(parents=True, exist_ok=True)
if not (indice / "image.index").exists():
    os.symlink(index_dir.resolve() / "image.index", indice / "image.index")
parquet = indice / "metadata" / "0.parquet"
if not parquet.exists():
    import pandas as pd

    with open(index_dir / "metadata.jsonl", encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line in f]
    pd.DataFrame({"caption": captions}).to_parquet(parquet)
weights = work / "vit-b-32-random.pt"
if not weights.exists():
    import open_clip
    import torch

    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
(work / "indices.json").write_text(json.dumps({"bench": str(indice)}))

from clip_retrieval.clip_back import clip_back  # noqa: E402

clip_back(
    indices_paths=str(work / "indices.json"),
    port=port,
    clip_model=f"open_clip:ViT-B-32/{weights}",
    use_jit=False,
    enable_mclip_option=False,
    provide_aesthetic_embeddings=False,
    columns_to_return=["caption"],
)
