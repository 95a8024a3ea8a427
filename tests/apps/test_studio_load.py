"""UniTok Studio under load (gradio_client over loopback): concurrent requests give the serial results,
and a burst past the queue size gets gradio's queue-full message while the queued requests succeed."""
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from studio_fixtures import free_port

pytestmark = pytest.mark.studio
gradio_client = pytest.importorskip('gradio_client', reason='the load test needs gradio_client')
from gradio_client.utils import QueueError  # noqa: E402

IMAGES = ('a.png', 'b.png', 'cmyk.jpg', '16bit.png')
GEN = dict(source='generator', label=1, prompt='', n=2, guidance=2.0, temperature=1.0, top_k=0, top_p=1.0)


def reconstruct(client, path):
    recon, summary, maps, codes = client.predict(gradio_client.handle_file(path), api_name='/reconstruct')
    with np.load(codes, allow_pickle=False) as z:
        return np.asarray(Image.open(recon)), z['codes'].copy(), summary


def generated(client, seed):
    images, codes, status = client.predict(*GEN.values(), seed, api_name='/generate')
    with np.load(codes, allow_pickle=False) as z:
        return z['codes'].copy(), [np.asarray(Image.open(im['image'])) for im in images]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # the server runs in this process


def test_concurrent_requests_equal_the_serial_ones(studio):
    client = gradio_client.Client(studio['url'], verbose=False)
    files = [studio['images'][IMAGES[i % len(IMAGES)]] for i in range(16)]
    serial = {path: reconstruct(client, path) for path in set(files)}
    serial_gen = {seed: generated(client, seed) for seed in range(4)}
    t = time.time()
    with ThreadPoolExecutor(20) as pool:
        recon = [pool.submit(reconstruct, gradio_client.Client(studio['url'], verbose=False), p) for p in files]
        gen = {seed: pool.submit(generated, gradio_client.Client(studio['url'], verbose=False), seed)
               for seed in range(4)}
        recon, gen = [f.result() for f in recon], {s: f.result() for s, f in gen.items()}
    for path, (pixels, codes, summary) in zip(files, recon):
        np.testing.assert_array_equal(pixels, serial[path][0])
        np.testing.assert_array_equal(codes, serial[path][1])
        assert summary == serial[path][2]
    for seed, (codes, images) in gen.items():
        np.testing.assert_array_equal(codes, serial_gen[seed][0])
        assert all(np.array_equal(a, b) for a, b in zip(images, serial_gen[seed][1]))
    assert not np.array_equal(gen[0][0], gen[1][0])                           # the seeds matter
    print(f'\n16 reconstructions + 4 generations side by side: {time.time() - t:.1f} s; '
          f'peak RSS of the test process (server included) {peak_rss_mib():.0f} MiB')


@pytest.fixture(scope='module')
def small_queue(studio):
    """A second app over the same model instances, with room for 2 waiting requests."""
    from unitok.apps.studio import StudioLimits, serve
    limits = StudioLimits(queue_size=2, max_images=8)
    app, url = serve(studio['models'], limits, port=free_port(), block=False,
                     workdir=str(studio['root'] / 'work_small_queue'))
    yield url
    app.close()


def test_a_burst_past_the_queue_size_gets_the_queue_full_message(small_queue):
    jobs = [gradio_client.Client(small_queue, verbose=False).submit(*{**GEN, 'n': 8}.values(), seed,
                                                                     api_name='/generate') for seed in range(12)]
    done, full = 0, 0
    for job in jobs:
        try:
            job.result(timeout=120)
            done += 1
        except QueueError as e:
            assert 'Queue is full' in str(e)
            full += 1
    assert full >= 1 and done >= 2 and done + full == len(jobs)
    print(f'\nburst of 12 into a queue of 2: {done} served, {full} told the queue is full; '
          f'peak RSS {peak_rss_mib():.0f} MiB')


def call(url: str, api: str, data: list) -> str:
    """A raw call of the HTTP API (what a hand-written client can send): the event stream's text."""
    import json
    import httpx
    body = json.dumps({'data': data})                          # allow_nan: a NaN goes out as the literal NaN
    event = httpx.post(f'{url}/gradio_api/call/{api}', content=body, headers={'content-type': 'application/json'},
                       timeout=60).json()['event_id']
    return httpx.get(f'{url}/gradio_api/call/{api}/{event}', timeout=120).text


def test_raw_api_calls_cannot_reach_files_or_send_nan(studio, tmp_path):
    secret = tmp_path / 'secret.png'                           # an image outside gradio's upload folder
    Image.new('RGB', (64, 64), 'red').save(secret)
    for path in (str(secret), '/etc/passwd', '../../../../etc/passwd'):
        reply = call(studio['url'], 'reconstruct', [{'path': path, 'meta': {'_type': 'gradio.FileData'}}])
        assert 'event: error' in reply and 'PSNR' not in reply, reply
    reply = call(studio['url'], 'generate', ['generator', 0, '', 2, float('nan'), 1.0, 0, 1.0, 0])   # JSON NaN
    assert 'event: error' in reply and 'Guidance must be a finite number' in reply, reply
    assert 'PSNR' in reconstruct(gradio_client.Client(studio['url'], verbose=False), studio['images']['a.png'])[2]
