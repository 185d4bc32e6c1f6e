"""How close is a warped cached grid to the online teacher on the augmented view? (gate G1)

For real photographs (TACO), the cached grid of the plain 640 view (int8, as the store holds it)
is warped to each augmentation at official strengths (flip; IoU-crop-like crop, scale 0.3-1;
zoom-out, side 1-4 with fill 0; multi-scale resize 480/800; mosaic 2x2 tiles of 320) and compared
per token (cosine) with the teacher run online on the augmented view. Photometric distortion is
not warped: the cached grid of the undistorted image is compared as is. Reference levels: int8
round trip (floor) and the same cell of two different images (chance).

    python -m benchmarks.warp_fidelity [--vfm dinov3_vitb] [--weights PATH] [--images 8]

WITHOUT --weights THE TEACHER IS RANDOMLY INITIALISED AND THE NUMBERS ARE ONLY INDICATIVE: a
random ViT with LayerScale 1e-5 is close to a per-patch linear map, which warps far better than
a trained DINOv3 whose tokens carry context. Re-run with --weights before deciding.
"""
from __future__ import annotations

import argparse
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from teacher_cache.quantize import decode, encode
from teacher_cache.teachers import build_teacher
from teacher_cache.warp import crop_box, flip_box, mosaic_box, warp_grid, zoom_out_box

TACO = Path(__file__).resolve().parents[2] / "shared" / "data" / "taco_val" / "images" / "val"
SIZE = 640


def load_images(folder: Path, n: int) -> torch.Tensor:
    out = []
    for path in sorted(folder.glob("*.jpg"))[:n]:
        img = decode_image(str(path), mode=ImageReadMode.RGB)
        out.append(TF.resize(img, [SIZE, SIZE], antialias=True))
    return torch.stack(out).float() / 255


def cos_cells(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    c = F.cosine_similarity(a, b, dim=0)
    return c[valid] if valid is not None else c.flatten()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vfm", default="dinov3_vitb")
    p.add_argument("--weights")
    p.add_argument("--images", type=int, default=8, help="number of TACO images (multiple of 4)")
    p.add_argument("--data", default=str(TACO), help="folder of .jpg photographs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.95, help="mean cosine needed to serve by warp")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = build_teacher(args.vfm, args.weights)
    random_init = any("RANDOMLY" in str(w.message) for w in caught)
    images = load_images(Path(args.data), args.images)
    n = len(images) - len(images) % 4
    rng = np.random.default_rng(args.seed)
    fp32 = torch.cat([teacher(images[i:i + 4]) for i in range(0, n, 4)])
    cached = decode(*encode(fp32, "int8"), fp32.shape[-2:]).reshape_as(fp32)
    cells = defaultdict(list)
    cells["reference: int8 round trip (floor)"] = [cos_cells(fp32[i], cached[i]) for i in range(n)]
    cells["reference: other image, same cell (chance)"] = [cos_cells(cached[i], cached[(i + 1) % n])
                                                          for i in range(n)]
    grid = cached.shape[-2:]
    for i in range(n):
        img, c = images[i], cached[i]
        online = teacher(img.flip(-1)[None])[0]
        cells["flip"].append(cos_cells(online, warp_grid(c, flip_box(), grid)[0]))
        scale, ratio = rng.uniform(0.3, 1.0), np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        w = int(min(SIZE, SIZE * np.sqrt(scale * ratio)))
        h = int(min(SIZE, SIZE * np.sqrt(scale / ratio)))
        top, left = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
        view = TF.resize(img[:, top:top + h, left:left + w], [SIZE, SIZE], antialias=True)
        cells["crop (scale 0.3-1, resized to 640)"].append(
            cos_cells(teacher(view[None])[0], warp_grid(c, crop_box(top, left, h, w, (SIZE, SIZE)), grid)[0]))
        side = rng.uniform(1.0, 4.0)
        cw = int(SIZE * side)
        left, top = int((cw - SIZE) * rng.random()), int((cw - SIZE) * rng.random())
        pad = (left, top, cw - SIZE - left, cw - SIZE - top)
        view = TF.resize(TF.pad(img, list(pad), fill=0), [SIZE, SIZE], antialias=True)
        warped, valid = warp_grid(c, zoom_out_box(pad, (SIZE, SIZE)), grid)
        key = "zoom-out x1-2 (content cells)" if side < 2 else "zoom-out x2-4 (content cells)"
        cells[key].append(cos_cells(teacher(view[None])[0], warped, valid))
        for size in (480, 800):
            view = TF.resize(img, [size, size], antialias=True)
            online = teacher(view[None])[0]
            cells[f"resize 640->{size} (grid {size // 32})"].append(
                cos_cells(online, warp_grid(c, (0, 0, 1, 1), online.shape[-2:])[0]))
        view = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
            img, rng.uniform(0.875, 1.125)), rng.uniform(0.5, 1.5)), rng.uniform(0.5, 1.5)),
            rng.uniform(-0.05, 0.05))
        cells["photometric (not warped)"].append(cos_cells(teacher(view[None])[0], c))
    tiles = ((0, 0, .5, .5), (.5, 0, 1, .5), (0, .5, .5, 1), (.5, .5, 1, 1))
    for g in range(0, n, 4):
        canvas = torch.zeros(3, SIZE, SIZE)
        warped = torch.zeros_like(cached[0])
        for j, (x0, y0, x1, y1) in enumerate(tiles):
            half = SIZE // 2
            canvas[:, int(y0 * SIZE):int(y0 * SIZE) + half, int(x0 * SIZE):int(x0 * SIZE) + half] = \
                TF.resize(images[g + j], [half, half], antialias=True)
            w_, valid = warp_grid(cached[g + j], mosaic_box((x0, y0, x1, y1)), grid)
            warped[:, valid] = w_[:, valid]
        cells["mosaic tile (4 x 320 on 640)"].append(cos_cells(teacher(canvas[None])[0], warped))

    print(f"teacher {args.vfm} ({teacher.arch}), {n} TACO images, grid {tuple(grid)}, "
          f"{'RANDOM-INIT WEIGHTS: INDICATIVE ONLY' if random_init else 'weights ' + str(args.weights)}")
    print(f"{'augmentation':44s} {'mean cos':>9s} {'p5':>7s} {'p1':>7s} {'cells':>6s}  serve by")
    for name, parts in cells.items():
        c = torch.cat(parts)
        verdict = "-" if name.startswith("reference") else (
            "warp" if c.mean() >= args.threshold else "online teacher")
        print(f"{name:44s} {c.mean():9.4f} {c.quantile(0.05):7.4f} {c.quantile(0.01):7.4f} "
              f"{c.numel():6d}  {verdict}")


if __name__ == "__main__":
    main()
