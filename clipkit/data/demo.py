"""Built-in synthetic captioned dataset: procedurally drawn shapes with natural-language captions.

Every split is a pure function of the seed, so the demo and the tests never download anything.
Layout written by `write_demo(OUT)`:

    OUT/train/shard-000000.tar ... + sizes.json   img2dataset layout: key.jpg, key.txt, key.json
    OUT/eval/shard-000000.tar ...  + sizes.json   same layout, only held-out (shape, colour) pairs
    OUT/zeroshot/{shape,colour}/                  CLIP_benchmark `wds/` layout (builder.py):
        {train,test}/0.tar ... + nshards.txt      key.png, key.cls (class index), key.json
        classnames.txt, zeroshot_classification_templates.txt
    OUT/demo.json                                 the summary `write_demo` returns
    OUT/.clipkit-output                           marker: a later demo may replace this folder

Captions name the shape and the colour; `captions="no-colour"` (`clipkit data demo --captions
no-colour`) writes the same images with captions that never name the colour.

The eval split and the zero-shot `test` splits use only (shape, colour) combinations that never
appear in training, so they measure compositional generalisation rather than memorisation.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipkit.config import ConfigError
from clipkit.data.demo_draw import (
    BACKGROUNDS,
    COLOURS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_scene,
)
from clipkit.data.tarwrite import write_tar
from clipkit.fileio import (
    check_writable,
    guard_output_dir,
    make_temp_dir,
    write_marker,
    writing,
)

HELD_OUT_FRACTION = 0.2
DEMO_KIND = "demo"  # the marker kind of folders `clipkit data demo` wrote (clipkit.fileio)

_COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left of the image", "towards the left"),
    "right": ("on the right", "on the right side", "at the right of the image", "to the right"),
    "top": ("at the top", "near the top", "in the upper part of the picture", "up high"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the picture", "down low"),
    "center": ("in the center", "in the middle", "in the centre of the frame", "centered"),
}
_BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "against a plain backdrop", "on a flat background"),
    "gradient": ("on a gradient background", "against a smooth gradient", "over a colour fade"),
    "striped": ("against a striped background", "on stripes", "over a striped pattern"),
    "noisy": ("on a noisy background", "against a speckled texture", "over a grainy backdrop"),
}
_COLOUR_FREE = {"over a colour fade": "over a soft fade"}  # no-colour captions avoid the word
CAPTION_SETS = ("all", "no-colour")  # `no-colour`: shape, size, count, position, background
_TEMPLATES = (
    "a photo of {np}{where}.", "{np}{where}", "an image of {np}{where}.",
    "a picture showing {np}{where}", "a drawing of {np}{where}.",
    "a simple illustration of {np}{where}", "there {be} {np}{where}.", "a rendering of {np}{where}",
    "a synthetic scene with {np}{where}.", "this image contains {np}{where}",
    "a clip art of {np}{where}.", "a cartoon of {np}{where}", "we see {np}{where}.",
    "a graphic with {np}{where}", "a computer-generated picture of {np}{where}.",
    "in this picture there {be} {np}{where}", "a toy scene: {np}{where}.",
    "a snapshot of {np}{where}",
)  # fmt: skip
ZEROSHOT_TEMPLATES = {
    "shape": ("a photo of a {c}.", "a drawing of a {c}.", "a {c} shape.", "an image of a {c}.",
              "a picture of a {c}.", "a rendering of a {c}."),
    "colour": ("a photo of a {c} object.", "a drawing of a {c} shape.", "something {c}.",
               "an image of {c} shapes.", "a picture of a {c} thing.", "the colour {c}."),
}  # fmt: skip


def held_out_combos(seed: int) -> tuple[tuple[str, str], ...]:
    """The (shape, colour) pairs that never appear in training, ~HELD_OUT_FRACTION of all pairs.

    Pairing the i-th shape and i-th colour of two seeded permutations (i cycling) gives distinct
    pairs that spread evenly: every shape and every colour is held out at least once (so each class
    has zero-shot test images) and at most twice (so each keeps most of its pairs in training).
    """
    rng = np.random.default_rng([seed, 0])
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    n_held = max(len(SHAPES), len(COLOURS), round(HELD_OUT_FRACTION * len(SHAPES) * len(COLOURS)))
    combos = {(shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(n_held)}
    return tuple(sorted(combos))


def train_combos(seed: int) -> tuple[tuple[str, str], ...]:
    held = set(held_out_combos(seed))
    return tuple((s, c) for s in SHAPES for c in COLOURS if (s, c) not in held)


def sample_attrs(rng: np.random.Generator, allowed_combos: Sequence[tuple[str, str]]) -> dict:
    """Draw one scene description: a (shape, colour) pair from `allowed_combos` plus layout."""
    shape, colour = allowed_combos[rng.integers(len(allowed_combos))]
    return {
        "shape": shape,
        "colour": colour,
        "count": int(rng.integers(1, 4)),
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
    }


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def caption(rng: np.random.Generator, attrs: dict, name_colour: bool = True) -> str:
    """A varied English caption that always names the shape and, unless `name_colour` is off, the
    colour (size, position and background are each mentioned only some of the time, as in real
    alt-text).

    Without the colour the caption makes the very same random draws and only leaves the colour
    words out, so the images and every later caption of a split stay those of the colour version:
    the two caption sets differ in their text alone."""
    count, colour = attrs["count"], attrs["colour"]
    noun = attrs["shape"] if count == 1 else PLURALS[attrs["shape"]]
    size = _pick(rng, _SIZE_WORDS[attrs["size"]]) if rng.random() < 0.6 else ""
    if rng.random() < 0.75:
        phrase = " ".join(w for w in (size, colour if name_colour else "", noun) if w)
    else:
        phrase = " ".join(w for w in (size, noun) if w)
        linker = _pick(rng, (" in ", " coloured "))
        phrase += linker + colour if name_colour else ""
    det = _pick(rng, _COUNT_WORDS[count])
    if det == "a" and phrase[0] in "aeiou":
        det = "an"
    where = ""
    if rng.random() < 0.7:
        where += " " + _pick(rng, _POSITION_PHRASES[attrs["position"]])
    if rng.random() < 0.4:
        background = _pick(rng, _BACKGROUND_PHRASES[attrs["background"]])
        where += " " + (background if name_colour else _COLOUR_FREE.get(background, background))
    template = _pick(rng, _TEMPLATES)
    return template.format(np=f"{det} {phrase}", where=where, be="is" if count == 1 else "are")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _write_shards(
    folder: Path, samples: Iterator, total: int, shard_size: int, name: str
) -> dict[str, int]:
    """Split `total` samples into shards named `name.format(i)`; returns {shard name: count}."""
    folder.mkdir(parents=True)
    sizes = {}
    for i, start in enumerate(range(0, total, shard_size)):
        count = min(shard_size, total - start)
        shard = name.format(i)
        sizes[shard] = write_tar(folder / shard, (next(samples) for _ in range(count)))
    return sizes


def _captioned(
    rng: np.random.Generator, combos, n: int, image_size: int, name_colour: bool = True
) -> Iterator:
    """img2dataset-style samples (key.jpg, key.txt, key.json) for pairs in `combos`; the json
    records every attribute (the colour too) whatever the caption names."""
    for i in range(n):
        attrs = sample_attrs(rng, combos)
        image = draw_scene(rng, attrs, image_size)
        attrs["caption"] = caption(rng, attrs, name_colour=name_colour)
        key = f"{i:09d}"
        meta = json.dumps({"key": key, **attrs}, sort_keys=True)
        yield (
            key,
            {
                "jpg": _encode(image, "JPEG"),
                "txt": attrs["caption"].encode("utf-8"),
                "json": meta.encode("utf-8"),
            },
        )


def _labelled(rng: np.random.Generator, task: str, combos, n: int, image_size: int) -> Iterator:
    """CLIP_benchmark-style samples (key.png, key.cls) with class counts differing by <= 1; the
    scene attributes ride along as key.json (the benchmark's loader ignores them)."""
    classes = list(SHAPES) if task == "shape" else list(COLOURS)
    labels = rng.permutation(np.arange(n) % len(classes))
    field = 0 if task == "shape" else 1
    by_class = {c: [combo for combo in combos if combo[field] == c] for c in classes}
    for i, label in enumerate(labels):
        attrs = sample_attrs(rng, by_class[classes[label]])
        image = draw_scene(rng, attrs, image_size)
        meta = json.dumps(attrs, sort_keys=True).encode("utf-8")
        yield (
            f"s{i:07d}",
            {"png": _encode(image, "PNG"), "cls": str(int(label)).encode(), "json": meta},
        )


def _write_captioned(folder: Path, samples: Iterator, n: int, shard_size: int) -> dict:
    sizes = _write_shards(folder, samples, n, shard_size, "shard-{:06d}.tar")
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return {"dir": folder.name, "shards": sorted(sizes), "samples": sum(sizes.values())}


def _write_zeroshot(task: str, root: Path, splits: dict, image_size: int, shard_size: int) -> dict:
    """One CLIP_benchmark `wds/` dataset: root/{train,test}/{0..k}.tar + nshards.txt + metadata."""
    classes = list(SHAPES) if task == "shape" else list(COLOURS)
    counts = {}
    for split, (rng, combos, n) in splits.items():
        samples = _labelled(rng, task, combos, n, image_size)
        sizes = _write_shards(root / split, samples, n, shard_size, "{}.tar")
        (root / split / "nshards.txt").write_text(f"{len(sizes)}\n")
        counts[split] = sum(sizes.values())
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    templates = "\n".join(ZEROSHOT_TEMPLATES[task]) + "\n"
    (root / "zeroshot_classification_templates.txt").write_text(templates)
    return {"dir": f"zeroshot/{task}", "classnames": classes, **counts}


def _write_splits(
    root: Path,
    seed: int,
    n_train: int,
    n_eval: int,
    n_probe: int,
    image_size: int,
    shard_size: int,
    captions: str,
) -> dict:
    held, seen = held_out_combos(seed), train_combos(seed)
    # A probe's train split draws from every pair: were it limited to the pretraining pairs, a
    # probe could predict shape from colour there and fail by construction on held-out pairs.
    every = tuple(sorted(held + seen))
    # Independent streams per split, so changing one split's size leaves the others unchanged.
    rngs = [np.random.default_rng([seed, k]) for k in range(1, 7)]
    name_colour = captions == "all"
    train = _captioned(rngs[0], seen, n_train, image_size, name_colour)
    held_out = _captioned(rngs[1], held, n_eval, image_size, name_colour)
    zeroshot = {
        task: _write_zeroshot(task, root / "zeroshot" / task, {
            "train": (rngs[2 + 2 * t], every, n_probe), "test": (rngs[3 + 2 * t], held, n_eval),
        }, image_size, shard_size)
        for t, task in enumerate(("shape", "colour"))
    }  # fmt: skip
    return {
        "seed": seed,
        "image_size": image_size,
        "captions": captions,
        "held_out_combos": [list(c) for c in held],
        "train_combos": [list(c) for c in seen],
        "train": _write_captioned(root / "train", train, n_train, shard_size),
        "eval": _write_captioned(root / "eval", held_out, n_eval, shard_size),
        "zeroshot": zeroshot,
    }


def write_demo(
    out: str | Path,
    *,
    seed: int = 0,
    train_samples: int = 5000,
    eval_samples: int = 500,
    probe_train_samples: int = 1000,
    image_size: int = 64,
    shard_size: int = 1000,
    captions: str = "all",
) -> dict:
    """Write the whole synthetic dataset under `out` and return a summary (also saved as
    `out/demo.json`).

    `captions`: `all` names shape and colour (plus, some of the time, size, count, position and
    background); `no-colour` never names the colour (a task on which colour-changing augmentation
    does not contradict the text). Images, attributes and the zero-shot sets are the same.

    `out` must be new, empty, or an earlier demo output (its `.clipkit-output` marker says so):
    a folder holding anything else (a user's own train/ or eval/ shards...) is refused, so a
    demo never deletes data it did not write. In an earlier demo output, `train`, `eval`,
    `zeroshot` and `demo.json` are replaced; other files are left alone. Everything is built in
    a hidden `out/.tmp-demo-*` folder and renamed into place only once complete, so a failure
    never leaves half-written shards."""
    sizes = {
        "train_samples": train_samples,
        "eval_samples": eval_samples,
        "probe_train_samples": probe_train_samples,
        "shard_size": shard_size,
    }
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1 (got {value})")
    if captions not in CAPTION_SETS:
        raise ConfigError(f"captions must be one of {', '.join(CAPTION_SETS)} (got {captions!r})")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16 (got {image_size})")
    # an earlier demo output is replaced without a flag: the demo rewrites only its own entries
    out = guard_output_dir(out, DEMO_KIND, overwrite=True, command="data demo", renamed=False)
    check_writable(out / "demo.json")  # written inside `out`, not next to it
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out, ".tmp-demo-")
    try:
        with writing(out):
            summary = _write_splits(
                tmp, seed, train_samples, eval_samples, probe_train_samples, image_size, shard_size,
                captions,
            )  # fmt: skip
            (tmp / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
            write_marker(out, DEMO_KIND)  # first: a swap that fails midway stays replaceable
            for name in ("train", "eval", "zeroshot", "demo.json"):
                if (out / name).exists():  # park the old copy in tmp; the finally deletes it
                    os.replace(out / name, tmp / f"old-{name}")
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), **summary}


def preview_grid(out_png: str | Path, seed: int = 0, n: int = 16, image_size: int = 64) -> None:
    """Save a grid of `n` training-style samples with their captions, for eyeballing."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.6 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    samples = _captioned(np.random.default_rng([seed, 1]), train_combos(seed), n, image_size)
    for ax, (_, fields) in zip(axes[:n], samples, strict=True):
        ax.imshow(Image.open(io.BytesIO(fields["jpg"])), interpolation="nearest")
        ax.set_title(textwrap.fill(fields["txt"].decode(), 34), fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
