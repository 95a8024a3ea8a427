"""Where the time of batch tokenization goes: image decoding + resizing alone, the model alone, and
``unitok encode`` end to end with the images read in 0, 1 or 2 loader workers, in one run.

    python benchmarks/tokenize_throughput.py                           # unitok-tiny, 64 px
    python benchmarks/tokenize_throughput.py --preset unitok-large     # + ViTamin-L at 256 px, a few images
    python benchmarks/tokenize_throughput.py --folder DIR              # your own images instead

Without ``--folder`` the built-in emoji (64 px) are upscaled to ``--source-side`` (bicubic) and
written to a temporary folder, half as PNG, half as JPEG (quality 90), so that decoding costs what
it costs for camera-sized inputs rather than thumbnails. Weights are random (speed does not depend
on them). Rates are images per second, the best of ``--repeat`` passes after a warm-up, the rows of a
model interleaved pass by pass; the printed ratios compare rows of the same run, which is what
survives a loaded machine.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

import torch
from PIL import Image

import unitok
from unitok.commands import main as cli_main
from unitok.data import BuiltinSource
from unitok.data.files import collect_images, image_file_batches

WORKERS = (0, 1, 2)
SUMMARY = re.compile(r'(\d+) image\(s\) in ([\d.]+) s: ([\d.]+) images/s; model (\d+)% of the time, '
                     r'waiting for data (\d+)%')


def write_images(folder: str, count: int, side: int) -> list[str]:
    source = BuiltinSource('emoji', split='all')
    for i in range(count):
        image = source.read(i % len(source))[0].resize((side, side), Image.BICUBIC)
        if i % 2:
            image.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
        else:
            image.save(os.path.join(folder, f'{i:05d}.png'))
    return collect_images([folder])


def decode_pass(files, size, batch, workers) -> tuple[float, list[torch.Tensor]]:
    """Images/s of one pass of reading + decoding + resizing alone (worker start-up included), and the batches."""
    t, batches = time.perf_counter(), []
    for b in image_file_batches(files, size, batch, workers=workers):
        batches.append(b.images)
    return len(files) / (time.perf_counter() - t), batches


@torch.no_grad()
def model_pass(model, batches) -> float:
    """Images/s of one pass of ``model.encode`` over pre-decoded batches."""
    t = time.perf_counter()
    for x in batches:
        model.encode(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - t)


def encode_end_to_end(model_dir, folder, out, batch, workers) -> dict:
    """``unitok encode`` as a user runs it; its own summary line plus the command's wall time."""
    argv = ['encode', folder, '--model', model_dir, '--out', out, '--batch-size', str(batch),
            '--workers', str(workers), '--device', 'cpu']
    printed = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = cli_main(argv)
    total = time.perf_counter() - t
    m = SUMMARY.search(printed.getvalue())
    if code or not m:
        raise SystemExit(f'unitok {" ".join(argv)} failed ({code}):\n{printed.getvalue()}')
    return dict(rate=int(m.group(1)) / float(m.group(2)), loop=float(m.group(2)), model=int(m.group(4)), wait=int(m.group(5)),
                total=total)


def bench_model(name, files, count, batch, repeat, work) -> None:
    files = files[:count]
    if len(files) < count:
        raise SystemExit(f'{name}: {count} images asked for, {len(files)} found')
    torch.manual_seed(0)
    model = unitok.create_model(name).eval()
    size = model.config.image_size
    print(f'\n== {name} ({model.parameter_counts()["total"] / 1e6:.1f} M parameters) at {size} px: '
          f'{len(files)} images, batch {batch}, {torch.get_num_threads()} torch threads, best of {repeat} '
          f'interleaved passes after a warm-up')
    decode, batches = {w: 0.0 for w in WORKERS}, decode_pass(files, size, batch, 0)[1]
    alone = model_pass(model, batches)                                       # warm-up
    for _ in range(repeat):                      # interleaved, so that a burst of load hits every row alike
        for w in WORKERS:
            decode[w] = max(decode[w], decode_pass(files, size, batch, w)[0])
        alone = max(alone, model_pass(model, batches))
    for w in WORKERS:
        print(f'(a) decode + resize alone, {w} worker(s):      {decode[w]:9.2f} images/s')
    print(f'(b) model alone (pre-decoded tensors):        {alone:9.2f} images/s')
    model_dir = os.path.join(work, name)
    model.save_pretrained(model_dir)
    del model
    e2e = {}
    with tempfile.TemporaryDirectory(dir=work) as sub:
        sub_folder = os.path.join(sub, 'images')
        os.mkdir(sub_folder)
        for f in files:                                   # exactly these files, by hard link when possible
            target = os.path.join(sub_folder, os.path.basename(f))
            try:
                os.link(f, target)
            except OSError:
                with open(f, 'rb') as a, open(target, 'wb') as b:
                    b.write(a.read())
        encode_end_to_end(model_dir, sub_folder, os.path.join(sub, 'warm.npz'), batch, 0)        # warm-up
        for i in range(repeat):
            for w in WORKERS:
                r = encode_end_to_end(model_dir, sub_folder, os.path.join(sub, f'w{w}-{i}.npz'), batch, w)
                e2e[w] = max(e2e.get(w, r), r, key=lambda x: x['rate'])
        for w in WORKERS:
            r = e2e[w]
            print(f'(c) unitok encode, {w} worker(s):              {r["rate"]:9.2f} images/s  (model {r["model"]}%, '
                  f'waiting for data {r["wait"]}% of {r["loop"]:.1f} s; command {r["total"]:.1f} s with model load)')
    bottleneck = 'the model' if alone < decode[0] else 'decoding'
    print(f'-> decoding alone (0 workers) is {decode[0] / alone:.1f}x the model-alone rate: {bottleneck} is the '
          f'bottleneck; unitok encode reaches {e2e[0]["rate"] / alone:.2f}x (0 workers) and '
          f'{e2e[2]["rate"] / alone:.2f}x (2 workers) of the model-alone rate; vs 0 workers: '
          f'1 worker {e2e[1]["rate"] / e2e[0]["rate"]:.2f}x, 2 workers {e2e[2]["rate"] / e2e[0]["rate"]:.2f}x')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--folder', help='images to use (default: built-in emoji written as PNG + JPEG)')
    p.add_argument('--images', type=int, default=512, help='images for unitok-tiny (default: 512)')
    p.add_argument('--source-side', type=int, default=256, help='side of the written emoji images (default: 256)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--preset', help='also a larger preset at its own size, e.g. unitok-large')
    p.add_argument('--preset-images', type=int, default=8, help='images for --preset (default: 8)')
    p.add_argument('--preset-batch-size', type=int, default=4)
    p.add_argument('--repeat', type=int, default=3, help='interleaved timed passes of unitok-tiny (default: 3)')
    p.add_argument('--preset-repeat', type=int, default=1, help='the same for --preset (default: 1)')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    print(f'{os.cpu_count()} cores, load average {" ".join(f"{x:.1f}" for x in os.getloadavg())}, '
          f'torch {torch.__version__}')
    with tempfile.TemporaryDirectory() as work:
        if args.folder:
            files = collect_images([args.folder])
        else:
            folder = os.path.join(work, 'images')
            os.mkdir(folder)
            files = write_images(folder, max(args.images, args.preset_images), args.source_side)
            print(f'wrote {len(files)} emoji at {args.source_side} px to a temporary folder (PNG + JPEG)')
        bench_model('unitok-tiny', files, args.images, args.batch_size, args.repeat, work)
        if args.preset:
            bench_model(args.preset, files, args.preset_images, args.preset_batch_size, args.preset_repeat, work)
    print(f'\nload average at the end {" ".join(f"{x:.1f}" for x in os.getloadavg())}')


if __name__ == '__main__':
    sys.exit(main())
