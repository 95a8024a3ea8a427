"""Start the studio's web server: loopback by default, no public link unless asked for."""
from __future__ import annotations

import tempfile

from .limits import StudioLimits
from .models import StudioModels


def serve(models: StudioModels, limits: StudioLimits, host: str = '127.0.0.1', port: int = 7860,
          share: bool = False, workdir: str | None = None, block: bool = True):
    """Build the app and launch it at ``http://host:port``; ``(app, url)``. ``block=False`` returns at once
    (``app.close()`` stops it); uploads above ``limits.max_upload_mb`` are refused by the server itself.
    ``workdir``: where the codes files and examples go (default: a new temporary directory)."""
    from .ui import build_app
    workdir = workdir or tempfile.mkdtemp(prefix='unitok-studio-')
    app = build_app(models, limits, workdir)
    app.launch(server_name=host, server_port=port, share=share, max_file_size=limits.max_upload_bytes,
               prevent_thread_lock=not block, inbrowser=False, quiet=True, css=_css())
    return app, f'http://{host}:{port}'


def _css() -> str:
    from .ui import CSS
    return CSS
