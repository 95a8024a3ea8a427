from unitok.utils import host


def test_cpu_model_reads_the_model_name_line(tmp_path, monkeypatch):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n')
    real_open = open
    monkeypatch.setattr('builtins.open', lambda path, *a, **k: real_open(info if path == '/proc/cpuinfo' else path,
                                                                          *a, **k))
    assert host.cpu_model() == 'AMD EPYC 9R14 96-Core Processor'


def test_cpu_model_falls_back_when_there_is_no_cpuinfo(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError('/proc/cpuinfo')
    monkeypatch.setattr('builtins.open', missing)
    monkeypatch.setattr(host.platform, 'processor', lambda: 'arm')
    assert host.cpu_model() == 'arm'
