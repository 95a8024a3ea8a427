"""``unitok studio``: UniTok Studio, a local web app over the tokenizer, the generator and the MLLM.

    unitok studio                                  # the models of `make demo` / `unitok demo-mllm`
    unitok studio --tokenizer DIR --gen RUN/model --mllm DIR --port 7860

It serves on 127.0.0.1 (``--host`` to change it) and makes a public gradio link only with ``--share``.
Tabs: Tokenize (reconstruction, code maps, codes file), Sub-codebooks (mix two images per sub-codebook,
drop one), Understand (zero-shot top 5, MLLM chat), Generate (class or text, row-by-row progress).
A model that is missing disables its tab with the command that makes it.
"""
from __future__ import annotations

from .args import add_command, positive_int


def run(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('unitok studio needs gradio: pip install "unitok-vision[studio]"') from None
    from ..apps.studio import StudioLimits, load_models, serve        # the app only when asked for
    limits = StudioLimits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, queue_size=args.queue_size,
                          max_images=args.max_images)
    models = load_models(args.tokenizer, args.gen, args.mllm, device=args.device, defaults=not args.no_defaults)
    for note in models.notes.values():
        print(f'[studio] {note}')
    print(f'[studio] serving on http://{args.host}:{args.port} (Ctrl+C stops it)', flush=True)
    serve(models, limits, host=args.host, port=args.port, share=args.share, block=True)
    return 0


def register(sub) -> None:
    p = add_command(sub, 'studio', 'a local web app: tokenize, sub-codebooks, understand, generate', __doc__)
    p.add_argument('--tokenizer', help='UniTok model directory or hub id (default: demo_output/train/model)')
    p.add_argument('--gen', help='generator run model directory (default: demo_output/generator/model)')
    p.add_argument('--mllm', help='MLLM directory (default: demo_mllm/model)')
    p.add_argument('--no-defaults', action='store_true', help='do not look for demo_output/ and demo_mllm/')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=7860)
    p.add_argument('--share', action='store_true', help='also make a public gradio.live link (off by default)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--max-upload-mb', type=float, default=20.0, help='largest upload accepted, MB')
    p.add_argument('--max-pixels', type=positive_int, default=40_000_000, help='largest image accepted, pixels')
    p.add_argument('--queue-size', type=positive_int, default=16, help='requests that may wait; more are refused')
    p.add_argument('--max-images', type=positive_int, default=8, help='images per generation request')
    p.set_defaults(fn=run)
