"""`clipkit pretrain`'s flag table: every flag, the config field it sets, its type and its help.
`clipkit.cli.pretrain` turns the rows into click options (and adds the methods' own settings)."""

from __future__ import annotations

import click


class FloatPair(click.ParamType):
    """`LO,HI` -> [LO, HI] (two numbers, comma-separated)."""

    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            lo, hi = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not two numbers LO,HI (e.g. 0.5,1)", param, ctx)
        return [lo, hi]


# (flag, "section.key", click type, help). Defaults live in clipkit.config, not here: a flag the
# user did not give stays None so the YAML file (or a resumed run's config) can supply it. The
# methods' own settings get their flags from their settings classes (`method_flag_rows`).
FLAGS = [
    (
        "--data",
        "data.data",
        str,
        "Shards: a directory of *.tar, a brace pattern, a URL "
        "(pipe:, http), or several joined by '::'.",
    ),
    (
        "--out",
        "run.out",
        str,
        "Run directory (config.yaml, metrics.jsonl, checkpoints/, curves.png).",
    ),
    (
        "--model",
        "model.name",
        str,
        "Model: clipkit preset (tiny, test, msclip-b32...), open_clip "
        "name (ViT-B-32), an open_clip-style JSON file, or local-dir:DIR. See `clipkit models`.",
    ),
    (
        "--method",
        "method.name",
        str,
        "Training method: {methods}; a method registered with clipkit.methods.register works too.",
    ),
    (
        "--pretrained",
        "model.pretrained",
        str,
        "Local weights to start from: an open_clip state_dict "
        "file, or MS-CLIP weights (clipkit or official layout).",
    ),
    ("--image-size", "model.image_size", int, "Override the model's image size."),
    ("--context-length", "model.context_length", int, "Override the text context length."),
    (
        "--image-pool",
        "model.image_pool",
        str,
        "Image token pooling of ViT towers: cls (default), avg, max, gem, ggem, attn.",
    ),
    (
        "--text-tower",
        "model.text_tower",
        str,
        "hf:LOCAL_DIR: a pretrained Hugging Face text "
        "encoder from a local directory instead of the model's own text tower.",
    ),
    (
        "--lock-image-unlocked-layers",
        "model.lock_image_unlocked_layers",
        int,
        "With --lock-image: leave the last N image blocks trainable.",
    ),
    (
        "--lock-text-unlocked-layers",
        "model.lock_text_unlocked_layers",
        int,
        "With --lock-text: leave the last N text blocks trainable.",
    ),
    ("--batch-size", "data.batch_size", int, "Samples per rank per micro-batch (default 64)."),
    ("--steps", "run.steps", int, "Optimizer steps to train (or give --samples)."),
    ("--samples", "run.samples", int, "Samples to train on, over all ranks (or give --steps)."),
    ("--lr", "optim.lr", float, "Peak learning rate (default 5e-4)."),
    ("--warmup", "optim.warmup", int, "Linear warmup steps (default 100)."),
    (
        "--warmup-epochs",
        "optim.warmup_epochs",
        float,
        "Warmup over this many epochs of the data instead of --warmup steps (A-CLIP: 1).",
    ),
    (
        "--warmup-start-lr",
        "optim.warmup_start_lr",
        float,
        "Learning rate the linear warmup starts from (default 0; A-CLIP: 1e-6).",
    ),
    (
        "--final-lr",
        "optim.final_lr",
        float,
        "Learning rate the cosine schedule ends at (default 0; A-CLIP: 1e-5).",
    ),
    (
        "--weight-decay",
        "optim.weight_decay",
        float,
        "AdamW weight decay on weight matrices "
        "(default 0.2; never on biases, norms, embeddings, temperature).",
    ),
    (
        "--wd-rule",
        "optim.wd_rule",
        click.Choice(["clipkit", "aclip"]),
        "Which parameters get weight decay: clipkit (default, open_clip's: weight matrices only, "
        "not biases, norms, embeddings, temperature) or aclip (the official A-CLIP/SLIP rule: "
        "every parameter of 2+ dimensions whose name has no 'bias', 'ln' or 'bn', so "
        "embeddings decay too).",
    ),
    ("--schedule", "optim.schedule", click.Choice(["cosine", "constant"]), "LR after warmup."),
    ("--grad-clip", "optim.grad_clip", float, "Clip the global gradient norm (default 1.0)."),
    (
        "--accum-steps",
        "optim.accum_steps",
        int,
        "Micro-batches per optimizer step, K: a step trains on K x --batch-size x ranks "
        "samples (see --accum-mode).",
    ),
    (
        "--accum-mode",
        "optim.accum_mode",
        click.Choice(["exact", "independent"]),
        "With --accum-steps K > 1: exact (default) computes the loss of the whole accumulated "
        "batch, every sample contrasted with every other, holding one micro-batch's "
        "activations (gradient caching: an extra forward per micro-batch, about 4/3 of the "
        "compute); independent makes each micro-batch its own contrastive problem (samples "
        "contrasted within their micro-batch only: cheaper, a weaker model).",
    ),
    (
        "--loss",
        "method.loss",
        click.Choice(["clip", "siglip"]),
        "Contrastive loss of every method: clip (InfoNCE over the global batch, default) or "
        "siglip (pairwise sigmoid, Zhai et al. 2023; the model gains a learnable logit bias, "
        "started at b = -10 with t = 10 unless the model options set them).",
    ),
    (
        "--distill-from",
        "method.distill_from",
        str,
        "Distil from a frozen teacher: a clipkit checkpoint or run directory, or local-dir:DIR "
        "(an open_clip export). Same embedding width and tokenizer as the student; it sees the "
        "student's batch (resized and renormalised to its own preprocessing).",
    ),
    (
        "--distill-weight",
        "method.distill_weight",
        float,
        "Weight of the distillation loss beside the contrastive one (default 1.0).",
    ),
    (
        "--shared-lr",
        "optim.shared_lr",
        float,
        "MS-CLIP: learning rate of the parameters both modalities share (default: --lr).",
    ),
    (
        "--shared-weight-decay",
        "optim.shared_weight_decay",
        float,
        "MS-CLIP: weight decay of the shared parameters (default: --weight-decay).",
    ),
    ("--workers", "data.workers", int, "DataLoader workers per rank (default 2)."),
    (
        "--train-num-samples",
        "data.train_num_samples",
        int,
        "Samples per epoch (default: from sizes.json next to the shards).",
    ),
    ("--shuffle-buffer", "data.shuffle_buffer", int, "Samples in each worker's shuffle buffer."),
    ("--image-key", "data.image_key", str, "Image member extensions, ';'-separated."),
    ("--text-key", "data.text_key", str, "Caption member extension (default txt)."),
    (
        "--max-bad-fraction",
        "data.max_bad_fraction",
        float,
        "Stop when more than this share of samples is unusable (default 0.01). A data worker "
        "that reads 1000 unusable samples in a row also stops the run (no batch could form); "
        "1 turns both off.",
    ),
    (
        "--max-pixels",
        "data.max_pixels",
        int,
        "Skip images with more pixels (decompression-bomb guard).",
    ),
    (
        "--stall-timeout",
        "data.stall_timeout",
        float,
        "Stop with an error naming the data worker "
        "and its shards when no batch arrives for this many seconds (default 600).",
    ),
    (
        "--augment",
        "data.augment",
        click.Choice(["clip", "slip", "aclip", "none"]),
        "Augmentation of the online training views, for every method: clip (open_clip's: random "
        "resized crop of 90-100% of the area), slip (crop 50-100%, SLIP's CLIP baseline), aclip "
        "(A-CLIP's: crop 50-100% plus colour jitter, grayscale, blur, solarize), none (resize + "
        "centre crop). Default: the method's paper pipeline (aclip for A-CLIP, clip otherwise).",
    ),
    (
        "--crop-scale",
        "data.crop_scale",
        FloatPair(),
        "Override the pipeline's random crop: LO,HI share of the image area (e.g. 0.5,1).",
    ),
    ("--seed", "run.seed", int, "Seed of the model init, data order and augmentations."),
    ("--device", "run.device", str, "auto (default), cpu, cuda or cuda:N."),
    (
        "--precision",
        "run.precision",
        click.Choice(["auto", "fp32", "bf16", "fp16"]),
        "auto = bf16 autocast on CUDA, fp32 on CPU. bf16 also pays on CPUs with AMX "
        "(lscpu lists amx_bf16): a ViT-S/16 training step ran 1.63x faster than fp32 on one. "
        "fp16 (GPUs without bf16: V100, T4) scales the loss; a step whose gradients overflow is "
        "skipped, counted (scaler_skipped_steps) and still counts as a step.",
    ),
    ("--save-every", "run.save_every", int, "Steps between checkpoints (default 1000)."),
    ("--keep-last", "run.keep_last", int, "Keep only the newest N step checkpoints."),
    ("--log-every", "run.log_every", int, "Steps between log lines / metrics.jsonl records."),
    (
        "--report-to",
        "run.report_to",
        str,
        "Where metrics go besides metrics.jsonl and curves.png: tensorboard (default), wandb "
        "(Weights & Biases: pip install wandb; WANDB_MODE=offline needs no network), both as "
        "tensorboard,wandb, or none.",
    ),
    (
        "--wandb-project",
        "run.wandb_project",
        str,
        "W&B project of --report-to wandb (default clipkit); the W&B run is named after --out "
        "and --resume continues it.",
    ),
    ("--threads", "run.threads", int, "torch CPU threads per process (default: cores/ranks)."),
    (
        "--eval-every",
        "eval.every",
        int,
        "Steps between evaluations (--eval, --val-data); the last step is always evaluated. "
        "Default: the last step only.",
    ),
    (
        "--val-data",
        "eval.val_data",
        str,
        "Held-out shards (a .tar or a directory of *.tar): their contrastive loss (--loss) at "
        "--batch-size, full images, no graph, logged as val/loss at each evaluation.",
    ),
    (
        "--keep-best",
        "eval.keep_best",
        str,
        "Keep checkpoints/best.pt at the best value of a logged metric: val/loss, "
        "eval/NAME/METRIC (eval/NAME/ema/METRIC for EMA weights); lower is better for names "
        "ending in 'loss', higher otherwise, or say so with :min / :max. "
        "Example: --keep-best eval/imagenet/acc1.",
    ),
    ("--eval-batch-size", "eval.batch_size", int, "Images per batch of --eval (default 64)."),
    ("--eval-workers", "eval.workers", int, "Data loader workers of --eval (default 2)."),
]
# Flags given any number of times; their values form a list that replaces the YAML file's.
REPEATED = [
    (
        "--eval",
        "eval.specs",
        "Evaluate while training (repeat for several): [NAME=]TASK:SOURCE[,KEY=VALUE...] with "
        "TASK:SOURCE one of zero-shot:DATASET:DIR, probe:DATASET:DIR (DATASET: imagenet, "
        "folder, wds, demo) or retrieval:DIR, and the stand-alone command's options "
        "(README 'Evaluation specs'). Logged as eval/NAME/METRIC, results in "
        "RUN_DIR/eval/step-N/NAME.json. Example: --eval zero-shot:wds:/data/wds_cifar10 "
        "--eval pairs=retrieval:val_pairs,ks=1-5 --eval-every 500.",
    ),
]
SWITCHES = [
    ("--resampled/--no-resampled", "data.resampled", "Draw shards with replacement."),
    (
        "--grad-checkpointing/--no-grad-checkpointing",
        "model.grad_checkpointing",
        "Recompute activations in backward to save memory.",
    ),
    ("--compile/--no-compile", "run.compile", "torch.compile the training step."),
    (
        "--lock-image/--no-lock-image",
        "model.lock_image",
        "LiT: freeze the image tower (excluded from the optimizer and weight decay).",
    ),
    ("--lock-text/--no-lock-text", "model.lock_text", "Freeze the text tower."),
    (
        "--photometric/--no-photometric",
        "data.photometric",
        "Override the pipeline's colour changes (jitter, grayscale, blur, solarize) of the online "
        "views: --no-photometric keeps A-CLIP's crops without them, --photometric adds them.",
    ),
]
