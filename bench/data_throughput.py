"""Images/s of the ddkit shard loader against a torchvision ``ImageFolder`` DataLoader on the same images.

Both read the same PNG-encoded pictures (the shard set's train split is also written out as one PNG folder
per class), decode them and deliver float32 batches in [-1, 1]:

- ddkit: ``ddkit.data.make_loader`` (webdataset tar shards, sequential reads, buffer shuffle);
- reference: ``torchvision.datasets.ImageFolder`` + ``transforms.ToTensor/Normalize`` + a shuffling
  ``torch.utils.data.DataLoader`` (one file open per image).

Each loader is run for ``--epochs`` epochs after one warm-up epoch; the best epoch time counts (least
disturbed by other processes on a shared machine). Prints images/s of both and the ratio ddkit / reference.
The GPU part (host -> device copy of each batch with pinned memory) runs only when CUDA is available.

Usage::

    python bench/data_throughput.py                      # embedded MNIST-5k at 32x32
    python bench/data_throughput.py --dataset imagefolder --root DIR --resolution 128 --channels 3
    python bench/data_throughput.py --shards shards/imagewoof --workers 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _time_epochs(make_iter, epochs: int, device) -> tuple[float, int]:
    """Best seconds per epoch and images per epoch; batches are moved to ``device`` when it is CUDA."""
    import torch

    best, n = float("inf"), 0
    for e in range(epochs + 1):  # epoch 0 warms caches (page cache, worker start-up, imports)
        t0 = time.perf_counter()
        n = 0
        for batch in make_iter(e):
            x = batch[0]
            if device is not None:
                x = x.to(device, non_blocking=True)
            n += x.shape[0]
        if device is not None:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if e > 0:
            best = min(best, dt)
    return best, n


def _write_png_folder(shards: Path, dst: Path) -> int:
    """The train split as ``dst/<class index>/<i>.png`` (the same pixels as the shards)."""
    from PIL import Image

    from ddkit.data import load_tensors

    images, labels = load_tensors(shards, "train")
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        d = dst / f"{int(y):04d}"
        d.mkdir(parents=True, exist_ok=True)
        arr = x.permute(1, 2, 0).numpy()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(d / f"{i:06d}.png", compress_level=3)
    return len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shards", type=Path, default=None, help="existing shard set (default: shard mnist5k to a tmp dir)"
    )
    ap.add_argument(
        "--dataset", default="mnist5k", help="registry name to shard into a tmp dir (no --shards)"
    )
    ap.add_argument("--root", default=None, help="raw dataset root for --dataset")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    args = ap.parse_args()

    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from ddkit.config import DataConfig
    from ddkit.data import make_loader, read_index, shard_dataset

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = DataConfig(
            dataset=args.dataset,
            root=args.root,
            resolution=args.resolution,
            channels=args.channels,
            shard_size=args.shard_size,
        )
        shards = args.shards or shard_dataset(cfg, tmp / "shards")
        idx = read_index(shards)
        n_png = _write_png_folder(shards, tmp / "png")
        # the shard loader needs a shard per worker
        if len(idx["shards"]["train"]) < max(1, args.workers):
            raise SystemExit(f"{shards}: {len(idx['shards']['train'])} train shards < {args.workers} workers")

        def ddkit_iter(epoch: int):
            return make_loader(shards, "train", args.batch_size, epoch=epoch, num_workers=args.workers)

        gray = idx["channels"] == 1
        tf = T.Compose(
            ([T.Grayscale(1)] if gray else [])
            + [T.ToTensor(), T.Normalize([0.5] * idx["channels"], [0.5] * idx["channels"])]
        )
        folder = ImageFolder(str(tmp / "png"), transform=tf)
        assert len(folder) == n_png

        def tv_iter(epoch: int):
            g = torch.Generator().manual_seed(epoch)
            return torch.utils.data.DataLoader(
                folder,
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=args.workers,
                generator=g,
            )

        results = {}
        devices = [("cpu", None)]
        if torch.cuda.is_available():
            devices.append(("cuda", torch.device("cuda")))
        for dev_name, dev in devices:
            t_dd, n_dd = _time_epochs(ddkit_iter, args.epochs, dev)
            t_tv, n_tv = _time_epochs(tv_iter, args.epochs, dev)
            results[dev_name] = (n_dd / t_dd, n_tv / t_tv)
        print(
            f"dataset {idx['dataset']}: {n_png} train images {idx['resolution']}x{idx['resolution']}x{idx['channels']}, "
            f"batch {args.batch_size}, workers {args.workers}, torch threads {args.threads}, best of {args.epochs} epochs"
        )
        for dev_name, (dd, tv) in results.items():
            print(f"[{dev_name}] ddkit shard loader : {dd:10.0f} images/s")
            print(f"[{dev_name}] torchvision folder : {tv:10.0f} images/s")
            print(f"[{dev_name}] ratio ddkit / torchvision ImageFolder = {dd / tv:.2f}x")
        if "cuda" not in results:
            print("[cuda] skipped: no GPU")


if __name__ == "__main__":
    main()
