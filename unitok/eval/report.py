"""Evaluation reports: ``report.json`` (stable keys), ``report.html`` (self-contained: metric table,
originals vs reconstructions, per-sub-codebook usage plots), and side-by-side comparisons."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import string

from ..utils.io import atomic_write
from ..images import make_grid

TEMPLATE = os.path.join(os.path.dirname(__file__), 'report.html')
STYLE = os.path.join(os.path.dirname(__file__), 'report.css')


def render_template(path: str, **fields) -> str:
    """The page of the ``string.Template`` file ``path`` filled with ``fields``; its ``$style`` gets the
    stylesheet that every unitok report shares (``report.css``)."""
    with open(STYLE, encoding='utf-8') as f:
        style = f.read()
    with open(path, encoding='utf-8') as f:
        return string.Template(f.read()).substitute(style=style, **fields)

LABELS = {
    'psnr': ('PSNR (dB)', 'higher'), 'ssim': ('SSIM', 'higher'), 'lpips': ('LPIPS-VGG', 'lower'),
    'rfid_inception': ('rFID (Inception-v3)', 'lower'),
    'rfid_effnet-lite0': ('rFD, EfficientNet-Lite0 features (not FID)', 'lower'),
    'rfid_dinov2': ('rFD, DINOv2 ViT-S/14 features (not FID)', 'lower'),
    'kid_inception': ('rKID (Inception-v3)', 'lower'), 'inception_score': ('Inception Score', 'higher'),
    'zero_shot_top1': ('zero-shot top-1', 'higher'), 'zero_shot_top5': ('zero-shot top-5', 'higher'),
    'recall@1': ('retrieval recall@1 (mean of both directions)', 'higher'),
    'recall@5': ('retrieval recall@5', 'higher'), 'recall@10': ('retrieval recall@10', 'higher'),
    'codebook_usage': ('codebook usage (share of codes used)', 'higher'),
    'codebook_perplexity': ('codebook perplexity (mean over sub-codebooks)', 'higher'),
    'codebook_entropy_bits': ('code entropy (bits, mean over sub-codebooks)', 'higher'),
    'dead_codes': ('dead codes (all sub-codebooks)', 'lower'),
    'distinct_code_tuples': ('distinct K-tuples of codes', 'higher'),
    'l1': ('L1 (mean absolute error on [-1, 1])', 'lower'),
    'clip_loss': ('in-batch CLIP loss (depends on the batch size)', 'lower'),
    'samples': ('images evaluated', ''), 'classes_covered': ('classes among the images evaluated', ''),
    'skipped': ('unreadable images skipped', ''),
}


def format_value(v) -> str:
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'
    return html.escape(str(v))


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def usage_plot(counts, title: str = 'code usage per sub-codebook'):
    """A PIL image: for each sub-codebook, code frequencies sorted in decreasing order (log scale)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from PIL import Image
    K, n = counts.shape
    cols = min(4, K)
    rows = (K + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= K:
            ax.axis('off')
            continue
        c = counts[k].double()
        freq = (c / c.sum().clamp_min(1)).sort(descending=True).values.numpy()
        ax.bar(range(n), freq, width=1.0, color='#3b6ea5')
        ax.set_yscale('log')
        used = int((c > 0).sum())
        ax.set_title(f'sub-codebook {k}: {used}/{n} used', fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel('codes, by frequency', fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert('RGB')


def _table(columns: dict[str, dict]) -> str:
    keys = [k for k in LABELS if any(k in m for m in columns.values())]
    keys += sorted({k for m in columns.values() for k, v in m.items()
                    if k not in LABELS and isinstance(v, (int, float)) and not k.endswith('_std')})
    head = ''.join(f'<th>{html.escape(name)}</th>' for name in columns)
    rows = []
    for k in keys:
        label, better = LABELS.get(k, (k, ''))
        cells = ''.join(f'<td>{format_value(m[k]) if k in m else "&ndash;"}</td>' for m in columns.values())
        hint = f' <span class="hint">({better} is better)</span>' if better else ''
        rows.append(f'<tr><td class="key"><code>{html.escape(k)}</code><br>{html.escape(label)}{hint}</td>{cells}</tr>')
    return f'<table><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def write_report(out_dir: str, result, meta: dict) -> dict:
    """Write ``report.json``, ``report.html``, ``reconstructions.png`` and ``codebook_usage.png``."""
    os.makedirs(out_dir, exist_ok=True)
    report = {**result.metrics, **({'per_codebook': result.per_codebook} if result.per_codebook else {}),
              'skipped_files': result.skipped, 'meta': meta}
    figures = {}
    if result.grid:
        grid = make_grid(result.grid)
        grid.save(os.path.join(out_dir, 'reconstructions.png'))
        figures['reconstructions'] = grid
    if result.codebook_counts is not None:
        plot = usage_plot(result.codebook_counts)
        plot.save(os.path.join(out_dir, 'codebook_usage.png'))
        figures['codebook_usage'] = plot
    atomic_write(os.path.join(out_dir, 'report.json'), lambda f: f.write(json.dumps(report, indent=2) + '\n'), mode='w')
    page = render_html({meta.get('name', 'model'): report}, {meta.get('name', 'model'): figures}, meta)
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w')
    return report


def add_section(out_dir: str, title: str, image, caption: str = '') -> None:
    """Add (or replace, by title) a figure section to the report in ``out_dir``, e.g. samples of a
    generator trained on the evaluated tokenizer's codes: the image is kept beside the report as a PNG,
    the section listed in ``report.json`` (``sections``), and ``report.html`` rendered again."""
    from PIL import Image
    path = os.path.join(out_dir, 'report.json')
    with open(path, encoding='utf-8') as f:
        report = json.load(f)
    stem = ''.join(c if c.isalnum() else '_' for c in title.lower())[:60].strip('_')
    atomic_write(os.path.join(out_dir, f'{stem}.png'), lambda f: image.save(f, format='PNG'))
    entry = {'title': title, 'file': f'{stem}.png', 'caption': caption}
    report['sections'] = [s for s in report.get('sections', []) if s['title'] != title] + [entry]
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=2) + '\n'), mode='w')
    meta = report.get('meta', {})
    name = meta.get('name', 'model')
    figures = {k: Image.open(os.path.join(out_dir, f'{k}.png')).convert('RGB')
               for k in ('reconstructions', 'codebook_usage') if os.path.isfile(os.path.join(out_dir, f'{k}.png'))}
    figures['sections'] = [(s['title'], Image.open(os.path.join(out_dir, s['file'])).convert('RGB'), s['caption'])
                           for s in report['sections']]
    page = render_html({name: report}, {name: figures}, meta)
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w')


def render_html(reports: dict[str, dict], figures: dict[str, dict], meta: dict) -> str:
    sections = []
    for name, figs in figures.items():
        if 'reconstructions' in figs:
            sections.append(f'<h2>{html.escape(name)}: originals (top) and reconstructions (bottom)</h2>'
                            f'<img class="grid" alt="reconstructions of {html.escape(name)}" '
                            f'src="{png_data_uri(figs["reconstructions"])}">')
        if 'codebook_usage' in figs:
            sections.append(f'<h2>{html.escape(name)}: codebook usage</h2><img class="plot" '
                            f'alt="codebook usage of {html.escape(name)}" src="{png_data_uri(figs["codebook_usage"])}">')
        for title, image, caption in figs.get('sections', ()):
            sections.append(f'<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p><img class="grid" '
                            f'alt="{html.escape(title)}" src="{png_data_uri(image)}">')
    skipped = [s for r in reports.values() for s in r.get('skipped_files', [])]
    skipped_html = ('<h2>Skipped files</h2><ul>' + ''.join(f'<li>{html.escape(s)}</li>' for s in skipped[:200])
                    + '</ul>') if skipped else ''
    protocol = meta.get('protocol', {})
    return render_template(
        TEMPLATE, title=html.escape('unitok evaluation: ' + ' vs '.join(reports)),
        data=html.escape(str(meta.get('data', ''))),
        protocol=html.escape(json.dumps(protocol)),
        table=_table(reports), figures='\n'.join(sections), skipped=skipped_html,
        meta=html.escape(json.dumps({k: v for k, v in meta.items() if k not in ('protocol',)}, indent=1)),
    )


def compare(report_dirs: list[str], out_dir: str) -> str:
    """Side-by-side HTML of existing evaluation directories (each with report.json and figures)."""
    from PIL import Image
    reports, figures = {}, {}
    for d in report_dirs:
        with open(os.path.join(d, 'report.json'), encoding='utf-8') as f:
            r = json.load(f)
        name = r.get('meta', {}).get('name') or os.path.basename(os.path.normpath(d))
        while name in reports:
            name += "'"
        reports[name] = r
        figures[name] = {k: Image.open(os.path.join(d, f'{k}.png')).convert('RGB')
                         for k in ('reconstructions', 'codebook_usage') if os.path.isfile(os.path.join(d, f'{k}.png'))}
    datas = {json.dumps(r.get('meta', {}).get('data')) for r in reports.values()}
    meta = {'data': ' | '.join(sorted(datas)), 'compared': report_dirs,
            'protocol': next(iter(reports.values())).get('meta', {}).get('protocol', {})}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'compare.html')
    page = render_html(reports, figures, meta)
    atomic_write(path, lambda f: f.write(page), mode='w')
    with open(os.path.join(out_dir, 'compare.json'), 'w', encoding='utf-8') as f:
        json.dump({n: {k: v for k, v in r.items() if k != 'skipped_files'} for n, r in reports.items()}, f, indent=2)
    return path
