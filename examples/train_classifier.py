"""Train a small CNN to classify Omniglot characters: layers, Adam, checkpoints, resuming.

Ordinary supervised learning, no meta-learning: the classes are the characters of one or a
few alphabets of ``images_background_small1`` (Greek by default: 24 characters), each drawn
by 20 people. Drawers 1-15 are the training set and drawers 16-20 the test set, so the test
asks for characters the network knows, in handwriting it has never seen. The network is three
blocks of Conv2d 3x3 -> BatchNorm2d -> ReLU -> MaxPool2d and a Linear layer, trained with
Adam on the cross-entropy loss; the training images are shifted by up to two pixels at random
each epoch (15 drawings per character are few, and a shifted character is the same character).

    python examples/train_classifier.py                      # Greek: ~95% test accuracy, < 1 min
    python examples/train_classifier.py --alphabets Greek Latin --epochs 20
    python examples/train_classifier.py --epochs 10 --out runs/a         # 10 epochs, then
    python examples/train_classifier.py --resume runs/a/checkpoint.npz   # the other 20

The data is read from ``--data DIR`` or ``$TINYMETA_DATA`` (the folder holding
``images_background_small1.zip``), else from the cache (``~/.cache/tinymeta/omniglot``).
``--out`` receives ``metrics.json`` and ``checkpoint.npz`` (model and optimizer state, epoch,
history), written after every epoch, so an interrupted run can be resumed too. Shuffling and
shifts come from a generator seeded by ``(seed, epoch)``, so a resumed run ends with exactly the
weights of a run that was never stopped (on the same machine and BLAS thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# The matrix products here are small (a batch of 32 images) and OpenBLAS's worker threads buy
# nothing: one thread runs this example as fast as two for half the CPU time, and much faster
# when the cores are busy and the threads wait for each other (docs/performance.md). Set the
# variable yourself to override; it only acts before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from tqdm import tqdm

import tinymeta as tm
from tinymeta import nn
from tinymeta._checks import nonnegative_int, positive_float, positive_int
from tinymeta.data import load_omniglot, split_by_drawer
from tinymeta.nn import functional as F
from tinymeta.optim import Adam

TRAIN_DRAWERS = range(1, 16)  # drawers 16-20 are the test set
EVAL_BATCH = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A small CNN on Omniglot characters (drawer split).")
    p.add_argument(
        "--alphabets",
        nargs="+",
        default=["Greek"],
        help="alphabets of images_background_small1 to classify (default: Greek); "
        "'all' takes all five",
    )
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--channels", type=positive_int, default=32, help="channels of the conv blocks")
    p.add_argument(
        "--shift", type=nonnegative_int, default=2, help="random shift in pixels (0: none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--data", type=Path, default=None, help="folder holding the Omniglot zips")
    p.add_argument("--out", type=Path, default=Path("runs/classifier"))
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="checkpoint to continue from (its optimizer state, learning rate included, wins)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# --- data --------------------------------------------------------------------------------------


def load_data(alphabets: list[str], root: Path | None):
    """(train, test) OmniglotDatasets of the chosen alphabets, split by drawer."""
    if root is not None and (root / "omniglot").is_dir():  # a data folder, as $TINYMETA_DATA
        root = root / "omniglot"
    data = load_omniglot("small1", root=root)
    if alphabets != ["all"]:
        try:
            data = data.subset(alphabets=alphabets)
        except KeyError as exc:  # an unknown name: the message lists the known ones
            raise SystemExit(f"--alphabets: {exc.args[0]}") from None
    return split_by_drawer(data, TRAIN_DRAWERS)


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Move each (1, S, S) image by up to ``max_shift`` pixels in x and y, filling with paper."""
    if max_shift == 0:
        return images
    n, _, s, _ = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (0, 0), (m, m), (m, m)))
    dy, dx = rng.integers(0, 2 * m + 1, size=(2, n))
    # One fancy-index gathers every crop: rows dy[i] + 0..s-1 and columns dx[i] + 0..s-1.
    rows = (dy[:, None] + np.arange(s))[:, :, None]
    cols = (dx[:, None] + np.arange(s))[:, None, :]
    return padded[np.arange(n)[:, None, None], 0, rows, cols][:, None]


# --- model -------------------------------------------------------------------------------------


def conv_block(c_in: int, c_out: int, rng) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, rng=rng),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def build_model(num_classes: int, channels: int, image_size: int, rng) -> nn.Sequential:
    """Three conv blocks (28 -> 14 -> 7 -> 3 pixels) and a linear classifier."""
    c = channels
    side = image_size // 2 // 2 // 2
    return nn.Sequential(
        conv_block(1, c, rng),
        conv_block(c, c, rng),
        conv_block(c, 2 * c, rng),
        nn.Flatten(),
        nn.Linear(2 * c * side * side, num_classes, rng=rng),
    )


# --- training ----------------------------------------------------------------------------------


def train_epoch(model, opt, train, epoch: int, args, bar) -> dict:
    """One pass over the training set in a random order; returns its mean loss and accuracy.

    The generator depends on (seed, epoch) only, so epoch k shuffles and shifts alike whether
    the run started at epoch 0 or was resumed from a checkpoint.
    """
    rng = np.random.default_rng([args.seed, epoch])
    order = rng.permutation(len(train))
    images = random_shift(train.images[order], args.shift, rng)
    labels = train.labels[order]
    model.train()
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), args.batch_size):
        x = tm.tensor(images[start : start + args.batch_size], device=args.device)
        y = labels[start : start + args.batch_size]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(y)
        correct += int((logits.numpy().argmax(axis=1) == y).sum())
        bar.update(1)
    return {"loss": total_loss / len(order), "train_acc": correct / len(order)}


def evaluate(model, dataset, device: str) -> float:
    """Accuracy in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    correct = 0
    with tm.no_grad():
        for start in range(0, len(dataset), EVAL_BATCH):
            x = tm.tensor(dataset.images[start : start + EVAL_BATCH], device=device)
            pred = model(x).numpy().argmax(axis=1)
            correct += int((pred == dataset.labels[start : start + EVAL_BATCH]).sum())
    return correct / len(dataset)


def run_config(args, alphabets: list[str]) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    return {
        "alphabets": list(alphabets),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "channels": args.channels,
        "shift": args.shift,
    }


def save_checkpoint(path: Path, model, opt, epoch: int, history: list, config: dict) -> None:
    """Everything needed to continue: no generator state, since each epoch seeds its own."""
    state = {
        "model": model.state_dict(),  # parameters and BatchNorm's running statistics
        "optimizer": opt.state_dict(),  # Adam's moments and step counts, and the lr
        "epoch": epoch,  # epochs completed
        "history": history,
        "config": config,
    }
    tm.save(state, path)


def load_checkpoint(path: Path, model, opt, config: dict) -> tuple[int, list]:
    """Restore model and optimizer from ``path``; returns (epochs completed, history)."""
    state = tm.load(path)
    saved = state["config"]
    differ = [
        f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in config.items() if saved.get(k) != v
    ]
    if differ:
        raise SystemExit(f"--resume {path} was written with other settings ({'; '.join(differ)})")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["epoch"], state["history"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = load_data(args.alphabets, args.data)
    alphabets = train.alphabets
    config = run_config(args, alphabets)

    model = build_model(
        train.num_classes, args.channels, train.image_size, np.random.default_rng(args.seed)
    ).to(args.device)
    opt = Adam(list(model.parameters()), lr=args.lr)
    first_epoch, history = 0, []
    if args.resume is not None:
        first_epoch, history = load_checkpoint(args.resume, model, opt, config)

    steps = -(-len(train) // args.batch_size)  # ceil
    start = time.perf_counter()
    with tqdm(
        total=args.epochs * steps,
        initial=first_epoch * steps,
        desc="train",
        disable=args.quiet,
        mininterval=0.5,
    ) as bar:
        for epoch in range(first_epoch, args.epochs):
            record = {"epoch": epoch + 1, **train_epoch(model, opt, train, epoch, args, bar)}
            record["test_acc"] = evaluate(model, test, args.device)  # shown, never used to tune
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
            save_checkpoint(args.out / "checkpoint.npz", model, opt, epoch + 1, history, config)
    seconds = time.perf_counter() - start

    metrics = {
        "alphabets": alphabets,
        "num_classes": train.num_classes,
        "train_images": len(train),
        "test_images": len(test),
        "epochs": len(history),
        "resumed_from_epoch": first_epoch if args.resume is not None else None,
        "train_accuracy": evaluate(model, train, args.device),
        "test_accuracy": evaluate(model, test, args.device),
        "chance": 1.0 / train.num_classes,
        "seconds": round(seconds, 2),
        "history": history,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    if not args.quiet:
        print(
            f"{', '.join(alphabets)}: {train.num_classes} characters, {len(train)} training "
            f"and {len(test)} test images, {len(history) - first_epoch} epochs in {seconds:.0f} s"
        )
        print(f"train accuracy {metrics['train_accuracy']:.3f}")
    print(f"test accuracy {metrics['test_accuracy']:.3f} (chance {metrics['chance']:.3f})")
    return metrics


if __name__ == "__main__":
    main()
