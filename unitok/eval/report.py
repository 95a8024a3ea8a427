"""The one report renderer: ``report.json`` and a self-contained ``report.html`` (a ``string.Template``
page, the shared stylesheet, metric tables, embedded figures) for the tokenizer, generator and MLLM
evaluations, and side-by-side comparisons of tokenizer reports."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import string
from typing import Callable

from ..images import make_grid
from ..utils.io import atomic_write
from .plots import sweep_plot, usage_plot

HERE = os.path.dirname(__file__)
TEMPLATE = os.path.join(HERE, 'report.html')
GEN_TEMPLATE = os.path.join(HERE, 'generation_report.html')
MLLM_TEMPLATE = os.path.join(HERE, 'mllm_report.html')
STYLE = os.path.join(HERE, 'report.css')
with open(os.path.join(HERE, 'report_labels.json'), encoding='utf-8') as _f:
    _LABELS = json.load(_f)
# report key -> (description, which way is better); generation keys ending in '_' are prefixes
# followed by the extractor name
LABELS = {k: tuple(v) for k, v in _LABELS['tokenizer'].items()}
GEN_LABELS = {k: tuple(v) for k, v in _LABELS['generation'].items()}
MLLM_LABELS = _LABELS['mllm']
esc = html.escape

__all__ = ['render_template', 'format_value', 'png_data_uri', 'metric_table', 'write_report', 'add_section',
           'compare', 'write_generation_report', 'write_mllm_report', 'usage_plot']


# ---------------------------------------------------------------------- the renderer
def render_template(path: str, **fields) -> str:
    """The page of the ``string.Template`` file ``path`` filled with ``fields``; its ``$style`` gets the
    stylesheet that every unitok report shares (``report.css``)."""
    with open(STYLE, encoding='utf-8') as f:
        style = f.read()
    with open(path, encoding='utf-8') as f:
        return string.Template(f.read()).substitute(style=style, **fields)


def render_page(path: str, title: str, meta: dict, protocol: dict, **fields) -> str:
    """A report page: escaped title, data spec, protocol and run details (``meta`` less its protocol)."""
    return render_template(path, title=esc(title), data=esc(str(meta.get('data', ''))),
                           protocol=esc(json.dumps(protocol)),
                           meta=esc(json.dumps({k: v for k, v in meta.items() if k != 'protocol'}, indent=1)),
                           **fields)


def format_value(v) -> str:
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'
    return esc(str(v))


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + '\n'), mode='w', what='report')


def write_png(path: str, image, what: str = 'figure') -> None:
    atomic_write(path, lambda f: image.save(f, format='PNG'), what=what)


def figure(title: str, image, cls: str = 'grid', alt: str = '', caption: str = '') -> str:
    """A titled figure section with the image embedded."""
    text = f'<p>{esc(caption)}</p>' if caption else ''
    return f'<h2>{esc(title)}</h2>{text}<img class="{cls}" alt="{esc(alt or title)}" src="{png_data_uri(image)}">'


def _hint(better: str) -> str:
    if not better:
        return ''
    return f' <span class="hint">({better + " is better" if better in ("higher", "lower") else better})</span>'


def metric_table(columns: dict[str, dict], keys: list[str],
                 label: Callable[[str], tuple[str, str]] | None = None, intervals: bool = False) -> str:
    """One row per key, one column per dict: ``label(key) -> (description, 'higher' | 'lower' | hint)``;
    with ``intervals``, ``KEY_low`` / ``KEY_high`` are shown under the value."""
    head = ''.join(f'<th>{esc(c)}</th>' for c in columns)
    rows = []
    for k in keys:
        described = ''
        if label is not None:
            text, better = label(k)
            described = f'<br>{esc(text)}{_hint(better)}'
        cells = []
        for m in columns.values():
            value = format_value(m[k]) if k in m else '&ndash;'
            if intervals and f'{k}_low' in m:
                value += f'<br><span class="hint">[{format_value(m[k + "_low"])}, {format_value(m[k + "_high"])}]</span>'
            cells.append(f'<td>{value}</td>')
        rows.append(f'<tr><td class="key"><code>{esc(k)}</code>{described}</td>{"".join(cells)}</tr>')
    return f'<table><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def value_table(values: dict) -> str:
    """A two-column table of named values."""
    return '<table>' + ''.join(f'<tr><td class="key">{esc(k)}</td><td>{format_value(v)}</td></tr>'
                               for k, v in values.items()) + '</table>'


_FIGURES = ('reconstructions', 'codebook_usage')


def _tokenizer_label(key: str) -> tuple[str, str]:
    return LABELS.get(key, (key, ''))


def _load_figures(directory: str) -> dict:
    from PIL import Image
    return {k: Image.open(os.path.join(directory, f'{k}.png')).convert('RGB')
            for k in _FIGURES if os.path.isfile(os.path.join(directory, f'{k}.png'))}


def write_report(out_dir: str, result, meta: dict) -> dict:
    """Write ``report.json``, ``report.html``, ``reconstructions.png`` and ``codebook_usage.png``."""
    os.makedirs(out_dir, exist_ok=True)
    report = {**result.metrics, **({'per_codebook': result.per_codebook} if result.per_codebook else {}),
              'skipped_files': result.skipped, 'meta': meta}
    figures = {}
    if result.grid:
        figures['reconstructions'] = make_grid(result.grid)
    if result.codebook_counts is not None:
        figures['codebook_usage'] = usage_plot(result.codebook_counts)
    for name, image in figures.items():
        image.save(os.path.join(out_dir, f'{name}.png'))
    write_json(os.path.join(out_dir, 'report.json'), report)
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
    write_png(os.path.join(out_dir, f'{stem}.png'), image)
    entry = {'title': title, 'file': f'{stem}.png', 'caption': caption}
    report['sections'] = [s for s in report.get('sections', []) if s['title'] != title] + [entry]
    write_json(path, report)
    meta = report.get('meta', {})
    name = meta.get('name', 'model')
    figures = _load_figures(out_dir)
    figures['sections'] = [(s['title'], Image.open(os.path.join(out_dir, s['file'])).convert('RGB'), s['caption'])
                           for s in report['sections']]
    page = render_html({name: report}, {name: figures}, meta)
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w')


def render_html(reports: dict[str, dict], figures: dict[str, dict], meta: dict) -> str:
    """The tokenizer report page of one or more named reports side by side."""
    sections = []
    for name, figs in figures.items():
        if 'reconstructions' in figs:
            sections.append(figure(f'{name}: originals (top) and reconstructions (bottom)', figs['reconstructions'],
                                   alt=f'reconstructions of {name}'))
        if 'codebook_usage' in figs:
            sections.append(figure(f'{name}: codebook usage', figs['codebook_usage'], cls='plot',
                                   alt=f'codebook usage of {name}'))
        for title, image, caption in figs.get('sections', ()):
            sections.append(figure(title, image, caption=caption))
    skipped = [s for r in reports.values() for s in r.get('skipped_files', [])]
    skipped_html = ('<h2>Skipped files</h2><ul>' + ''.join(f'<li>{esc(s)}</li>' for s in skipped[:200])
                    + '</ul>') if skipped else ''
    keys = [k for k in LABELS if any(k in m for m in reports.values())]
    keys += sorted({k for m in reports.values() for k, v in m.items()
                    if k not in LABELS and isinstance(v, (int, float)) and not k.endswith('_std')})
    return render_page(TEMPLATE, 'unitok evaluation: ' + ' vs '.join(reports), meta, meta.get('protocol', {}),
                       table=metric_table(reports, keys, _tokenizer_label), figures='\n'.join(sections),
                       skipped=skipped_html)


def compare(report_dirs: list[str], out_dir: str) -> str:
    """Side-by-side HTML of existing evaluation directories (each with report.json and figures)."""
    reports, figures = {}, {}
    for d in report_dirs:
        with open(os.path.join(d, 'report.json'), encoding='utf-8') as f:
            r = json.load(f)
        name = r.get('meta', {}).get('name') or os.path.basename(os.path.normpath(d))
        while name in reports:
            name += "'"
        reports[name] = r
        figures[name] = _load_figures(d)
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


# ---------------------------------------------------------------------- generator reports


def generation_label(key: str) -> tuple[str, str]:
    if key in GEN_LABELS:
        return GEN_LABELS[key]
    for prefix in ('fd_', 'kid_', 'precision_', 'recall_'):
        if key.startswith(prefix):
            label, better = GEN_LABELS[prefix]
            return label.format(key[len(prefix):]), better
    return key, ''


def write_generation_report(out_dir: str, result) -> None:
    """Write ``report.json`` (``result.metrics``), ``report.html`` (tables, the guidance-sweep plot,
    per-class sample grids), ``sweep.png`` and ``samples_cfg{scale}.png``."""
    m = result.metrics
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, 'report.json'), m)
    plot = sweep_plot(m, generation_label(f'fd_{m["primary_extractor"]}')[0])
    write_png(os.path.join(out_dir, 'sweep.png'), plot, 'sweep plot')
    sections = [figure('Guidance sweep', plot, cls='plot', alt='guidance sweep')]
    names = ''.join(f'<li>{esc(c)}</li>' for c in result.classnames)
    for scale, grid in result.grids.items():
        image = make_grid(list(grid))
        write_png(os.path.join(out_dir, f'samples_cfg{scale:g}.png'), image, 'sample grid')
        sections.append(f'<h2>Samples at guidance scale {scale:g} (one row per class)</h2>'
                        f'<div class="samples"><img class="grid" alt="samples at cfg {scale:g}" '
                        f'src="{png_data_uri(image)}"><ol class="classes">{names}</ol></div>')
    side = {**{f'ceiling: {k.replace("_", " ")}': v for k, v in m['ceilings'].items()},
            **{f'held-out NLL {k}': v for k, v in m['held_out_nll'].items()},
            'chance': m['chance'], 'copy threshold (cosine distance)': m['sweep'][0]['copy_threshold'],
            'samples per scale': m['samples_per_scale'], 'held-out images': m['held_out_images'],
            'train images': m['train_images']}
    columns = {f'cfg {s["cfg_scale"]:g}': s for s in m['sweep']}
    columns.update({'real vs real (floor)': m['floors']['real_vs_real'],
                    'reconstruction vs real (floor)': m['floors']['reconstruction_vs_real']})
    keys = [k for k in m['sweep'][0] if k not in ('cfg_scale', 'copy_threshold')
            and not k.endswith(('_std', '_low', '_high'))]
    meta = m.get('meta', {})
    page = render_page(GEN_TEMPLATE, f'unitok generator evaluation: {meta.get("generator", "generator")}', meta,
                       meta.get('protocol', {}), table=metric_table(columns, keys, generation_label, intervals=True),
                       side=value_table(side), figures='\n'.join(sections))
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w', what='report')




def _thumb(u8) -> str:
    from ..images import to_pil
    pil = to_pil(u8[None].float().div(127.5).sub(1))[0]
    return f'<img class="thumb" alt="" src="{png_data_uri(pil)}">'


def _example_card(j: int, ex: dict, figures: dict) -> str:
    empty = '<i>(empty answer)</i>'
    parts = [_thumb(figures['real'][j])] if 'real' in figures and j < len(figures['real']) else []
    parts.append(f'<p><b>Q:</b> {esc(ex["question"])}<br><b>A:</b> {esc(ex["answer"]) or empty} '
                 f'<span class="hint">(truth: {esc(ex["truth"])})</span><br>'
                 f'<b>Q:</b> {esc(ex["category_question"])}<br><b>A:</b> {esc(ex["category_answer"]) or empty} '
                 f'<span class="hint">(log-likelihood pick: {esc(ex["category_predicted"])}; truth: '
                 f'{esc(ex["category_truth"])})</span></p>')
    samples = [f'<figure>{_thumb(v[j])}<figcaption>cfg {s:g}</figcaption></figure>'
               for s, v in figures.get('samples', {}).items() if j < len(v)]
    parts.append(f'<p><b>Prompt:</b> {esc(ex["prompt"])}</p><div class="row">{"".join(samples)}</div>')
    return f'<div class="card">{"".join(parts)}</div>'


def write_mllm_report(out_dir: str, report: dict, figures: dict | None = None) -> None:
    """Write ``report.json`` and a self-contained ``report.html`` (understanding table, text-to-image
    table with the floors, example images with question / answer and prompt / sample)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, 'report.json'), report)
    understanding = metric_table({'value': report}, [k for k in MLLM_LABELS if k in report],
                                 lambda k: (MLLM_LABELS[k], ''))
    columns = {f'cfg {m["cfg_scale"]:g}': m for m in report['t2i']}
    columns.update({f'{k.replace("_", " ")} (floor)': v for k, v in report['floors'].items()})
    keys = [k for k in report['t2i'][0] if k != 'cfg_scale' and not k.endswith(('_std', '_low', '_high'))]
    cards = [_example_card(j, ex, figures or {}) for j, ex in enumerate(report.get('examples', []))]
    meta = report.get('meta', {})
    page = render_page(MLLM_TEMPLATE, f'unitok MLLM evaluation: {meta.get("mllm", "model")}', meta,
                       report.get('protocol', {}), understanding=understanding, t2i=metric_table(columns, keys),
                       examples='\n'.join(cards))
    atomic_write(os.path.join(out_dir, 'report.html'), lambda f: f.write(page), mode='w', what='report')
