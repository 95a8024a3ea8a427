import math

import pytest

from unitok.config import ConfigError
from unitok.train import TrainConfig
from unitok.train.schedule import cosine_factor, gan_schedule


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig().override(['optim.lr=1e-3', 'loss.perceptual=none', 'data.crop_scale=[0.8, 1.0]',
                                  'model.num_codebooks=4', 'steps=7'])
    assert cfg.optim.lr == 1e-3 and cfg.loss.perceptual == 'none' and cfg.data.crop_scale == (0.8, 1.0)
    assert cfg.model_config().num_codebooks == 4 and cfg.steps == 7
    for name in ('c.yaml', 'c.json'):
        cfg.save(str(tmp_path / name))
        assert TrainConfig.load(str(tmp_path / name)) == cfg


@pytest.mark.parametrize('assignment,match', [
    ('optim.lrr=1', "unknown config key 'optim.lrr'"),
    ('optimm.lr=1', "unknown config section 'optimm'"),
    ('lr', 'not key=value'),
])
def test_bad_overrides(assignment, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig().override([assignment])


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match='precision'):
        TrainConfig(precision='int8').validate()
    with pytest.raises(ConfigError, match='unknown key'):
        TrainConfig.from_dict({'loss': {'l3': 1}})
    (tmp_path / 'bad.yaml').write_text('steps: [1\n')
    with pytest.raises(ConfigError, match='cannot parse'):
        TrainConfig.load(str(tmp_path / 'bad.yaml'))
    with pytest.raises(ConfigError, match='num_codebooks'):
        TrainConfig(model={'num_codebooks': 0}).validate()


def test_official_defaults():
    cfg = TrainConfig()
    assert (cfg.loss.l1, cfg.loss.l2, cfg.loss.perceptual_weight, cfg.loss.adversarial_weight, cfg.loss.bcr) == \
        (0.2, 1.0, 1.0, 0.4, 4.0)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.disc_lr, cfg.optim.disc_betas) == \
        (5e-4, (0.9, 0.95), 0.02, 2e-5, (0.5, 0.9))


def test_cosine_schedule():
    assert cosine_factor(0, 100, 10) == 0.0
    assert cosine_factor(5, 100, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(99, 100, 10) == pytest.approx(0.1)
    assert cosine_factor(10 + 89 // 2, 100, 10) == pytest.approx(0.1 + 0.9 * (0.5 + 0.5 * math.cos(math.pi * 44 / 89)))


def test_gan_schedule():
    assert gan_schedule(9, 10, 4) == (0.0, 0.0)
    assert gan_schedule(10, 10, 4) == (0.0, 1.0)
    assert gan_schedule(12, 10, 4) == (0.5, 0.75)
    assert gan_schedule(20, 10, 4) == (1.0, 0.0)


def test_string_overrides_stay_verbatim():
    cfg = TrainConfig().override(['out=2024', 'data.train={a,b}.tar', 'data.val=null', 'steps=1e3',
                                  'loss.local_loss=no'])
    assert (cfg.out, cfg.data.train, cfg.data.val, cfg.steps, cfg.loss.local_loss) == ('2024', '{a,b}.tar', None, 1000, False)
    with pytest.raises(ConfigError, match=r"override steps='\[1': not a YAML value"):
        TrainConfig().override(['steps=[1'])
    with pytest.raises(ConfigError, match='optim.betas: expected 2 values'):
        TrainConfig().override(['optim.betas=[0.9]'])
