"""`clipkit zero-shot`: parse, call the library's zero-shot evaluation, print the metrics."""

from __future__ import annotations

import click

from clipkit.cli import options
from clipkit.cli.main import run_guarded


@click.command(name="zero-shot")
@options.dataset_options
@click.option("--split", default="test", show_default=True, help="Split folder (wds, demo).")
@options.model_options
@options.run_options
def zero_shot(split, output, **kwargs):
    """Zero-shot classification: top-1, top-5 and mean per-class recall.

    \b
    Examples:
      clipkit zero-shot demo --data-root demo_data --checkpoint runs/demo
      clipkit zero-shot imagenet --data-root /data/imagenet --model ViT-B-32 --pretrained w.pt
      clipkit zero-shot wds --data-root /data/wds_cifar10 --checkpoint runs/x -o cifar10.json
    """
    from clipkit.eval.zero_shot import run_zero_shot

    chosen, reading, loaded, dev = options.load_for_dataset(kwargs, output)
    data = chosen.load(split, loaded.preprocess)
    result = run_guarded(run_zero_shot, loaded, data, device=dev, reading=reading)
    n = result["clipkit"]["num_samples"]
    title = (
        f"zero-shot {data.name} ({n} images, {len(data.classnames)} classes, "
        f"{len(data.templates)} templates; chance top-1 {100 / len(data.classnames):.2f}%)"
    )
    options.echo_metrics(result, title)
    options.write_output(output, result)
