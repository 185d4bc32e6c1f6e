"""Numerical parity of the whole RT-DETRv4 model with the official implementation, in float64.

tests/fixtures/detector_parity_*.pt hold outputs of the OFFICIAL code (RT-DETRv4 df44122: HGNetv2,
HybridEncoder, DFINETransformer, PostProcessor, pretrained=False) in float64 eval mode, from the
weights `seeded_detector` builds here (the official model loads our state dict strictly by the
official key names), on `synthetic_image` and on the first TACO validation image. The tests rebuild
our model the same way and compare in float64 with a relative tolerance of 1e-6: float64 rounding
(1e-16), even amplified by the deep random B4/B5 nets, stays orders of magnitude below it, so the
result does not depend on the CPU, its ISA or the thread count, while a structural difference moves
values by O(1). Regenerate with
`PYTHONPATH=. python tests/detector/test_detector_parity.py --official /path/to/RT-DETRv4`.
"""
import copy
from pathlib import Path

import pytest
import torch

from detector import build_detector
from detector.postprocessor import PostProcessor

DATA = Path(__file__).resolve().parents[1] / "fixtures"
RTOL = 1e-6  # relative to each reference tensor's largest magnitude
PROBE = 256  # sampled values per encoder map in the all-size encoder references
CALIB_PX = 256  # BN calibration image size


def seeded_detector(size: str, seed: int = 0):
    """Our model in float64 with deterministic, non-degenerate weights, in eval mode.

    Built with our initialiser under `seed`; decoder tensors (whose official init zeroes box heads,
    offsets and attention weights) are redrawn from a fixed generator; the model is then cast to
    float64 and its BatchNorm running statistics calibrated by two float64 train-mode passes over
    fixed random images, so activations stay in a realistic range in eval mode (default running
    stats let a random HGNetv2 overflow) and the statistics do not depend on the CPU.
    """
    torch.manual_seed(seed)
    model = build_detector(size)
    g = torch.Generator().manual_seed(seed + 1)
    skip = ("up", "reg_scale", "anchors", "valid_mask", "num_points_scale", "num_batches_tracked")
    with torch.no_grad():
        for name, t in sorted(model.decoder.state_dict(keep_vars=True).items()):
            if name.split(".")[-1] in skip or not t.is_floating_point() or "norm." in name:
                continue
            noise = torch.randn(t.shape, generator=g)
            t.copy_(noise / t[0].numel() ** 0.5 if t.dim() >= 2 else 0.1 * noise)
        model.double()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration passes
        model.train()
        for _ in range(2):
            model(torch.rand(2, 3, CALIB_PX, CALIB_PX, generator=g, dtype=torch.float64))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def synthetic_image(size: int = 640) -> torch.Tensor:
    """[1,3,size,size] float64 in [0,1], from closed-form patterns (no RNG): gratings plus three boxes,
    with a fine aperiodic texture everywhere so no two positions share features (ties would make the
    top-k query order arbitrary)."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(x * 0.031 * (c + 1) + y * 0.017 * (3 - c)) for c in range(3)])
    s = size / 640
    for (x0, y0, x1, y1), color in [((80, 90, 260, 300), (0.9, 0.1, 0.1)), ((300, 350, 600, 520), (0.1, 0.8, 0.2)),
                                    ((420, 60, 520, 200), (0.9, 0.9, 0.1))]:
        img[:, int(y0 * s):int(y1 * s), int(x0 * s):int(x1 * s)] = torch.tensor(color, dtype=img.dtype)[:, None, None]
    texture = torch.stack([torch.sin(x * 0.37 + y * 0.23 + c) * torch.cos(x * 0.113 - y * 0.291 + 2 * c)
                           for c in range(3)])
    return (img + 0.05 * texture).clamp(0, 1)[None]


def taco_image(taco_dir: Path, size: int = 640) -> tuple[torch.Tensor, torch.Tensor]:
    """First TACO validation image (sorted), resized to size x size, float64; returns (image, orig (w, h))."""
    from PIL import Image
    import numpy as np
    path = sorted((taco_dir / "images" / "val").glob("*.jpg"))[0]
    with Image.open(path) as im:
        im = im.convert("RGB")
        orig = torch.tensor([[im.width, im.height]], dtype=torch.int64)
        im = im.resize((size, size), Image.BILINEAR)
        img = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).double() / 255
    return img[None], orig


def encoder_probe(maps, n: int = PROBE) -> torch.Tensor:
    """Fixed pseudo-random samples of each map plus its mean and mean |x| (a small parity fingerprint)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for m in maps:
        flat = m.flatten()
        idx = torch.randint(0, flat.numel(), (n,), generator=g)
        rows.append(torch.cat([flat[idx], flat.mean()[None], flat.abs().mean()[None]]))
    return torch.stack(rows)


def run_full(model, image: torch.Tensor, orig: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model(image)
        det = PostProcessor(num_classes=80, clip_boxes=False)(out, orig)[0]   # official: no clipping
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"],
            "labels": det["labels"], "boxes": det["boxes"], "scores": det["scores"]}


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, name: str = ""):
    """float64 comparison at RTOL of the reference's largest magnitude."""
    assert got.dtype == ref.dtype == torch.float64, (name, got.dtype, ref.dtype)
    tol = RTOL * max(ref.abs().max().item(), 1e-3)
    torch.testing.assert_close(got, ref, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")


def _compare(ours: dict, ref: dict):
    """Every output row by row: in float64 there are no near-ties, so query and detection order agree."""
    assert sorted(ours) == sorted(ref)
    for key, expected in ref.items():
        if expected.is_floating_point():
            assert_close_rel(ours[key], expected, key)
        else:
            assert torch.equal(ours[key], expected), key


def _ref(name: str) -> dict:
    path = DATA / f"detector_parity_{name}.pt"
    if not path.is_file():
        pytest.fail(f"reference {path} missing; regenerate with "
                    "`PYTHONPATH=. python tests/detector/test_detector_parity.py --official <RT-DETRv4 checkout>`")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def model_s():
    return seeded_detector("s")


def test_full_model_parity_synthetic(model_s):
    _compare(run_full(model_s, synthetic_image(), SYNTHETIC_ORIG), _ref("s_synthetic"))


def test_full_model_parity_taco(model_s, taco_dir):
    image, orig = taco_image(taco_dir)
    _compare(run_full(model_s, image, orig), _ref("s_taco"))


def test_deploy_form_matches_official_deploy_form(model_s):
    """Our deploy form (Conv-BN folding, RepVGG re-parameterisation, decoder cut) against the official
    RTv4.deploy() + PostProcessor.deploy() on the same weights and image."""
    deployed = copy.deepcopy(model_s).deploy()
    ours = run_full(deployed, synthetic_image(), SYNTHETIC_ORIG)
    _compare({k: ours[k] for k in ("labels", "boxes", "scores")}, _ref("s_synthetic_deploy"))


@pytest.mark.parametrize("size", ["s", "m", "l", "x"])
def test_backbone_encoder_parity_all_sizes(size):
    with torch.no_grad():
        fused, _ = (model := seeded_detector(size)).encoder(model.backbone(synthetic_image(256)))
    assert_close_rel(encoder_probe(fused), _ref("encoders")[size], size)


# ------------------------------------------------------------------------------------------------------
# Regenerating the references: imports the official modules from a checkout of the official repository
# (not part of this project; see test_decoder_parity._official_modules), loads our seeded float64 weights
# into the official RTv4 strictly and stores ITS outputs. Prints our max relative difference.

SYNTHETIC_ORIG = torch.tensor([[640, 480]])


def official_detector(official: dict, cfg, eval_spatial_size):
    from test_decoder_parity import _official_decoder

    backbone = official["hgnetv2"].HGNetv2(cfg.backbone, use_lab=cfg.use_lab, return_idx=[1, 2, 3], freeze_at=-1,
                                           freeze_norm=False, pretrained=False)
    encoder = official["hybrid_encoder"].HybridEncoder(
        in_channels=list(cfg.backbone_channels), feat_strides=list(cfg.feat_strides), hidden_dim=cfg.hidden_dim,
        nhead=cfg.aifi_heads, dim_feedforward=cfg.aifi_ffn_dim, dropout=0.0, enc_act=cfg.aifi_act,
        use_encoder_idx=[2], num_encoder_layers=cfg.aifi_layers, pe_temperature=cfg.pe_temperature,
        expansion=cfg.expansion, depth_mult=cfg.depth_mult, act=cfg.ccff_act,
        eval_spatial_size=eval_spatial_size, version="dfine")
    decoder_cfg = dict(num_classes=cfg.num_classes, feat_channels=(cfg.hidden_dim,) * 3, num_layers=cfg.num_decoder_layers,
                       reg_scale=cfg.reg_scale, eval_spatial_size=cfg.eval_spatial_size)
    decoder = _official_decoder(official, decoder_cfg, None)
    return official["rtv4"].RTv4(backbone, encoder, decoder)


def _official_outputs(net, post, image, orig) -> dict:
    with torch.no_grad():
        out = net(image)
        det = post(out, orig)
    det = dict(zip(("labels", "boxes", "scores"), (d[0] for d in det))) if isinstance(det, tuple) else det[0]
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"], **det}


def make_references(root: str, taco: str | None):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_decoder_parity import _official_modules

    official = _official_modules(root)
    official["rtv4"] = __import__("engine.rtv4.rtv4", fromlist=["RTv4"])

    def report(name, refs, ours):
        worst = max((ours[k] - v).abs().max().item() / max(v.abs().max().item(), 1e-3)
                    for k, v in refs.items() if v.is_floating_point())
        print(f"{name}: max |ours - official| / max |official| = {worst:.2e}")

    encoders = {}
    for size in ("s", "m", "l", "x"):
        ours = seeded_detector(size)
        theirs = official_detector(official, ours.cfg, None).double().eval()  # float64 before loading
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            encoders[size] = encoder_probe(theirs.encoder(theirs.backbone(synthetic_image(256))))
            got = encoder_probe(ours.encoder(ours.backbone(synthetic_image(256)))[0])
        report(f"encoder {size}", {"probe": encoders[size]}, {"probe": got})
    torch.save(encoders, DATA / "detector_parity_encoders.pt")

    ours = seeded_detector("s")
    theirs = official_detector(official, ours.cfg, list(ours.cfg.eval_spatial_size)).double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    post = official["postprocessor"].PostProcessor(num_classes=80, num_top_queries=300)
    cases = {"s_synthetic": (synthetic_image(), SYNTHETIC_ORIG)}
    if taco:
        cases["s_taco"] = taco_image(Path(taco))
    for name, (image, orig) in cases.items():
        refs = _official_outputs(theirs, post, image, orig)
        report(name, refs, run_full(ours, image, orig))
        torch.save(refs, DATA / f"detector_parity_{name}.pt")
    theirs.deploy()
    refs = _official_outputs(theirs, post.deploy(), synthetic_image(), SYNTHETIC_ORIG)
    refs = {k: refs[k] for k in ("labels", "boxes", "scores")}  # the deploy graph's outputs
    report("s_synthetic_deploy", refs, run_full(copy.deepcopy(ours).deploy(), synthetic_image(), SYNTHETIC_ORIG))
    torch.save(refs, DATA / "detector_parity_s_synthetic_deploy.pt")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate tests/fixtures/detector_parity_*.pt from the official code")
    parser.add_argument("--official", required=True, help="root of an RT-DETRv4 checkout (contains engine/)")
    parser.add_argument("--taco", help="TACO sample folder (YOLO layout) for the s_taco reference")
    args = parser.parse_args()
    make_references(args.official, args.taco)
