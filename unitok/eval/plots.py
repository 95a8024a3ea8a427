"""Figures of the reports, as PIL images: code usage per sub-codebook and the guidance sweep."""
from __future__ import annotations

import io


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _to_image(fig):
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    _pyplot().close(fig)
    buf.seek(0)
    return Image.open(buf).convert('RGB')


def usage_plot(counts, title: str = 'code usage per sub-codebook'):
    """For each sub-codebook, code frequencies sorted in decreasing order (log scale)."""
    plt = _pyplot()
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
    return _to_image(fig)


def sweep_plot(metrics: dict, fd_label: str):
    """The first extractor's Fréchet distance (axis label ``fd_label``) and the condition consistency
    against the guidance scale, with the floors and the chance level as dashed lines."""
    plt = _pyplot()
    sweep, first = metrics['sweep'], metrics['primary_extractor']
    scales = [m['cfg_scale'] for m in sweep]
    key = f'fd_{first}'
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(scales, [m[key] for m in sweep], 'o-', color='#3b6ea5', label='samples vs held-out')
    for name, style in (('real_vs_real', '#2a9d55'), ('reconstruction_vs_real', '#c0392b')):
        a.axhline(metrics['floors'][name][key], ls='--', color=style, label=name.replace('_', ' ') + ' floor')
    a.set_xlabel('guidance scale')
    a.set_ylabel(fd_label, fontsize=8)
    a.legend(fontsize=7)
    for k, color in (('consistency_zero_shot', '#3b6ea5'), ('consistency_classifier', '#8e44ad'),
                     ('control_classifier', '#999999')):
        b.plot(scales, [m[k] for m in sweep], 'o-', color=color, label=k.replace('_', ' '))
    b.axhline(metrics['chance'], ls='--', color='#555555', label='chance')
    b.set_ylim(0, 1)
    b.set_xlabel('guidance scale')
    b.set_ylabel('share of samples', fontsize=8)
    b.legend(fontsize=7)
    fig.tight_layout()
    return _to_image(fig)
