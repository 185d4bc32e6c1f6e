"""Numerical parity of DFINEDecoder with the official RT-DETRv4 DFINETransformer.

tests/fixtures/decoder_parity_*.pt hold outputs of the OFFICIAL code (engine/rtv4/dfine_decoder.py at
RT-DETRv4 df44122), computed from the weights and inputs that `seeded_decoder` / `case_inputs` build
here (the official module loaded our state dict strictly), in float64. The test rebuilds ours the
same way and compares every output tensor in float64 at 1e-6 of each tensor's range, a bound that
float64 rounding on any CPU, ISA or thread count stays far below. Regenerate with `PYTHONPATH=. python tests/detector/test_decoder_parity.py --official <checkout>`.
"""
import copy
import functools
from pathlib import Path

import pytest
import torch

from detector.dfine_decoder import DFINEDecoder

DATA = Path(__file__).resolve().parents[1] / "fixtures"
RTOL = 1e-6  # of each reference tensor's largest magnitude

# Reduced sizes keep the reference files small; layer count, points, reg_scale and input_proj follow
# the S and X configs.
_SMALL = dict(num_classes=5, num_queries=10, num_denoising=10, eval_spatial_size=(128, 128))
CASES = {
    "s": dict(_SMALL, num_layers=3, feat_channels=(256, 256, 256), reg_scale=4),
    "x": dict(_SMALL, num_layers=6, feat_channels=(384, 384, 384), reg_scale=8),
    "s_eval_idx1": dict(_SMALL, num_layers=4, eval_idx=1, feat_channels=(256, 256, 256), reg_scale=4),
}
MODES = {"s": ("eval", "train", "train_dn"), "x": ("eval", "train"), "s_eval_idx1": ("eval",)}
DN_SEED = 3


def seeded_decoder(case: str) -> DFINEDecoder:
    return copy.deepcopy(_seeded_decoder(case))


@functools.lru_cache(maxsize=None)
def _seeded_decoder(case: str) -> DFINEDecoder:
    """Our decoder with every weight drawn from a fixed generator (independent of the init code), so
    that no path is trivially zero (the official init zeroes the box heads, LQE and offsets)."""
    torch.manual_seed(0)
    model = DFINEDecoder(**CASES[case])
    g = torch.Generator().manual_seed(1)
    skip = ("up", "reg_scale", "anchors", "valid_mask", "num_points_scale", "num_batches_tracked")
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            if name.split(".")[-1] in skip or not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif t.dim() >= 2:
                t.copy_(noise / t[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm / BatchNorm scale
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    return model.double()


def case_inputs(case: str, batch: int = 2):
    cfg = CASES[case]
    g = torch.Generator().manual_seed(2)
    h, w = cfg["eval_spatial_size"]
    feats = [torch.randn(batch, c, h // s, w // s, generator=g).double()
             for c, s in zip(cfg["feat_channels"], (8, 16, 32))]
    targets = []
    for n in (3, 5)[:batch]:
        cxcy = 0.2 + 0.6 * torch.rand(n, 2, generator=g).double()
        wh = 0.05 + 0.35 * torch.rand(n, 2, generator=g).double()
        labels = torch.randint(0, cfg["num_classes"], (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], -1)})
    return feats, targets


def run_mode(model, mode: str, feats, targets):
    model.train(mode != "eval")
    if mode == "train_dn":
        torch.manual_seed(DN_SEED)  # denoising draws come from the global generator, as in the official code
        return model(feats, targets)
    return model(feats)


def flatten_outputs(out, prefix: str = "") -> dict:
    """Tensors of an output dict under slash-separated keys (up/reg_scale/enc_meta carry no results)."""
    flat = {}
    for key, value in out.items():
        name = f"{prefix}{key}"
        if key in ("up", "reg_scale", "enc_meta", "teacher_corners", "teacher_logits"):
            continue
        if key == "dn_meta":
            flat[f"{name}/dn_num_group"] = torch.tensor(value["dn_num_group"])
            flat[f"{name}/dn_num_split"] = torch.tensor(value["dn_num_split"])
            for i, idx in enumerate(value["dn_positive_idx"]):
                flat[f"{name}/dn_positive_idx/{i}"] = idx
        elif isinstance(value, dict):
            flat.update(flatten_outputs(value, f"{name}/"))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flatten_outputs(item, f"{name}/{i}/"))
        else:
            flat[name] = value.detach()
    return flat


@pytest.mark.parametrize("case,mode", [(c, m) for c in CASES for m in MODES[c]])
def test_matches_official_reference(case, mode):
    ref = torch.load(DATA / f"decoder_parity_{case}.pt")[mode]
    feats, targets = case_inputs(case)
    with torch.no_grad():
        ours = flatten_outputs(run_mode(seeded_decoder(case), mode, feats, targets))
    assert sorted(ours) == sorted(ref)
    for key, expected in ref.items():
        got = ours[key]
        assert got.shape == expected.shape, key
        if expected.is_floating_point():
            assert got.dtype == expected.dtype == torch.float64, key
            tol = RTOL * max(expected.abs().max().item(), 1e-3) if expected.numel() else 0.0
            torch.testing.assert_close(got, expected, atol=tol, rtol=0, msg=lambda m: f"{case}/{mode}/{key}: {m}")
        else:
            assert torch.equal(got, expected), key


def test_state_dict_matches_official_layout():
    """Key set, shapes and dtypes recorded from the official S-config DFINETransformer (80 classes)."""
    layout = torch.load(DATA / "decoder_parity_layout.pt")
    model = DFINEDecoder(num_classes=80, num_layers=3, reg_scale=4)
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    assert ours == layout["s_keys"]
    assert sum(p.numel() for p in model.parameters()) == layout["s_num_params"]


# ------------------------------------------------------------------------------------------------------
# Regenerating the references: `PYTHONPATH=. python tests/detector/test_decoder_parity.py --official /path/to/RT-DETRv4`.
# Imports the official decoder modules from a checkout of the official repository (not part of this
# project; its package __init__ pulls training-only dependencies, so only the needed files are loaded),
# loads our seeded weights into it strictly, and stores ITS outputs. Prints our max |difference|.

def _official_modules(root: str):
    import importlib
    import sys
    import types

    def package(name, path):
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module

    package("engine", f"{root}/engine")
    core = types.ModuleType("engine.core")
    core.register = lambda *a, **k: (lambda cls: cls)
    sys.modules["engine.core"] = core
    package("engine.rtv4", f"{root}/engine/rtv4")
    package("engine.backbone", f"{root}/engine/backbone")
    modules = {name: importlib.import_module(f"engine.rtv4.{name}")
               for name in ("dfine_decoder", "dfine_utils", "postprocessor", "hybrid_encoder")}
    modules["hgnetv2"] = importlib.import_module("engine.backbone.hgnetv2")
    return modules


def _official_decoder(official, case_cfg, state_dict):
    cfg = dict(hidden_dim=256, num_queries=300, feat_strides=[8, 16, 32], num_levels=3, num_points=[3, 6, 3],
               nhead=8, num_layers=6, dim_feedforward=1024, dropout=0.0, activation="silu", mlp_act="silu",
               num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0, eval_idx=-1, reg_max=32, layer_scale=1)
    cfg.update(case_cfg, feat_channels=list(case_cfg["feat_channels"]),
               eval_spatial_size=list(case_cfg["eval_spatial_size"]))
    model = official["dfine_decoder"].DFINETransformer(**cfg)
    if state_dict is not None:   # float64 weights load without rounding to float32
        model.to(next(v.dtype for v in state_dict.values() if v.is_floating_point()))
        model.load_state_dict(state_dict, strict=True)
    return model


def make_references(root: str):
    from test_decoder_fdr import UP, fdr_inputs
    from test_postprocessor import pp_inputs

    official = _official_modules(root)
    for case in CASES:
        refs = {}
        for mode in MODES[case]:
            ours = seeded_decoder(case)
            theirs = _official_decoder(official, CASES[case], ours.state_dict())
            theirs.num_denoising = 0 if mode == "train" else theirs.num_denoising  # it needs targets otherwise
            feats, targets = case_inputs(case)
            with torch.no_grad():
                refs[mode] = flatten_outputs(run_mode(theirs, mode, feats, targets))
                got = flatten_outputs(run_mode(ours, mode, feats, targets))
            diff = max(((refs[mode][k] - got[k]).abs().max().item() for k in got if got[k].is_floating_point()))
            print(f"{case} {mode}: {len(got)} tensors, max |ours - official| = {diff:.3e}")
        torch.save(refs, DATA / f"decoder_parity_{case}.pt")

    layout = {}
    for size, cfg in (("s", dict(num_layers=3, reg_scale=4)), ("x", dict(feat_channels=(384,) * 3, reg_scale=8))):
        cfg = dict(dict(num_classes=80, feat_channels=(256,) * 3, eval_spatial_size=(640, 640)), **cfg)
        model = _official_decoder(official, cfg, DFINEDecoder(**cfg).state_dict())
        layout[f"{size}_keys"] = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
        layout[f"{size}_num_params"] = sum(p.numel() for p in model.parameters())
    torch.save(layout, DATA / "decoder_parity_layout.pt")

    utils, misc = official["dfine_utils"], {}
    points, boxes = fdr_inputs()
    for reg_scale in (4, 8):
        rs = torch.tensor([reg_scale])
        misc[f"weighting_{reg_scale}"] = utils.weighting_function(32, UP, rs)
        misc[f"weighting_deploy_{reg_scale}"] = utils.weighting_function(32, UP, rs, deploy=True)
        misc[f"bbox2distance_{reg_scale}"] = torch.stack(utils.bbox2distance(points, boxes, 32, rs, UP))
    outputs, sizes = pp_inputs()
    post = official["postprocessor"].PostProcessor(num_classes=7, num_top_queries=30).deploy()
    misc["postprocess"] = dict(zip(("labels", "boxes", "scores"), post(outputs, sizes)))
    torch.save(misc, DATA / "decoder_parity_misc.pt")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate tests/fixtures/decoder_parity_*.pt from the official code")
    parser.add_argument("--official", required=True, help="root of an RT-DETRv4 checkout (contains engine/)")
    make_references(parser.parse_args().official)
