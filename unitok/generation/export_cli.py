"""``unitok export-codes``: tokenize a data source into memory-mapped code shards (see :mod:`.codes`).

    unitok export-codes --model TOKENIZER --data builtin:emoji --out codes/emoji
    unitok export-codes --model TOKENIZER --data 'shards/{000000..000099}.tar' --out codes/x --augment flip,tencrop
    torchrun --nproc_per_node 8 -m unitok.cli export-codes --model TOKENIZER --data folder:DIR --out codes/y

Rerunning the same command after an interruption keeps the finished shards and does the rest.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..cli import PRECISION_HELP
from ..precision import INFERENCE_PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', required=True, help='tokenizer: model directory, hub id or official .pth')
    p.add_argument('--data', required=True, help='data spec: builtin:emoji, folder:DIR, shards/{000..099}.tar')
    p.add_argument('--out', required=True, help='codes directory (created; a rerun resumes it)')
    p.add_argument('--split', default='train', help='split of the data source (default: train)')
    p.add_argument('--augment', default='none',
                   help='extra views after the centre crop, comma-separated: flip, tencrop (default: none)')
    p.add_argument('--batch-size', type=int, default=32, help='images per encoder call (default: 32)')
    p.add_argument('--shard-size', type=int, default=1024, help='images per shard (default: 1024)')
    p.add_argument('--limit', type=int, default=None, help='export only the first N items (map-style sources)')
    from ..data.files import default_workers
    p.add_argument('--workers', type=int, default=default_workers(),
                   help='processes decoding images while the encoder runs (default: one per '
                        'core beside this process, at most 4; now %(default)s)')
    p.add_argument('--precision', choices=tuple(INFERENCE_PRECISIONS), default='fp32', help=PRECISION_HELP)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')


def run(args) -> int:
    from ..model import UniTok
    from ..utils import distributed as D
    from ..utils.throughput import Throughput
    from .codes import ExportConfig, export_codes
    cfg = ExportConfig(data=args.data, split=args.split, augment=args.augment, precision=args.precision,
                       shard_size=args.shard_size, limit=args.limit, batch_size=args.batch_size, workers=args.workers)
    info = D.init_distributed(args.device)
    try:
        model = UniTok.from_pretrained(args.model, **INFERENCE_PRECISIONS[args.precision]).to(info.device)
        result = export_codes(model, cfg, args.out, progress=True)
        stats = D.all_gather_object((result.images, result.throughput))
    except BaseException:
        D.abort()            # do not wait in a barrier for ranks that will never arrive
        raise
    D.shutdown()
    if info.is_main:
        m = result.manifest
        tok = m['tokenizer']
        images, speed = sum(s[0] for s in stats), Throughput.combine([s[1] for s in stats])
        shape = (m['num_items'], m['num_views'], tok['num_codebooks'], *tok['grid'])
        print(f'exported {m["num_items"]} image(s) -> {args.out}: codes {shape} uint16 in {len(m["shards"])} '
              f'shard(s), views {m["views"]}')
        if images:
            per_rank = ' + '.join(str(s[0]) for s in stats)
            print(f'{images} image(s) encoded now ({info.world_size} process(es): {per_rank}; {args.workers} loader '
                  f'worker(s) each); {m["num_items"] - images} kept from earlier runs')
            print(speed.summary() + ('' if info.world_size == 1 else ' (mean over processes)'))
        if m['skipped']:
            names = ', '.join(s['key'] for s in m['skipped'][:10])
            more = f' and {len(m["skipped"]) - 10} more' if len(m['skipped']) > 10 else ''
            print(f'skipped {len(m["skipped"])} unreadable image(s) (listed in manifest.json): {names}{more}')
    return 0


def register(sub) -> None:
    p = sub.add_parser('export-codes', help='tokenize a data source into code shards for generator training',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='unitok-export-codes', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
