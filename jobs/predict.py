"""Run a checkpoint, an ONNX file or a TensorRT engine on images or a video and draw the detections.

    python -m jobs.predict --size l --checkpoint best.pth --input photos/ --out predictions/
    python -m jobs.predict --onnx export/rtdetrv4_l.onnx --input street.jpg --names data.yaml
    python -m jobs.predict --engine export/engines/rtdetrv4_l-fp16-....engine --input clip.mp4

Preprocessing is the official one (plain resize to 640, [0,1]); boxes come back in the original
image's pixels. Writes one annotated image per input, at its path under --input (photos/a/x.jpg ->
OUT/a/x.jpg; formats other than JPEG and PNG are drawn as JPEG: x.webp -> x.webp.jpg), or an
annotated video (needs OpenCV), and detections.json with the boxes, labels and scores above
--score-thr. An image that cannot be decoded is skipped and listed (on stderr and in
detections.json, with the reason; exit code 1); what was done is written even after Ctrl-C.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline import cli
from pipeline.cli import parser

# torch, torchvision and the deploy runtime are imported inside the functions, after the flags
# are parsed: --help answers without loading them.


def load_backend(args):
    from pipeline.deploy.backends import OnnxRuntimeBackend, TensorRTBackend, TorchBackend

    if sum(x is not None for x in (args.checkpoint, args.onnx, args.engine)) > 1:
        raise cli.JobError("give one of --checkpoint, --onnx, --engine")
    if args.engine:
        from pipeline.deploy.trt_engine import tensorrt_status
        ok, why = tensorrt_status()
        if not ok:
            raise cli.JobError(f"--engine {args.engine}: cannot run it ({why}). Use --onnx or --checkpoint instead")
        return TensorRTBackend(args.engine, "engine")
    if args.onnx:
        if not Path(args.onnx).is_file():
            raise cli.JobError(f"--onnx {args.onnx}: no such file (python -m jobs.export writes one)")
        return OnnxRuntimeBackend(args.onnx, threads=args.threads,
                                  device="cuda" if args.device.startswith("cuda") else "cpu")
    from pipeline.deploy.graph import build_deploy_graph, checkpoint_size
    if not args.size and not args.checkpoint:
        raise cli.JobError("give --checkpoint, --onnx or --engine (or --size for random weights)")
    size = args.size or checkpoint_size(args.checkpoint)
    built = build_deploy_graph(size, args.checkpoint, args.num_classes)
    return TorchBackend(built.graph, args.device, args.precision)


def load_names(path: str | None) -> list[str] | None:
    """Class names from a YOLO data.yaml (`names:` list or {id: name}), a JSON list or a text file."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise cli.JobError(f"--names {p}: no such file")
    if p.suffix in (".yaml", ".yml"):
        import yaml
        names = yaml.safe_load(p.read_text()).get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list):
            raise cli.JobError(f"--names {p}: no 'names' list")
        return [str(n) for n in names]
    if p.suffix == ".json":
        return [str(n) for n in json.loads(p.read_text())]
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def detect(backend, frames, image_size):
    from pipeline.deploy.inputs import to_inputs

    images, sizes = to_inputs(frames, image_size)
    return backend.detections(images, sizes)


def _record(name, labels, boxes, scores, thr, names):
    keep = scores >= thr
    return {"image": name, "detections": [
        {"label": int(l), "name": names[int(l)] if names and int(l) < len(names) else None,
         "score": round(float(s), 4), "box_xyxy": [round(float(v), 2) for v in b]}
        for l, b, s in zip(labels[keep], boxes[keep], scores[keep])]}


def output_names(files: list[Path], source: Path) -> list[Path]:
    """Where each image is drawn, relative to --out: its path under --input, so same-named files in
    two folders stay apart; JPEG and PNG keep their name, other formats get ``.jpg`` added (x.webp ->
    x.webp.jpg, apart from x.jpg). Two inputs that would still meet are refused, naming both."""
    root = source if source.is_dir() else source.parent
    names, seen = [], {}
    for f in files:
        rel = f.relative_to(root)
        name = rel if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else rel.with_name(rel.name + ".jpg")
        if name in seen:
            raise ValueError(f"--input {source}: {seen[name]} and {f} would both be drawn to {name}; rename one")
        seen[name] = f
        names.append(name)
    return names


def predict_images(backend, files, out: Path, args, names, records: list) -> list[dict]:
    """Draw every image into ``out`` and append its record to ``records`` (a record with ``error``
    for an image that cannot be decoded: skipped, the others go on)."""
    from torchvision.io import write_jpeg, write_png
    from tqdm import tqdm

    from pipeline.data.dataset import DatasetError
    from pipeline.deploy.draw import draw_detections
    from pipeline.deploy.inputs import read_image

    targets = output_names(files, Path(args.input))
    for i in tqdm(range(0, len(files), args.batch), desc="predict", unit="batch"):
        chunk, frames = [], []
        for f, target in zip(files[i:i + args.batch], targets[i:i + args.batch]):
            try:
                frames.append(read_image(f))
                chunk.append((f, target))
            except DatasetError as e:   # names the file and why: listed, the run goes on
                why = str(e).split(". Fix:")[0]
                tqdm.write(f"jobs.predict: skipped {why}", file=sys.stderr)
                records.append({"image": str(f), "error": why, "detections": []})
        if not frames:
            continue
        labels, boxes, scores = detect(backend, frames, args.image_size)
        for (f, target), frame, l, b, s in zip(chunk, frames, labels, boxes, scores):
            drawn, _ = draw_detections(frame, l, b, s, args.score_thr, names)
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            (write_png if target.suffix.lower() == ".png" else write_jpeg)(drawn, str(out / target))
            records.append({**_record(str(f), l, b, s, args.score_thr, names), "drawn": str(out / target)})
    return records


def predict_video(backend, path: Path, out: Path, args, names, records: list) -> list[dict]:
    from tqdm import tqdm

    from pipeline.deploy.draw import draw_detections
    from pipeline.deploy.inputs import video_frames

    frames, fps = video_frames(path)  # says how to install OpenCV when it is missing
    import cv2
    writer = None
    for n, frame in enumerate(tqdm(frames, desc="predict", unit="frame")):
        labels, boxes, scores = detect(backend, [frame], args.image_size)
        drawn, _ = draw_detections(frame, labels[0], boxes[0], scores[0], args.score_thr, names)
        if writer is None:
            h, w = drawn.shape[-2:]
            writer = cv2.VideoWriter(str(out / (path.stem + "_det.mp4")), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        writer.write(drawn.permute(1, 2, 0).numpy()[:, :, ::-1].copy())
        records.append(_record(f"{path.name}#{n}", labels[0], boxes[0], scores[0], args.score_thr, names))
    if writer is not None:
        writer.release()
    return records


def main(argv=None) -> list[dict]:
    p = parser("jobs.predict", __doc__)
    p.add_argument("--input", required=True, help="an image, a folder of images, or a video")
    p.add_argument("--size", choices=["s", "m", "l", "x"], help="detector size (None: detected from --checkpoint)")
    p.add_argument("--checkpoint", help="our or an official RT-DETRv4 checkpoint (.pth)")
    p.add_argument("--onnx", help="an ONNX file written by jobs.export")
    p.add_argument("--engine", help="a TensorRT engine written by jobs.export --engine")
    p.add_argument("--num-classes", type=int, help="None: read from the checkpoint, else 80")
    p.add_argument("--names", help="class names: YOLO data.yaml, JSON list or one name per line")
    p.add_argument("--score-thr", type=float, default=0.5, help="detections drawn and written")
    p.add_argument("--image-size", type=int, default=640, help="network input size")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="torch autocast")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--out", default="predictions", help="folder for the drawn images and detections.json")
    args = p.parse_args(argv)   # before the heavy imports: --help answers at once
    import torch

    from pipeline.deploy.inputs import VIDEO_EXTS, list_images

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # bad input fails before a model is loaded: names, images, output names, the --out folder
    names = load_names(args.names)
    src = Path(args.input)
    is_video = src.suffix.lower() in VIDEO_EXTS
    files = None if is_video else list_images(src, args.limit)
    if files is not None:
        output_names(files, src)
    out = cli.writable_folder(args.out)
    backend = load_backend(args)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    try:
        if is_video:
            predict_video(backend, src, out, args, names, records)
        else:
            predict_images(backend, files, out, args, names, records)
    finally:   # what was done is written, also when a later image or Ctrl-C stops the run
        (out / "detections.json").write_text(json.dumps({"backend": backend.label, "score_thr": args.score_thr,
                                                         "results": records}, indent=1) + "\n")
    n = sum(len(r["detections"]) for r in records)
    bad = [r for r in records if "error" in r]
    print(f"{backend.label}: {n} detections >= {args.score_thr} in {len(records) - len(bad)} "
          f"{'frames' if is_video else 'images'}; drawn into {out}/")
    if bad:
        listed = ", ".join(r["image"] for r in bad[:5]) + (", ..." if len(bad) > 5 else "")
        cli.fail("jobs.predict", f"{len(bad)} of {len(records)} images skipped (cannot be decoded; listed in "
                                 f"{out / 'detections.json'} with the reason): {listed}")
    return records


def exit_code(records: list[dict]) -> int:
    """1 when an image was skipped (the others are drawn), else 0."""
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(cli.run("jobs.predict", lambda argv: exit_code(main(argv))))
