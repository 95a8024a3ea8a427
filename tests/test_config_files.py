"""Config files (model and training): errors name the file, the field and the type; one serialiser."""
import json

import pytest

from unitok.config import ConfigError, UniTokConfig


@pytest.mark.parametrize('field,value,match', [
    ('drop_path', 'x', "drop_path: expected a number, got 'x'"),
    ('decoder_conv_depths', ['a', 'b'], r"decoder_conv_depths\[0\]: expected an integer, got 'a'"),
    ('decoder_conv_depths', [1, 2, 3], 'expected 2 values'),
    ('entropy_loss', 'no', "entropy_loss: expected a boolean"),
    ('num_query', 1.5, 'num_query: expected an integer'),
    ('encoder', 5, 'encoder: expected a string'),
])
def test_model_config_file_errors_name_file_field_and_type(tmp_path, field, value, match):
    d = UniTokConfig.from_preset('unitok-tiny').to_dict()
    d[field] = value
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match) as e:
        UniTokConfig.from_json(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize('text', ['null', '"hello"', '[1, 2]'])
def test_config_files_that_are_not_mappings(tmp_path, text):
    from unitok.train import TrainConfig
    (tmp_path / 'config.json').write_text(text)
    with pytest.raises(ConfigError, match='expected a JSON object of fields') as e:
        UniTokConfig.from_json(str(tmp_path / 'config.json'))
    assert 'config.json' in str(e.value)
    with pytest.raises(ConfigError, match='expected a JSON object of fields') as e:
        TrainConfig.load(str(tmp_path / 'config.json'))
    if text != 'null':                    # an empty / null YAML file means the defaults
        (tmp_path / 'train.yaml').write_text(text)
        with pytest.raises(ConfigError, match='expected a YAML mapping') as e:
            TrainConfig.load(str(tmp_path / 'train.yaml'))
        assert 'train.yaml' in str(e.value)


def test_empty_yaml_is_the_defaults(tmp_path):
    from unitok.train import TrainConfig
    (tmp_path / 'train.yaml').write_text('')
    assert TrainConfig.load(str(tmp_path / 'train.yaml')) == TrainConfig()


def test_training_config_file_errors_name_file_and_field_path(tmp_path):
    from unitok.train import TrainConfig
    cases = [('loss:\n  local_loss: "no"\n', 'loss.local_loss: expected a boolean'),
             ('optim:\n  betas: [0.9, x]\n', r"optim.betas\[1\]: expected a number, got 'x'"),
             ('data:\n  crop_scale: 0.9\n', 'data.crop_scale: expected a list of 2'),
             ('model:\n  drop_path: "x"\n', "model.drop_path: expected a number"),
             ('steps: ten\n', "steps: expected an integer, got 'ten'"),
             ('data: 3\n', 'data: expected a mapping of DataConfig fields')]
    for text, match in cases:
        (tmp_path / 't.yaml').write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            TrainConfig.load(str(tmp_path / 't.yaml')).validate()
        assert 't.yaml' in str(e.value) or text.startswith('model')


def test_one_serialiser_for_both_configs(tmp_path):
    """UniTokConfig and TrainConfig convert through unitok.utils.dataclass_io and keep their files."""
    from unitok.train import TrainConfig
    from unitok.utils import dataclass_io
    cfg = UniTokConfig.from_preset('unitok-tiny')
    assert dataclass_io.to_dict(cfg) == cfg.to_dict() and cfg.to_dict()['decoder_conv_depths'] == [1, 1]
    assert dataclass_io.from_dict(UniTokConfig, cfg.to_dict()) == cfg == UniTokConfig.from_dict(cfg.to_dict())
    train = TrainConfig().override(['data.crop_scale=[0.8, 1.0]', 'model.num_codebooks=4'])
    assert dataclass_io.to_dict(train) == train.to_dict()
    assert train.to_dict()['data']['crop_scale'] == [0.8, 1.0]
    train.save(str(tmp_path / 'config.yaml'))
    assert TrainConfig.load(str(tmp_path / 'config.yaml')) == train
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['l3'\] in loss"):
        TrainConfig.from_dict({'loss': {'l3': 1}})
    with pytest.raises(ConfigError, match='known:.*codebook_size'):
        UniTokConfig.from_dict({'codebok_size': 3})
