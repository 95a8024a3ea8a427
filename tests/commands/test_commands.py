"""The command line as a contract (every command, its arguments, its help) and as a layer apart: no
module of the library imports a command module."""
import argparse
import ast
import os
import subprocess
import sys

import pytest

import unitok
from unitok.commands import build_parser, main

# Every command with its arguments, in the order of `unitok --help`: names and flags are a contract.
CONTRACT = {
    'convert': 'checkpoint out_dir --force',
    'encode': 'images --out --size --skip-bad --workers --model --device --batch-size --precision',
    'decode': 'codes --out-dir --grid --ignore-mismatch --model --device --batch-size --precision',
    'reconstruct': 'images --out-dir --size --skip-bad --workers --model --device --batch-size --precision',
    'info': 'model',
    'train': '--preset --data --val-data --init --config --out --steps --batch-size --resume overrides',
    'eval': '--model --data --split --out --metrics --extractor --inception-weights --dinov2-weights '
            '--lpips-weights --batch-size --resize --size --max-samples --template --name --compare',
    'demo': '--out --data --recipe --steps --seed --gen-steps --gen-limit --fp32',
    'export-codes': '--model --data --out --split --augment --batch-size --shard-size --limit --workers --precision '
                    '--device',
    'train-gen': '--codes --val-codes --tokenizer --preset --config --out --steps --batch-size --resume overrides',
    'generate': '--gen --mllm --llm --ignore-mismatch --tokenizer --class --prompt --n --cfg --temperature --top-k '
                '--top-p --seed '
                '--device --out',
    'eval-gen': '--gen --tokenizer --data --codes-val --out --samples-per-class --cfg --temperature --top-k --top-p '
                '--seed --chunk-size --batch-size --extractor --inception-weights --dinov2-weights --max-real '
                '--max-train --template --device',
    'train-mllm': '--codes --val-codes --tokenizer --llm --stage --init --loss --config --out --steps --batch-size '
                  '--resume overrides',
    'chat': '--mllm --image question --llm --ignore-mismatch --tokenizer --max-new-tokens --temperature --top-k '
            '--top-p --seed --device',
    'eval-mllm': '--mllm --data --codes-val --codes-train --out --llm --cfg --max-items --train-items '
                 '--samples-per-item --max-new-tokens --question --category-question --draw --label-set '
                 '--temperature --top-k --top-p --seed --chunk-size --batch-size --extractor --extractor-weights '
                 '--device',
    'demo-mllm': '--out --tokenizer --llm --steps --batch-size --lr --tokenizer-steps --eval-items --limit --seed '
                 '--fp32',
    'studio': '--tokenizer --gen --mllm --no-defaults --host --port --share --device --max-upload-mb --max-pixels '
              '--queue-size --max-images',
}
PACKAGE = os.path.dirname(unitok.__file__)
ROOT = os.path.dirname(PACKAGE)


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_and_argument_of_the_contract_exists():
    found = {name: ' '.join(o for a in p._actions for o in (a.option_strings or [a.dest]) if o not in ('-h', '--help'))
             for name, p in _subcommands().items()}
    assert found == CONTRACT
    assert list(found) == list(CONTRACT)


@pytest.mark.parametrize('command', list(CONTRACT))
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, '--help'])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f'usage: unitok {command}')


def test_python_dash_m_runs_the_command():
    env = {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    top = subprocess.run([sys.executable, '-m', 'unitok', '--help'], env=env, capture_output=True, text=True)
    assert top.returncode == 0 and all(c in top.stdout for c in CONTRACT)
    train = subprocess.run([sys.executable, '-m', 'unitok.train.cli', '--help'], env=env, capture_output=True, text=True)
    assert train.returncode == 0 and train.stdout.startswith('usage: unitok train')


# ---------------------------------------------------------------------- the library never imports a command
def _modules() -> dict[str, str]:
    """Dotted name -> path of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(root, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, '.')
                found[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
    return found


def is_command(module: str) -> bool:
    """A command module: under unitok.commands, a *cli* or *demo* module, or a ``__main__``."""
    last = module.split('.')[-1]
    return module.startswith('unitok.commands') or 'cli' in last or 'demo' in last or last == '__main__'


def imported_modules(module: str, source: str, is_package: bool, modules) -> set[str]:
    """The modules of ``modules`` that ``source`` imports anywhere (inside functions too)."""
    package = module if is_package else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [base] + [f'{base}.{a.name}' for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:        # a name imported from a module -> that module
                name = name.rpartition('.')[0]
            if name:
                found.add(name)
    return found


def library_imports_of_commands(modules: dict[str, str], sources: dict[str, str]) -> list[str]:
    bad = []
    for name, path in modules.items():
        if is_command(name):
            continue
        for target in imported_modules(name, sources[name], path.endswith('__init__.py'), modules):
            if is_command(target):
                bad.append(f'{os.path.relpath(path, ROOT)} imports {target}')
    return bad


def test_no_library_module_imports_a_command_module():
    modules = _modules()
    sources = {}
    for name, path in modules.items():
        with open(path, encoding='utf-8') as f:
            sources[name] = f.read()
    assert 'unitok.commands.tokenize' in modules and 'unitok.cli' in modules
    assert library_imports_of_commands(modules, sources) == []
    # the check itself sees such an import, even one made inside a function
    planted = dict(sources)
    planted['unitok.images'] += '\n\ndef _late():\n    from .commands.args import positive_int\n'
    planted['unitok.generation.sampling'] += '\nimport unitok.cli\n'
    assert sorted(library_imports_of_commands(modules, planted)) == [
        os.path.join('unitok', 'generation', 'sampling.py') + ' imports unitok.cli',
        os.path.join('unitok', 'images.py') + ' imports unitok.commands.args']
