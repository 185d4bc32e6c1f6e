"""Deploy-form Conv-BN folding and RepVGG re-parameterisation equal the official convert_to_deploy bit for bit.

tests/fixtures/deploy_fold_official.pt holds the folded float32 CCFF weights of the OFFICIAL
HybridEncoder (RT-DETRv4 df44122, version 'dfine') after convert_to_deploy, from the small seeded
encoder `seeded_encoder` builds here (the official module loads our state dict strictly). Folding is
elementwise sqrt / divide / multiply / add, which IEEE float32 rounds the same way on every CPU, so the
comparison is exact. (torch's fuse_conv_bn_eval, used before, computes rsqrt and another product order:
an ulp apart, enough to reorder near-tied queries of the deployed model.) Regenerate with
`PYTHONPATH=. python tests/detector/test_deploy_fold.py --official /path/to/RT-DETRv4`.
"""
import copy
from pathlib import Path

import torch

from detector.hybrid_encoder import HybridEncoder

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "deploy_fold_official.pt"
CFG = dict(in_channels=(8, 16, 32), hidden_dim=16, heads=2, ffn_dim=32, csp_channels=8, csp_blocks=1)


def seeded_encoder() -> HybridEncoder:
    """Small encoder with every float tensor drawn from a fixed generator (BN stats positive)."""
    torch.manual_seed(0)
    enc = HybridEncoder(**CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in sorted(enc.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            t.copy_(0.5 + noise.abs() if name.endswith("running_var") else noise)
    return enc.eval()


def folded(enc: HybridEncoder) -> dict:
    """Folded CCFF conv weights and biases under the official deploy key names."""
    fused = copy.deepcopy(enc)
    fused.fuse()
    return {k: v for k, v in fused.state_dict().items() if not k.startswith(("input_proj", "encoder."))}


def test_folded_weights_equal_official_bit_for_bit():
    ref = torch.load(FIXTURE, weights_only=True)
    ours = folded(seeded_encoder())
    ref = {k.replace(".conv_bn_fused.", ".conv."): v for k, v in ref.items()}
    assert sorted(ours) == sorted(ref)
    bad = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not bad, f"{len(bad)}/{len(ref)} folded tensors differ from the official fold, e.g. {bad[:3]}"


def make_reference(root: str):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_decoder_parity import _official_modules

    official = _official_modules(root)["hybrid_encoder"].HybridEncoder(
        in_channels=list(CFG["in_channels"]), hidden_dim=CFG["hidden_dim"], nhead=CFG["heads"],
        dim_feedforward=CFG["ffn_dim"], expansion=1.0, depth_mult=0.34, version="dfine")
    ours = seeded_encoder()
    official.load_state_dict(ours.state_dict(), strict=True)
    official.eval()
    for m in official.modules():
        if hasattr(m, "convert_to_deploy"):
            m.convert_to_deploy()
    ref = {k: v.detach().clone() for k, v in official.state_dict().items() if not k.startswith(("input_proj", "encoder."))}
    got = {k.replace(".conv_bn_fused.", ".conv."): v for k, v in ref.items()}
    mine = folded(ours)
    print(f"{len(ref)} tensors; differing from ours: {sum(not torch.equal(mine[k], got[k]) for k in got)}")
    torch.save(ref, FIXTURE)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate tests/fixtures/deploy_fold_official.pt")
    parser.add_argument("--official", required=True, help="root of an RT-DETRv4 checkout (contains engine/)")
    make_reference(parser.parse_args().official)
