"""Turn videos into a Text2Image dataset: every --stride-th frame as images/*.jpg with a caption in metas/*.txt.

    python examples/extract_frames.py --input_dir videos/ --output_dir datasets/my_frames --stride 30 \\
        [--caption "An image of sks teal robot."]

The caption comes from --caption for every frame, or else from a `<video name>.txt` beside each video (a video
with neither is an error naming it; nothing asks interactively). Decoding uses PyAV (FFmpeg). Then run
precompute_t5.py on the output folder.
"""

import argparse
from pathlib import Path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm"}


def extract(video: Path, out: Path, stride: int, caption: str, quality: int = 95) -> int:
    """Write frames 0, stride, 2*stride, ... of one video; returns how many."""
    import av

    written = 0
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % stride:
                continue
            name = f"{video.stem}_{index:06d}"
            frame.to_image().save(out / "images" / f"{name}.jpg", quality=quality)
            (out / "metas" / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
            written += 1
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of videos")
    parser.add_argument("--output_dir", required=True, help="dataset folder to write (images/, metas/)")
    parser.add_argument("--stride", type=int, default=30, help="keep every N-th frame")
    parser.add_argument("--caption", help="one caption for every frame (else <video>.txt beside each video)")
    args = parser.parse_args(argv)
    if args.stride < 1:
        parser.error("--stride must be at least 1")
    videos = sorted(p for p in Path(args.input_dir).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        parser.error(f"{args.input_dir}: no videos ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    captions = {}
    for video in videos:
        side = video.with_suffix(".txt")
        if args.caption is None and not side.exists():
            parser.error(f"{video}: no caption; write {side} or pass --caption.")
        captions[video] = args.caption if args.caption is not None else side.read_text(encoding="utf-8").strip()
    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "metas").mkdir(parents=True, exist_ok=True)
    total = 0
    for video in videos:
        count = extract(video, out, args.stride, captions[video])
        print(f"{video.name}: {count} frames")
        total += count
    print(f"wrote {total} frames to {out}; next: python precompute_t5.py --dataset_path {out}")


if __name__ == "__main__":
    main()
