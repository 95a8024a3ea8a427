import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')   # no network in tests: hub calls must fail fast

import pytest
import torch

import unitok

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope='module')
def one_thread():
    """For modules of thousands of tiny ops (use with ``pytestmark = pytest.mark.usefixtures('one_thread')``):
    one thread avoids spinning idle threads on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_config():
    return unitok.UniTokConfig.from_preset('unitok-tiny')


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return unitok.UniTok(tiny_config).eval()


@pytest.fixture()
def images64():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
