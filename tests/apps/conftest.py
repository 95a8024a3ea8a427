import pytest

from studio_fixtures import free_port, saved_generator, write_images
from train_helpers import saved_tiny_tokenizer


@pytest.fixture(scope='session')
def studio_dir(tmp_path_factory):
    """The saved models and test images, with the library's own copies to compare with."""
    root = tmp_path_factory.mktemp('studio')
    tokenizer = saved_tiny_tokenizer(root)
    gen_path = saved_generator(root, tokenizer)
    images = root / 'images'
    images.mkdir()
    return dict(root=root, tokenizer=str(root / 'tokenizer'), gen=gen_path, images=write_images(images))


@pytest.fixture(scope='session')
def studio(studio_dir):
    """A studio served on a free loopback port over the saved tokenizer and generator (no MLLM)."""
    gradio = pytest.importorskip('gradio', reason='the studio needs gradio (pip install "unitok-vision[studio]")')
    del gradio
    from unitok.apps.studio import StudioLimits, load_models, serve
    models = load_models(studio_dir['tokenizer'], studio_dir['gen'], defaults=False)
    limits = StudioLimits(queue_size=24, max_pixels=20_000_000)
    app, url = serve(models, limits, port=free_port(), block=False, workdir=str(studio_dir['root'] / 'work'))
    yield dict(url=url, models=models, limits=limits, **studio_dir)
    app.close()
