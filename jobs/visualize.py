"""PCA maps of the teacher's patch tokens next to the student's DSI-projected F5 (paper Fig. 4).

    python -m jobs.visualize --checkpoint runs/train/last.pth --images photos/ --out features/
    python -m jobs.visualize --checkpoint runs/l/last.pth --images val/ --weights dinov3_vitb16_pretrain_lvd1689m.pth

The checkpoint must be a training checkpoint holding the DSI projector (last.pth, epoch<N>.pth;
best.pth keeps inference weights only). The teacher (--vfm, --weights) defaults to the one the
run was trained with; without weights it is randomly initialised and the pictures are meaningless
(a loud warning says so). Writes one <image>_features.png per image.
"""
from __future__ import annotations

import sys

from pipeline import cli
from pipeline.cli import parser


def parse_args(argv=None):
    p = parser("jobs.visualize", __doc__)
    p.add_argument("--checkpoint", required=True, help="training checkpoint with the DSI projector (last.pth)")
    p.add_argument("--images", required=True, help="an image or a folder of images")
    p.add_argument("--vfm", default=None, help="teacher (None: the run's --vfm)")
    p.add_argument("--weights", default=None, help="teacher weights (None: the run's --weights; none: random init)")
    p.add_argument("--image-size", type=int, default=None, help="input size, a multiple of 32 (None: the run's)")
    p.add_argument("--limit", type=int, default=8, help="at most this many images")
    p.add_argument("--out", default="features", help="folder for the PNGs")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)   # before the heavy imports: --help answers at once
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from detector import build_detector
    from detector.checkpoint import load_checkpoint
    from detector.dsi import DSI, DSIConfig
    from pipeline.deploy.inputs import list_images, read_image
    from pipeline.train.feature_maps import feature_grids, pca_rgb, save_panel
    from teacher_cache.teachers import build_teacher

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not state.get("dsi"):
        raise cli.JobError(f"--checkpoint {args.checkpoint} holds no DSI projector: give a training checkpoint of a "
                         "--distill dsi run (last.pth or epoch<N>.pth; best.pth keeps inference weights only)")
    run = state.get("config", {})
    vfm, weights = args.vfm or run.get("vfm", "dinov3_vitb"), args.weights or run.get("weights")
    size = args.image_size or run.get("img_size", 640)
    if weights is None:
        print(f"WARNING: teacher {vfm} is RANDOMLY INITIALISED (no --weights, and the run had none): the teacher "
              "maps show random features; the pictures only demonstrate the tool", file=sys.stderr)
    teacher = build_teacher(vfm, weights)
    detector = build_detector(state["size"], num_classes=state["num_classes"])
    load_checkpoint(detector, args.checkpoint)           # the EMA weights, as evaluated
    dsi = DSI(DSIConfig(student_dim=detector.cfg.hidden_dim, teacher_dim=teacher.embed_dim))
    dsi.load_state_dict(state["dsi"])
    detector.eval(), dsi.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in list_images(Path(args.images), limit=args.limit):
        image = read_image(f).float()[None] / 255
        x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        t, s = feature_grids(detector, dsi, teacher, x)
        cos = F.cosine_similarity(t, s, dim=1).mean().item()
        t_rgb, s_rgb = pca_rgb(t[0], s[0])
        written.append(save_panel(x[0], t_rgb, s_rgb, out / f"{f.stem}_features.png",
                                  title=f"{f.name}: {vfm}{'' if weights else ' (RANDOM teacher)'}", cosine=cos))
        print(f"{written[-1]} (mean token cosine student->teacher {cos:.3f})")
    return written


if __name__ == "__main__":
    sys.exit(cli.run("jobs.visualize", main))
